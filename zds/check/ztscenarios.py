"""One scenario per check of ``zds check ztunnel`` (``ztchecks``), each on a fresh connection.

The message checks send one edge or bad record and judge the answer (its nack
prefix), whether ztunnel closes the connection, whether it comes back at once
or stops for good. The state checks look at what ztunnel does with what it was
sent: its listeners in the pods (and none on the host), its readiness probe,
its config_dump.
"""

from __future__ import annotations

from zds.check.inpod import INPOD_PORTS, PortBlocker, own_netns, ports_of
from zds.check.report import Finding
from zds.check.ztbench import Bench
from zds.check.ztconn import ZtConn
from zds.check.ztsteps import (
    ALL,
    SNAPSHOT_SENT,
    acked,
    add,
    delete,
    expect_nack,
    http_json,
    http_status,
    keep,
    open_fd,
    pod_ports,
    ports_probe,
    request_acked,
    said,
    wait_for,
)
from zds.protocol.messages import AddWorkload, WorkloadInfo, encode_request
from zds.protocol.reading import START_FAILURE


# -- the plain exchange -----------------------------------------------------------------------
async def add_acked(b: Bench) -> None:
    pod = b.pods.make()
    conn = await b.fresh([])
    entry = add(pod)
    if await request_acked(b, "add-acked", conn, entry, f"AddWorkload for {pod.name}"):
        b.note("add-acked", f"AddWorkload for {pod.name} ({len(entry[0])} bytes + its netns fd) acked 0a 00")
    await removed(b, "add-acked", conn, pod.uid)


async def removed(b: Bench, name: str, conn: ZtConn, uid: str) -> None:
    """Send the DelWorkload that ends a scenario: it too must be acked (a finding of ``name``)."""
    await request_acked(b, name, conn, delete(uid), f"the DelWorkload for {uid}")


#: Why a check of what listeners do could not pass: they never were there to do it.
NEVER_UP = "not seen: the pod's listeners never all came up after its AddWorkload (see listeners-in-pod)"


async def listeners(b: Bench) -> None:
    """listeners-in-pod, no-listeners-on-host and listeners-closed-on-del, on one pod."""
    pod = b.pods.make()
    conn = await b.fresh([])
    await request_acked(b, "listeners-in-pod", conn, add(pod), f"AddWorkload for {pod.name}")
    ok, ports, took = await wait_for(ports_probe(b, pod.netns), lambda p: set(p) >= ALL, b.options.timeout)
    b.exercised["listeners-in-pod"] += 1
    if ok:
        b.note("listeners-in-pod", f"{sorted(ports)} listening in {pod.netns} {took:.2f}s after the ack")
    else:
        b.report(
            "listeners-in-pod",
            Finding(
                f"after {took:.1f}s, listening in {pod.netns}: {sorted(ports) or 'nothing'}; expected {sorted(ALL)}",
                conn.name,
            ),
        )
    host = await ports_of(own_netns(b.pid), b.pid)
    b.exercised["no-listeners-on-host"] += 1
    if host:
        b.report(
            "no-listeners-on-host",
            Finding(f"listening on {sorted(host)} in its own netns ({own_netns(b.pid)})", conn.name),
        )
    else:
        b.note("no-listeners-on-host", f"nothing on {sorted(ALL)} in {own_netns(b.pid)}")
    await removed(b, "listeners-closed-on-del", conn, pod.uid)
    gone, left, took = await wait_for(ports_probe(b, pod.netns), lambda p: not p, b.options.timeout)
    b.exercised["listeners-closed-on-del"] += 1
    if not ok:  # (nothing that was never open can be seen closing: not a pass)
        b.report("listeners-closed-on-del", Finding(NEVER_UP, conn.name))
    elif gone:
        b.note("listeners-closed-on-del", f"the pod's listeners closed {took:.2f}s after the DelWorkload")
    else:
        b.report(
            "listeners-closed-on-del",
            Finding(f"{sorted(left)} still listening {took:.1f}s after the DelWorkload", conn.name),
        )


async def del_unknown_uid(b: Bench) -> None:
    conn = await b.fresh([])
    nobody, name = delete("zds-check-nobody"), "del-unknown-uid"
    once = await request_acked(b, name, conn, nobody, "DelWorkload for an unknown uid")
    if once and await request_acked(b, name, conn, nobody, "a second DelWorkload on the same connection"):
        b.note("del-unknown-uid", "acked, twice, on the same connection")


