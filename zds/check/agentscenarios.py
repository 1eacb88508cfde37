"""The scenarios ``zds check node-agent`` plays as a strict ztunnel.

Each scenario opens its own connections, makes its own pods (each in a fresh
netns), adds and removes them through the driver, and answers what the node
agent sends the way real ztunnel would. Every record of every scenario also
goes through the record rules (``records``); a scenario reports what only it
can see: whether a snapshot was complete, which connection got what, what
happened when an ack never came, what the agent's fds look like afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable

from zds.aio import cancel_and_wait
from zds.check.agentsession import AgentSession
from zds.check.pods import CheckPod
from zds.check.records import Seen
from zds.check.report import Finding
from zds.check.strictpeer import PeerClosed, StrictConnection


def _is(kind: str, uid: str = "") -> Callable[[Seen], bool]:
    return lambda seen: seen.kind == kind and (not uid or seen.uid == uid)


def _uids(entries: list[Seen]) -> set[str]:
    return {seen.uid for seen in entries if seen.uid}


async def hello_wait(s: AgentSession) -> None:
    """Connect, say nothing for a while (nothing may arrive), then hello and the first snapshot:
    what the agent holds already (``known``)."""
    conn = await s.connect()
    wait = s.options.hello_wait
    if wait > 0:
        early = await conn.until_closed(wait)
        s.exercised["hello-first"] += 1
        s.note("hello-first", f"waited {wait:g}s before the hello: {len(early)} record(s) arrived")
    await conn.hello()
    entries, sent = await conn.take_snapshot(s.options.timeout)
    s.known = _uids(entries)
    if sent is not None:
        s.took_snapshot("snapshot-complete", conn, entries)
    if sent is None:
        s.report(
            "snapshot-complete",
            Finding(
                f"the first connection's snapshot did not end: no SnapshotSent within {s.options.timeout:g}s "
                f"after {len(entries)} entries",
                conn.name,
            ),
        )
    await s.close(conn)


async def exchange(s: AgentSession) -> None:
    """Two pods added at once: the first Add's ack is held back (nothing else may arrive
    meanwhile), then both are acked and removed."""
    conn, _, _ = await s.synced()
    a, b = s.factory.make(), s.factory.make()
    adds = [s.add(a), s.add(b)]
    first = await s.expect(conn, lambda x: x.kind == "add" and x.uid in (a.uid, b.uid), answer=False)
    if first is None:
        s.errors["one-in-flight"] = (
            f"no AddWorkload within {s.options.timeout:g}s of adding two pods ({_driver_said(s)})"
        )
        await s.close(conn)
        return
    # Held well within the agent's ack deadline: this is about pipelining, not about the deadline.
    hold = min(s.options.hold, s.options.ack_deadline / 2)
    during = await conn.next(hold)
    s.exercised["one-in-flight"] += 1
    s.note(
        "one-in-flight",
        f"held the ack of {first.label} for {hold:g}s while another pod was being added: "
        + ("nothing else arrived" if during is None else f"{during.label} arrived"),
    )
    await conn.answer(first)
    other = b if first.uid == a.uid else a
    if during is not None:
        await conn.answer(during)
    if during is None or during.uid != other.uid:
        await s.expect(conn, _is("add", other.uid))
    await s.settle(adds)
    await _remove_and_expect(s, conn, [a, b])
    await conn.until_closed(0.3)  # anything after the last answer is judged by the record rules
    await s.close(conn)


async def snapshot(s: AgentSession) -> None:
    """Pods added with no ztunnel connected are in the next snapshot; after a reconnect, again."""
    pods = [s.factory.make() for _ in range(s.options.pods)]
    await s.settle([s.add(p) for p in pods])
    if s.options.settle:
        await asyncio.sleep(s.options.settle)
    for check in ("snapshot-complete", "reconnect-snapshot"):
        conn, entries, sent = await s.synced(check)
        _judge_snapshot(s, check, conn, pods, entries, sent)
        if check == "reconnect-snapshot":
            await _remove_and_expect(s, conn, pods)
        await s.close(conn)


def _judge_snapshot(
    s: AgentSession,
    check: str,
    conn: StrictConnection,
    pods: list[CheckPod],
    entries: list[Seen],
    sent: Seen | None,
) -> None:
    s.exercised[check] += 1
    named = _uids(entries)
    missing = [p for p in pods if p.uid not in named]
    # (an agent that takes a pod after its add command returned: the wait that lets it, said)
    late = (
        "; if the node agent takes a pod after its add command returns, give --settle SECONDS"
        if s.options.add_cmd is not None and not s.options.settle
        else ""
    )
    for pod in missing:
        s.report(check, Finding(f"pod {pod.name} (uid {pod.uid}) is not in the snapshot{late}", conn.name))
    if sent is None:
        s.report(
            check,
            Finding(f"no SnapshotSent within {s.options.timeout:g}s after {len(entries)} entries", conn.name),
        )
    counts = [seen.uid for seen in entries]
    twice = sorted({u for u in counts if counts.count(u) > 1})
    s.note(
        check,
        f"{conn.name}: {len(entries)} entries ({sum(1 for e in entries if e.kind == 'add')} Add, "
        f"{sum(1 for e in entries if e.kind == 'keep')} Keep) named all {len(pods)} pods added"
        + (f"; uids named twice: {', '.join(twice)}" if twice else ""),
    )


def judge_held(s: AgentSession) -> None:
    """A pod the node agent held before the check and did not delete (no DelWorkload for it
    came), left out of a snapshot, fails the check that snapshot belongs to: at its
    SnapshotSent ztunnel dropped the pod's proxy. (Left out of the run's last snapshot, it
    was only noted, and the check passed.)"""
    for i, taken in enumerate(s.snapshots):
        deleted = {seen.uid for seen in s.seen[: taken.seen_before] if seen.kind == "del"}
        later = set().union(*(t.named for t in s.snapshots[i + 1 :]))
        for uid in sorted(s.known - taken.named - deleted):
            s.report(
                taken.check,
                Finding(
                    f"pod uid {uid}, held before the check, is not in the snapshot"
                    + (" but is in a later one" if uid in later else " and no DelWorkload for it came")
                    + ": ztunnel drops whatever a snapshot does not name",
                    taken.conn,
                ),
            )


async def two_connections(s: AgentSession) -> None:
    """Two connections: a new pod's Add goes to the newer only, its Del to both."""
    old, _, _ = await s.synced()
    new, _, _ = await s.synced()
    pod = s.factory.make()
    adding = s.add(pod)
    # Both watched at once: an Add on the older connection is answered there when it comes
    # (watched after the newer one's wait, it met the node agent's ack deadline first, which
    # closed that connection: an ERROR, not the FAIL it is).
    watching_old = asyncio.create_task(s.expect(old, _is("add", pod.uid), within=s.options.timeout))
    on_new = await s.expect(new, _is("add", pod.uid))
    done, _ = await asyncio.wait({watching_old}, timeout=0.5 if on_new else s.options.grace)
    if not done:  # (a queue's get: cancelling it loses no record)
        await cancel_and_wait(watching_old)
    on_old = watching_old.result() if done else None
    s.exercised["adds-to-newest"] += 1
    if on_old is not None:
        s.report(
            "adds-to-newest",
            Finding(f"{on_old.label} arrived on the older connection", on_old.where, received=on_old.payload),
        )
    if on_new is None:
        s.report(
            "adds-to-newest", Finding(f"no AddWorkload for {pod.name} on the newest connection ({new.name})")
        )
    else:
        s.note("adds-to-newest", f"{on_new.label} arrived on the newest connection ({new.name}) only")
    await s.settle([adding])
    removing = s.remove(pod)
    s.exercised["deletes-to-all"] += 1
    got = []
    for conn in (old, new):
        seen = await s.expect(conn, _is("del", pod.uid))
        if seen is None:
            s.report("deletes-to-all", Finding(f"no DelWorkload for {pod.name} on {conn.name}", conn.name))
        else:
            got.append(conn.name)
    if len(got) == 2:
        s.note("deletes-to-all", f"DelWorkload for {pod.name} arrived on both connections")
    await s.settle([removing])
    await s.close(old)
    await s.close(new)


