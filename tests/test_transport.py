"""The SOCK_SEQPACKET transport: whole records, fds with close-on-exec, EOF; busy polling."""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest

from zds.transport import BusyPoll, SeqpacketConnection

Pair = tuple[SeqpacketConnection, socket.socket]


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A connected SOCK_SEQPACKET pair: ours driven by the transport, theirs a plain socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqpacketConnection(ours)
    try:
        yield conn, theirs
    finally:
        conn.close()
        theirs.close()


async def test_records_keep_their_boundaries_and_fds_arrive_close_on_exec() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqpacketConnection(ours)
    r, w = os.pipe()
    try:
        socket.send_fds(theirs, [b"\x08\x01"], [r])
        theirs.send(b"\x1a\x00")
        first = await conn.recv()
        second = await conn.recv()
        assert first.payload == b"\x08\x01" and len(first.fds) == 1
        assert fcntl.fcntl(first.fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(first.fds[0]).st_ino == os.fstat(r).st_ino
        assert second.payload == b"\x1a\x00" and second.fds == []
        first.close_fds()
        assert first.fds == []
        theirs.close()
        assert (await conn.recv()).is_eof
    finally:
        conn.close()
        theirs.close()
        os.close(r)
        os.close(w)


async def test_an_oversized_record_is_flagged_truncated(pair: Pair) -> None:
    conn, theirs = pair
    theirs.send(b"x" * 2000)
    record = await conn.recv()
    assert record.truncated and len(record.payload) == 1024 and not record.is_eof


# -- BusyPoll: an answer due any moment is read without sleeping -------------------------


def _voluntary_switches() -> int:
    """How often this thread blocked (slept) so far: RUSAGE_THREAD's ru_nvcsw."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _sender(sock: socket.socket, delay: float) -> subprocess.Popen[bytes]:
    """Another process that sends one record on ``sock`` after ``delay`` seconds (and exits)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "sys.stdout.write('up\\n'); sys.stdout.flush()\n"
        f"time.sleep({delay})\n"
        "s.send(b'\\x08\\x01')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sock.fileno())], pass_fds=[sock.fileno()], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


async def _wait_for_record(conn: SeqpacketConnection, busy: BusyPoll) -> tuple[bytes, int]:
    """As both ends wait: poll, else sleep until readable; the record and the sleeps it took."""
    before = _voluntary_switches()
    record = await busy.poll(conn)
    while record is None:
        await conn.wait_readable(5.0)
        record = conn.try_recv()
    return record.payload, _voluntary_switches() - before


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy polling is off on one CPU")
async def test_a_record_due_any_moment_is_read_without_sleeping(pair: Pair) -> None:
    conn, theirs = pair
    for budget, sleeps in ((5.0, False), (0.0, True)):
        sender = _sender(theirs, 0.05)
        try:
            payload, switches = await _wait_for_record(conn, BusyPoll(budget, turn_every=10.0))
        finally:
            sender.wait(30)
        assert payload == b"\x08\x01"
        # Polling never blocked the thread; waiting in the loop did (the measure can tell).
        assert (switches > 0) is sleeps, (budget, switches)


async def test_a_poll_gives_up_after_its_budget_and_leaves_the_socket_as_it_was(pair: Pair) -> None:
    conn, theirs = pair
    busy = BusyPoll(0.02, turn_every=10.0)
    started = time.monotonic()
    assert await busy.poll(conn) is None
    assert time.monotonic() - started >= busy.budget
    theirs.send(b"\x08\x01")
    record = conn.try_recv()
    assert record is not None and record.payload == b"\x08\x01"
    assert await BusyPoll(0.0).poll(conn) is None  # off: returns at once, reads nothing


async def test_a_poll_lets_the_event_loop_take_its_turn_first_when_it_had_none_lately(pair: Pair) -> None:
    conn, theirs = pair
    loop = asyncio.get_running_loop()
    # The loop had a turn just now (turn_every 10 s): the poll keeps it waiting, so what
    # the loop would have sent comes only after the poll gave up.
    loop.call_soon(theirs.send, b"first")
    assert await BusyPoll(0.02, turn_every=10.0).poll(conn) is None
    await asyncio.sleep(0)
    assert (record := conn.try_recv()) is not None and record.payload == b"first"
    # Its turn is due (turn_every 0): the loop runs the send first, the poll reads it.
    loop.call_soon(theirs.send, b"second")
    record = await BusyPoll(5.0, turn_every=0.0).poll(conn)
    assert record is not None and record.payload == b"second"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy polling is off on one CPU")
async def test_while_the_peer_answers_slowly_the_loop_has_its_turn_before_every_poll(pair: Pair) -> None:
    conn, theirs = pair
    loop = asyncio.get_running_loop()
    busy = BusyPoll(5.0, turn_every=10.0, slow_peer=0.05)
    # A quick answer (there before the poll began): the next poll does not wait for a turn.
    theirs.send(b"quick")
    assert (record := await busy.poll(conn)) is not None and record.payload == b"quick"
    assert not busy.peer_slow
    # A slow one (another thread sends it 0.2 s on, longer than slow_peer): the peer is slow...
    sender = threading.Timer(0.2, theirs.send, (b"slow",))
    sender.start()
    try:
        record = await busy.poll(conn)
    finally:
        sender.join()
    assert record is not None and record.payload == b"slow"
    assert busy.peer_slow
    # ...so the next poll lets the loop run first although it had a turn just now: what the
    # loop would send comes in at once, and, having come during the turn, says nothing
    # about the peer's speed.
    loop.call_soon(theirs.send, b"after a turn")
    assert (record := await busy.poll(conn)) is not None and record.payload == b"after a turn"
    assert not busy.peer_slow
    # Not slow, a turn not due: the poll keeps the loop waiting, as before.
    loop.call_soon(theirs.send, b"waits")
    assert await BusyPoll(0.02, turn_every=10.0, slow_peer=0.05).poll(conn) is None
    await asyncio.sleep(0)
    assert (record := conn.try_recv()) is not None and record.payload == b"waits"
    # Nothing came within the budget (an idle peer): the caller sleeps, and the next poll,
    # whenever it comes, has its turn first.
    idle = BusyPoll(0.02, turn_every=10.0, slow_peer=0.05)
    assert await idle.poll(conn) is None and idle.peer_slow


def test_busy_polling_is_off_where_the_thread_may_use_one_cpu_only() -> None:
    cpus = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        assert BusyPoll(0.001).budget == 0.0
    finally:
        os.sched_setaffinity(0, cpus)
    assert BusyPoll(0.001).budget == (0.001 if len(cpus) > 1 else 0.0)