async def readd_same_netns(b: Bench) -> None:
    pod = b.pods.make()
    conn = await b.fresh([])
    await request_acked(b, "readd-same-netns", conn, add(pod), "the first AddWorkload")
    up, before = False, dict[int, set[int]]()
    if not b.options.protocol_only:  # (no listeners to wait for: it waited the whole --timeout)
        up, before, _ = await wait_for(ports_probe(b, pod.netns), lambda p: set(p) >= ALL, b.options.timeout)
    if await request_acked(b, "readd-same-netns", conn, add(pod), "the same AddWorkload again"):
        after = await pod_ports(b, pod.netns)
        if not b.options.protocol_only and not up:
            b.report("readd-same-netns", Finding(NEVER_UP, conn.name))
        elif not b.options.protocol_only and after != before:
            b.report(
                "readd-same-netns",
                Finding(f"the listeners changed: {before} -> {after}; the re-add must be a no-op", conn.name),
            )
        else:
            b.note(
                "readd-same-netns", "acked; listeners untouched" if not b.options.protocol_only else "acked"
            )
    await removed(b, "readd-same-netns", conn, pod.uid)


async def readd_new_netns(b: Bench) -> None:
    pod, other = b.pods.make(), b.pods.make()
    conn = await b.fresh([])
    await request_acked(b, "readd-new-netns", conn, add(pod), "the first AddWorkload")
    if await request_acked(
        b, "readd-new-netns", conn, add(pod, other.netns), "the AddWorkload with another netns"
    ):
        if not b.options.protocol_only:
            moved, new, took = await wait_for(
                ports_probe(b, other.netns), lambda p: set(p) >= ALL, b.options.timeout
            )
            left, old, _ = await wait_for(ports_probe(b, pod.netns), lambda p: not p, b.options.timeout)
            if not moved or not left:
                b.report(
                    "readd-new-netns",
                    Finding(
                        f"after {took:.1f}s: new netns {sorted(new)}, old netns {sorted(old)}; expected all in the new, none in the old",
                        conn.name,
                    ),
                )
            else:
                b.note("readd-new-netns", "acked; the listeners moved to the new netns")
        else:
            b.note("readd-new-netns", "acked")
    await removed(b, "readd-new-netns", conn, pod.uid)


async def reconcile(b: Bench) -> None:
    dump = b.url(b.options.config_dump_url)
    if b.options.protocol_only and not dump:
        b.skipped["reconcile"] = (
            "nothing shows what ztunnel holds: give --config-dump-url, or let it open listeners"
        )
        return
    a, gone, c = b.pods.make(), b.pods.make(), b.pods.make()
    await b.fresh([add(a), add(gone)], "reconcile")
    before = await pod_ports(b, a.netns)
    conn = await b.fresh([keep(a.uid), add(c), delete(c.uid)], "reconcile")
    b.exercised["reconcile"] += 1
    if dump:
        states = (await http_json(dump) or {}).get("workloadState", {})
        ours = set(states) & {a.uid, gone.uid, c.uid} if isinstance(states, dict) else None
        if ours is None:  # (a set of a list of objects, or of null, was a traceback: no report)
            b.report(
                "reconcile",
                Finding(
                    f"config_dump's workloadState is {type(states).__name__}, not an object by uid", conn.name
                ),
            )
        elif ours != {a.uid}:
            b.report(
                "reconcile",
                Finding(f"config_dump holds {sorted(ours)} of ours; expected only {a.uid} (A)", conn.name),
            )
    if not b.options.protocol_only:
        dropped, left, took = await wait_for(
            lambda: _listening_any(b, [gone.netns, c.netns]), lambda n: not n, b.options.timeout
        )
        after = await pod_ports(b, a.netns)
        if not dropped:
            b.report(
                "reconcile",
                Finding(
                    f"{took:.1f}s after SnapshotSent, still listening in {left}: B and C must be dropped",
                    conn.name,
                ),
            )
        if set(after) < ALL:
            b.report(
                "reconcile",
                Finding(
                    f"A listens on {sorted(after) or 'nothing'} after the reconnect; a Keep keeps its proxy",
                    conn.name,
                ),
            )
        elif after != before:
            b.report(
                "reconcile",
                Finding(
                    f"A's listeners changed across the reconnect: {before} -> {after}; a Keep keeps them",
                    conn.name,
                ),
            )
    if not b.findings.get("reconcile"):
        b.note(
            "reconcile",
            "A kept as it was, B (not named) and C (added then deleted before SnapshotSent) dropped",
        )
    await removed(b, "reconcile", conn, a.uid)


