"""The bad records of DESIGN §1's table, sent to the ztunnel under test one per connection:
which are refused with ``failure to read message : ...`` and a reconnect at once, which with
``failure to process message : ProtocolError(...)`` and a stop for good, and the 0-byte record
ztunnel reads as EOF.
"""

from __future__ import annotations

import os

from zds.check.report import Finding
from zds.check.ztbench import Bench, ZtunnelGone
from zds.check.ztconn import ZtConn
from zds.check.ztsteps import (
    NO_PAYLOAD,
    PADDING,
    SNAPSHOT_SENT,
    UNDECODABLE,
    Entry,
    add,
    delete,
    expect_nack,
    fds_said,
    keep,
    open_fd,
    said,
)
from zds.protocol.messages import AddWorkload, DelWorkload, WorkloadInfo, encode_request
from zds.protocol.reading import PROCESS_FAILURE, READ_FAILURE


async def _refused(
    b: Bench, name: str, conn: ZtConn, entry: Entry, what: str, prefix: str = READ_FAILURE
) -> tuple[str, float] | None:
    """Send ``entry``; it must be nacked with ``prefix``, the connection closed, and ztunnel back at once:
    the nack's text and how soon it was back, when all that was seen (else None)."""
    payload, fds = entry
    with_fds = _fds_of(fds)
    reply = await conn.request(payload, fds, check=name)
    b.exercised[name] += 1
    nacked = expect_nack(b, name, conn, reply, payload, prefix, with_fds)
    if not await conn.closed_within(b.options.timeout):
        b.report(
            name,
            Finding(
                f"after {what}, the connection is still open {b.options.timeout:g}s later; ztunnel closes it",
                conn.name,
                sent=payload,
            ),
        )
        return None
    back = await b.accept(b.options.timeout)
    if back is None:
        b.report(
            name,
            Finding(
                f"after {what}, no reconnect within {b.options.timeout:g}s; ztunnel connects again at once",
                conn.name,
            ),
        )
        return None
    if back.accepted_at - (conn.closed_at or back.accepted_at) > b.options.grace:
        b.report(
            name,
            Finding(
                f"after {what}, back only {_since(back.accepted_at, conn.closed_at)} after the close; "
                "ztunnel connects again at once (it waits only when a connect fails: 20 ms, doubling)",
                conn.name,
            ),
        )
    elif nacked and reply is not None and reply.ack is not None:
        if conn.closed_at is None:
            b.note(name, what)
            return None
        b.note(
            name,
            f"{what}: nacked {reply.ack.error!r}, closed, back {_since(back.accepted_at, conn.closed_at)} later",
        )
        return reply.ack.error, _seconds(back.accepted_at, conn.closed_at)
    return None


def _refused_together(b: Bench, name: str, what: str, outcomes: list[tuple[str, float] | None]) -> None:
    """One line, first among the notes (the one the summary shows), for a check that had several
    records refused, when each was as it must be; each record's own note stays after it."""
    if b.findings.get(name) or any(o is None for o in outcomes):
        return
    done = [outcome for outcome in outcomes if outcome is not None]
    errors = list(dict.fromkeys(error for error, _ in done))
    nacked = f"each nacked {errors[0]!r}" if len(errors) == 1 else "nacked " + ", ".join(map(repr, errors))
    times = {_ms(took) for _, took in done}
    back = (
        f"back {times.pop()} later"
        if len(times) == 1
        else f"back at most {_ms(max(t for _, t in done))} later"
    )
    b.notes[name].insert(0, f"{what}: {nacked}, closed, {back}")


def _fds_of(fds: list[int]) -> str:
    """What went with a record, for a finding: "2 fds: /run/netns/zdsck-1, /run/netns/zdsck-1"."""
    return fds_said([os.readlink(f"/proc/self/fd/{fd}") for fd in fds])