async def ack_deadline(s: AgentSession) -> None:
    """An Add that is never acked, with a second Add queued behind it."""
    conn, _, _ = await s.synced()
    held, queued = s.factory.make(), s.factory.make()
    adds = [s.add(held)]
    first = await s.expect(conn, _is("add", held.uid), answer=False)
    if first is None:
        s.errors["ack-deadline"] = (
            f"no AddWorkload within {s.options.timeout:g}s of adding a pod ({_driver_said(s)})"
        )
        await s.close(conn)
        return
    conn.rules.withholding = True
    adds.append(s.add(queued))
    limit = s.options.ack_deadline + s.options.grace
    after = await conn.until_closed(limit)
    s.exercised["ack-deadline"] += 1
    for seen in after:
        s.report(
            "ack-deadline",
            Finding(
                f"{seen.label} was sent {seen.at - first.at:.2f}s after {first.label} on the same connection, "
                "which was never acked nor closed: a late ack would be taken for this request",
                seen.where,
                received=seen.payload,
            ),
        )
    if conn.closed_at is not None:
        s.note(
            "ack-deadline",
            f"the node agent closed the connection {conn.closed_at - first.at:.2f}s after the unacked add",
        )
    elif not after:
        s.report(
            "ack-deadline",
            Finding(
                f"{first.label} has had no ack for {limit:g}s and the connection is still open: no deadline",
                first.where,
            ),
        )
    await s.close(conn)
    await s.settle(adds)
    again, entries, _ = await s.synced()
    named = _uids(entries)
    for pod in (held, queued):
        if pod.uid not in named:
            s.report(
                "ack-deadline",
                Finding(f"pod {pod.name} is not in the next connection's snapshot", again.name),
            )
    if held.uid in named and queued.uid in named:
        s.note("ack-deadline", "both pods were in the next connection's snapshot")
    await _remove_and_expect(s, again, [held, queued])
    await s.close(again)