async def _listening_any(b: Bench, netns: list[str]) -> list[str]:
    return [path for path in netns if await pod_ports(b, path)]


# -- pending, retry, readiness ------------------------------------------------------------------
async def proxy_start_failure(b: Bench) -> None:
    conn = await b.fresh([])
    uid = "zds-check-not-a-netns"
    payload = encode_request(AddWorkload(uid, WorkloadInfo("not-a-netns", "zds-check", "zds-check")))
    reply = await conn.request(payload, [open_fd("/dev/null")], check="proxy-start-failure")
    b.exercised["proxy-start-failure"] += 1
    if not expect_nack(b, "proxy-start-failure", conn, reply, payload, START_FAILURE):
        return
    ready = b.url(b.options.ready_url)
    pending = await http_status(ready) if ready else None
    # (200 is ztunnel's own answer here: its nack path does not look at readiness again,
    # which stays as the SnapshotSent left it until the next acked message or retry)
    removal, _ = delete(uid)
    still = await conn.request(removal, check="proxy-start-failure")
    if conn.closed_at is not None or still is None:
        b.report(
            "proxy-start-failure", Finding("the connection did not stay after the start failure", conn.name)
        )
        return
    acked(
        b, "proxy-start-failure", conn, still, removal, "the DelWorkload of the workload that failed to start"
    )
    if ready:
        ok, status, _ = await wait_for(lambda: http_status(ready), lambda s: s == 200, b.options.timeout)
        if not ok:
            b.report(
                "proxy-start-failure",
                Finding(f"still not ready ({status}) after the pending workload was deleted", conn.name),
            )
    readiness = "" if pending is None else f"; readiness while it was pending: {pending}"
    b.note(
        "proxy-start-failure",
        f"nacked {reply.ack.error if reply and reply.ack else ''!r}; the connection stayed{readiness}",
    )


async def pending_retry(b: Bench) -> None:
    pod = b.pods.make()
    blocker = PortBlocker(pod.netns, INPOD_PORTS[-1])
    conn = await b.fresh([])
    payload, fds = add(pod)
    try:
        reply = await conn.request(payload, fds, check="pending-retry")
        b.exercised["pending-retry"] += 1
        if not expect_nack(b, "pending-retry", conn, reply, payload, START_FAILURE):
            if reply is not None and reply.ack is not None and not reply.ack.error:
                await pod_ports(b, pod.netns)  # (acked with its port taken: any listener at all?)
            return
        b.listener_signs += 1  # (it tried to bind in the pod)
    finally:
        blocker.release()
    within = b.options.retry_interval + b.options.grace
    up, ports, took = await wait_for(ports_probe(b, pod.netns), lambda p: set(p) >= ALL, within)
    if up:
        b.note(
            "pending-retry", f"nacked while port {blocker.port} was taken; up {took:.1f}s after it was freed"
        )
    else:
        b.report(
            "pending-retry",
            Finding(
                f"{took:.1f}s after port {blocker.port} was freed, listening: {sorted(ports) or 'nothing'}: no retry (every {b.options.retry_interval:g}s)",
                conn.name,
            ),
        )
    await removed(b, "pending-retry", conn, pod.uid)


async def readiness(b: Bench) -> None:
    url = b.url(b.options.ready_url)
    if not url:
        b.skipped["readiness"] = "no probe to ask: give --ready-url"
        return
    conn = await b.fresh(None)
    before = await http_status(url)
    reply = await conn.request(SNAPSHOT_SENT, check="readiness")
    acked(b, "readiness", conn, reply, SNAPSHOT_SENT, "SnapshotSent")
    ok, after, took = await wait_for(lambda: http_status(url), lambda s: s == 200, b.options.timeout)
    b.exercised["readiness"] += 1
    if before != 500:
        b.report(
            "readiness",
            Finding(
                f"{'no answer' if before is None else before} from {url} on a new connection before any "
                "SnapshotSent; ztunnel answers 500 until it is ready",
                conn.name,
            ),
        )
    if not ok:
        b.report(
            "readiness",
            Finding(
                f"{after} from {url} {took:.1f}s after SnapshotSent was answered {said(reply)}", conn.name
            ),
        )
    if before == 500 and ok:
        b.note("readiness", f"{before} before the snapshot, 200 {took:.2f}s after it")