def _since(later: float, earlier: float | None) -> str:
    """A short time between two events, as seen here (a reconnect can be accepted before the
    reader has seen the EOF that came first: never negative)."""
    return _ms(_seconds(later, earlier))


def _seconds(later: float, earlier: float | None) -> float:
    return max(0.0, later - (earlier or later))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def oversize_record(b: Bench) -> None:
    conn = await b.fresh([])
    await _refused(
        b,
        "oversize-record",
        conn,
        (encode_request(DelWorkload("zds-check-oversize")) + PADDING, []),
        "a 1125-byte DelWorkload",
    )


async def undecodable_record(b: Bench) -> None:
    conn = await b.fresh([])
    await _refused(b, "undecodable-record", conn, (UNDECODABLE, []), "3 bytes that are not protobuf")


async def no_payload(b: Bench) -> None:
    conn = await b.fresh([])
    await _refused(b, "no-payload", conn, (NO_PAYLOAD, []), "a WorkloadRequest with no payload")


async def add_without_fd(b: Bench) -> None:
    conn = await b.fresh([])
    payload = encode_request(AddWorkload("zds-check-no-fd", WorkloadInfo("no-fd", "zds-check", "zds-check")))
    await _refused(b, "add-without-fd", conn, (payload, []), "an AddWorkload without fd")


async def add_with_two_fds(b: Bench) -> None:
    pod = b.pods.make()
    conn = await b.fresh([])
    payload, fds = add(pod)
    await _refused(
        b, "add-with-two-fds", conn, (payload, [*fds, open_fd(pod.netns)]), "an AddWorkload with two fds"
    )


async def fd_on_non_add(b: Bench) -> None:
    name = "fd-on-non-add"
    conn = await b.fresh([])
    on_del = await _refused(
        b, name, conn, delete("zds-check-fd", [open_fd("/dev/null")]), "a DelWorkload with an fd"
    )
    conn = await b.fresh(None)
    on_keep = await _refused(
        b, name, conn, keep("zds-check-fd", [open_fd("/dev/null")]), "a KeepWorkload with an fd"
    )
    conn = await b.fresh(None)
    on_snapshot = await _refused(
        b, name, conn, (SNAPSHOT_SENT, [open_fd("/dev/null")]), "a SnapshotSent with an fd"
    )
    _refused_together(b, name, "a Del, a Keep and a SnapshotSent with an fd", [on_del, on_keep, on_snapshot])


async def empty_record(b: Bench) -> None:
    conn = await b.fresh([])
    await conn.send(b"")
    reply = await conn.reply(b.options.grace)
    b.exercised["empty-record"] += 1
    if reply is not None:
        b.report(
            "empty-record",
            Finding(
                f"a 0-byte record was answered with {said(reply)}; ztunnel reads it as EOF",
                conn.name,
                sent=b"",
                received=reply.payload,
            ),
        )
    if not await conn.closed_within(b.options.timeout):
        b.report(
            "empty-record",
            Finding(
                f"the connection is still open {b.options.timeout:g}s after a 0-byte record (EOF)",
                conn.name,
                sent=b"",
            ),
        )
        return
    back = await b.accept(b.options.timeout)
    if back is None:
        b.report(
            "empty-record",
            Finding(f"no reconnect within {b.options.timeout:g}s after the 0-byte record", conn.name),
        )
    elif reply is None:
        b.note("empty-record", f"no answer, closed, back {_since(back.accepted_at, conn.closed_at)} later")


async def speaks_only_when_asked(b: Bench) -> None:
    conn = await b.fresh([])
    await conn.reply(b.options.grace)  # anything arriving now is unasked: the reader reports it
    b.exercised["speaks-only-when-asked"] += 1
    b.note(
        "speaks-only-when-asked",
        f"watched {b.options.grace:g}s after {conn.name}'s snapshot, and after every answer of the run",
    )