async def fd_hygiene(s: AgentSession) -> None:
    """Many connect/add/remove/disconnect cycles; then the agent's fds must be back."""
    pid = s.agent_pid
    if pid is None or not _readable(pid):
        s.skipped["fd-hygiene"] = (
            "the node agent's fds cannot be read here (not local?): give --agent-pid PID"
            if pid is None
            else f"cannot read /proc/{pid}/fd"
        )
        return
    await _cycle(s)  # warm-up: the driver's own connection to the agent is made here
    before = _fds(pid)
    netns: dict[tuple[int, int], str] = {}
    for _ in range(s.options.cycles):
        pod = await _cycle(s)
        netns[pod.identity] = pod.name
    deadline = time.monotonic() + max(s.options.grace, 2.0)
    while True:
        after = _fds(pid)
        held = {
            fd: f"{target} (netns of removed pod {netns[ident]})"
            for fd, (target, ident) in after.items()
            if ident in netns
        }
        # Beyond the netns fds above: one more fd every other cycle is a leak (sockets, files).
        growth = len(after) - len(before) - len(held)
        if (not held and growth < s.options.cycles // 2) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    s.exercised["fd-hygiene"] += 1
    s.note("fd-hygiene", f"pid {pid}: {len(before)} fds before {s.options.cycles} cycles, {len(after)} after")
    if held:
        shown = sorted(held.items())
        s.report(
            "fd-hygiene",
            Finding(
                f"pid {pid} still holds {len(held)} fd(s) on the netns of removed pods after {s.options.cycles} cycles",
                detail=[f"fd {fd} -> {target}" for fd, target in shown[:10]]
                + ([f"... and {len(shown) - 10} more"] if len(shown) > 10 else []),
            ),
        )
    if growth >= s.options.cycles // 2:
        new = sorted(
            {t for t, _ in after.values()} - {t for t, _ in before.values()} - {after[fd][0] for fd in held}
        )
        s.report(
            "fd-hygiene",
            Finding(
                f"pid {pid} has {growth} more fds (besides netns ones) after {s.options.cycles} cycles "
                f"({len(before)} -> {len(after)})",
                detail=[f"new: {t}" for t in new[:10]],
            ),
        )


async def _cycle(s: AgentSession) -> CheckPod:
    """connect, snapshot, add a pod, remove it, disconnect."""
    conn, _, _ = await s.synced()
    pod = s.factory.make()
    adding = s.add(pod)
    await s.expect(conn, _is("add", pod.uid))
    await s.settle([adding])
    await _remove_and_expect(s, conn, [pod])
    await s.close(conn)
    return pod


async def _remove_and_expect(s: AgentSession, conn: StrictConnection, pods: list[CheckPod]) -> None:
    removals = [s.remove(p) for p in pods]
    for pod in pods:
        with contextlib.suppress(PeerClosed):
            await s.expect(conn, _is("del", pod.uid))
    await s.settle(removals)


def _readable(pid: int) -> bool:
    return os.path.isdir(f"/proc/{pid}/fd")


def _fds(pid: int) -> dict[int, tuple[str, tuple[int, int]]]:
    """Each fd of ``pid``: what it points to (readlink) and the identity of that file (a netns
    opened by path reads as its path, one from /proc as net:[INO]: only the identity says which)."""
    found = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{name}"
            with contextlib.suppress(OSError):
                st = os.stat(path)
                found[int(name)] = (os.readlink(path), (st.st_dev, st.st_ino))
    return found


def _driver_said(s: AgentSession) -> str:
    return "; ".join(s.actions[-2:]) or "the add has not finished"


SCENARIO_FUNCS = {
    "hello-wait": hello_wait,
    "exchange": exchange,
    "snapshot": snapshot,
    "two-connections": two_connections,
    "ack-deadline": ack_deadline,
    "fd-hygiene": fd_hygiene,
}