# -- ProtocolErrors: the in-pod manager stops for good ---------------------------------------------
async def _stops(b: Bench, name: str, conn: ZtConn, entry: Entry, what: str) -> None:
    payload, fds = entry
    with_fds = _fds_of(fds)
    reply = await conn.request(payload, fds, check=name)
    b.exercised[name] += 1
    if (
        expect_nack(b, name, conn, reply, payload, PROCESS_FAILURE, with_fds)
        and reply
        and reply.ack
        and "ProtocolError" not in reply.ack.error
    ):
        b.report(
            name,
            Finding(
                f"the nack does not name a ProtocolError: {reply.ack.error!r}",
                conn.name,
                received=reply.payload,
            ),
        )
    if not await conn.closed_within(b.options.timeout):
        b.report(
            name,
            Finding(
                f"after {what}, the connection is still open {b.options.timeout:g}s later",
                conn.name,
                sent=payload,
            ),
        )
    again = await b.after_stop(conn)
    if again is not None and not b.restarted(conn, again):
        b.report(
            name,
            Finding(
                f"after {what}, ztunnel connected again ({again.name}{_pid_said(again)}); "
                "a ProtocolError stops it for good",
                conn.name,
            ),
        )
        return
    nacked = f"{what}: nacked {reply.ack.error if reply and reply.ack else ''!r}"
    if again is not None:  # (a supervisor's quick restart is no reconnect: the same process is not back)
        b.note(name, f"{nacked}; pid {conn.pid} exited and pid {again.pid} connected ({again.name})")
        return
    status = await b.exited(b.options.timeout)
    # (without --cmd: the process that had the connection, if known, waited for by after_stop)
    running = status is None and (bool(b.options.cmd) or b.alive(conn.pid))
    if running or status == 0:
        b.report(
            name,
            Finding(
                f"after {what}, "
                + ("still running" if running else "exited with status 0")
                + f" {b.options.timeout:g}s later; a ProtocolError stops ztunnel, which exits 1",
                conn.name,
            ),
        )
    b.note(
        name, f"{nacked}; no reconnect" + (f"; it exited with status {status}" if status is not None else "")
    )
    b.exits.append(f"{name}: exit status {status}")
    b.stopped = (name, conn)


async def restart(b: Bench) -> None:
    """After a stop for good, before the next check: start the ztunnel again (--cmd), or wait for
    whoever restarts it — and a connection from the very process that stopped is a reconnect."""
    assert b.stopped is not None
    (name, old), b.stopped = b.stopped, None
    b.current = None
    if b.options.cmd:
        await b.stop_process()
        await b.launch()
    back = await b.accept(b.options.connect_timeout)
    if back is None:
        raise ZtunnelGone(
            f"the ztunnel did not connect again within {b.options.connect_timeout:g}s after it stopped for good"
            + ("" if b.options.cmd else " (restart it, or let zds do it with --cmd)")
        )
    if not b.options.cmd and old.pid and back.pid == old.pid:
        b.report(
            name,
            Finding(
                f"the process that stopped for good (pid {old.pid}) connected again later ({back.name}); "
                "a ProtocolError stops it for good",
                old.name,
            ),
        )


def _pid_said(conn: ZtConn) -> str:
    return f", pid {conn.pid}" if conn.pid else ""


async def add_without_workload_info(b: Bench) -> None:
    pod = b.pods.make()
    conn = await b.fresh([])
    await _stops(
        b, "add-without-workload-info", conn, add(pod, info=False), "an AddWorkload without workload_info"
    )


async def keep_after_snapshot(b: Bench) -> None:
    conn = await b.fresh([])
    await _stops(
        b, "keep-after-snapshot", conn, keep("zds-check-late-keep"), "a KeepWorkload after SnapshotSent"
    )


async def second_snapshot_sent(b: Bench) -> None:
    conn = await b.fresh([])
    await _stops(b, "second-snapshot-sent", conn, (SNAPSHOT_SENT, []), "a second SnapshotSent")
