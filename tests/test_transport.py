"""The SOCK_SEQPACKET transport: whole records, fds with close-on-exec, EOF; busy polling."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import pathlib
import resource
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator

import pytest

from tests.harness import skip_outside_ci
from zds import seqpacket
from zds.protocol.records import Record
from zds.seqpacket import recv_record
from zds.transport import BusyPoll, SeqpacketConnection

Pair = tuple[SeqpacketConnection, socket.socket]


@pytest.fixture(autouse=True)
def never_contended(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls as on an idle machine, whatever else runs beside the suite (a gauge with no
    numbers to read is never contended): the contention's own tests set theirs."""
    monkeypatch.setattr(seqpacket, "CPU_CONTENTION", seqpacket.CpuContention("/nonexistent/schedstat"))


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


def _one_cpu() -> bool:
    """Whether this thread may run on one CPU only (busy polling is off there)."""
    return len(os.sched_getaffinity(0)) < 2


def _sender(sock: socket.socket, release: int, *, once_asleep: bool) -> subprocess.Popen[bytes]:
    """Another process that sends one record on ``sock`` once a byte comes on the pipe
    ``release`` (and exits); ``once_asleep``: and then only once this thread sleeps (its
    /proc state S), so that the record comes while it waits for it."""
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "sys.stdout.write('up\\n'); sys.stdout.flush()\n"
        "os.read(int(sys.argv[2]), 1)\n"
        "stat = sys.argv[3]\n"
        "while stat and open(stat).read().rsplit(')', 1)[1].split()[0] != 'S':\n"
        "    pass\n"
        "s.send(b'\\x08\\x01')\n"
    )
    stat = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/stat" if once_asleep else ""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sock.fileno()), str(release), stat],
        pass_fds=[sock.fileno(), release],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def _reap(sender: subprocess.Popen[bytes]) -> None:
    """Wait for the sender to exit (it has sent); killed if it has not (the test failed)."""
    assert sender.stdout is not None
    sender.stdout.close()
    try:
        sender.wait(30)
    except subprocess.TimeoutExpired:
        sender.kill()
        sender.wait()
        raise


async def _wait_for_record(conn: SeqpacketConnection, busy: BusyPoll) -> tuple[bytes, int]:
    """As both ends wait: poll, else sleep until readable; the record and the sleeps it took."""
    before = _voluntary_switches()
    record = await busy.poll(conn)
    while record is None:
        assert await conn.wait_readable(30.0), "no record came"
        record = conn.try_recv()
    return record.payload, _voluntary_switches() - before


async def test_a_record_due_any_moment_is_read_without_sleeping(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, theirs = pair
    if _one_cpu():  # busy polling is off: the poll reads nothing, not even a record waiting
        theirs.send(b"\x08\x01")
        busy = BusyPoll(5.0, turn_every=10.0)
        assert busy.budget == 0.0 and await busy.poll(conn) is None
        return
    release_r, release_w = os.pipe()
    polls = conn.poll

    def poll_releasing(seconds: float) -> Record | None:
        os.write(release_w, b"x")  # the record is sent once the poll has begun
        return polls(seconds)

    monkeypatch.setattr(conn, "poll", poll_releasing)
    try:
        # Polling (budget 5 s) never blocked the thread: the record came while it polled.
        # (Another thread of the suite's asking for the interpreter's lock would make the poll
        # hand it over after the switch interval, and wait to have it back: a sleep of the
        # lock's, not the poll's. Not within the poll, here.)
        sender = _sender(theirs, release_r, once_asleep=False)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(30.0)
        try:
            payload, switches = await _wait_for_record(conn, BusyPoll(5.0, turn_every=10.0))
        finally:
            sys.setswitchinterval(interval)
            _reap(sender)
        assert payload == b"\x08\x01"
        assert switches == 0
        # Waiting in the loop (budget 0: no poll) did, and the measure tells: the record is
        # sent only once the thread sleeps.
        sender = _sender(theirs, release_r, once_asleep=True)
        try:
            busy = BusyPoll(0.0)
            assert await busy.poll(conn) is None
            os.write(release_w, b"x")
            payload, switches = await _wait_for_record(conn, busy)
        finally:
            _reap(sender)
        assert payload == b"\x08\x01"
        assert switches > 0
    finally:
        os.close(release_r)
        os.close(release_w)


async def test_a_poll_gives_up_after_its_budget_and_leaves_the_socket_as_it_was(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, theirs = pair
    busy = BusyPoll(0.02, turn_every=10.0)
    tries: list[socket.socket] = []
    if _one_cpu():  # off: returns at once, reads nothing
        assert busy.budget == 0.0
    else:
        # Its clock, read once for the deadline and once after each try, moves a quarter of
        # the budget a read: it gives up after exactly four tries, once the budget is spent.
        reads = itertools.count()

        def trying(sock: socket.socket) -> Record | None:
            tries.append(sock)
            return recv_record(sock)

        monkeypatch.setattr(
            seqpacket, "time", types.SimpleNamespace(monotonic=lambda: next(reads) * busy.budget / 4)
        )
        monkeypatch.setattr(seqpacket, "recv_record", trying)
    assert await busy.poll(conn) is None
    monkeypatch.undo()
    assert len(tries) == (0 if _one_cpu() else 4)
    theirs.send(b"\x08\x01")
    record = conn.try_recv()
    assert record is not None and record.payload == b"\x08\x01"
    assert await BusyPoll(0.0).poll(conn) is None  # off: returns at once, reads nothing


async def test_a_poll_lets_the_event_loop_take_its_turn_first_when_it_had_none_lately(pair: Pair) -> None:
    conn, theirs = pair
    loop = asyncio.get_running_loop()
    if _one_cpu():  # busy polling is off: the poll returns at once, without a turn
        loop.call_soon(theirs.send, b"first")
        assert await BusyPoll(5.0, turn_every=0.0).poll(conn) is None
        assert conn.try_recv() is None  # (the loop has not run the send)
        await asyncio.sleep(0)
        assert (record := conn.try_recv()) is not None and record.payload == b"first"
        return
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


async def test_while_the_peer_answers_slowly_the_loop_has_its_turn_before_every_poll(pair: Pair) -> None:
    conn, theirs = pair
    loop = asyncio.get_running_loop()
    busy = BusyPoll(5.0, turn_every=10.0, slow_peer=0.05)
    if _one_cpu():  # busy polling is off: no poll, no turn, nothing measured
        theirs.send(b"quick")
        assert busy.budget == 0.0 and await busy.poll(conn) is None and not busy.peer_slow
        return
    # A quick answer (there before the poll began): the next poll does not wait for a turn.
    # (Quick: under a minute, so that a stall of this thread between the poll's two clock
    # reads cannot make it slow.)
    busy.slow_peer = 60.0
    theirs.send(b"quick")
    assert (record := await busy.poll(conn)) is not None and record.payload == b"quick"
    assert not busy.peer_slow
    busy.slow_peer = 0.05
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


def _schedstat(path: str, run_delay_ns: int) -> None:
    """``/proc/thread-self/schedstat``'s three numbers, with ``run_delay_ns`` second."""
    with open(path, "w") as f:
        f.write(f"123456789 {run_delay_ns} 42\n")


def _made_up_gauge(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[seqpacket.CpuContention, str, list[float]]:
    """A gauge reading a schedstat file of ours (run-queue delay 0), on a clock of ours."""
    stat = str(tmp_path / "schedstat")
    _schedstat(stat, 0)
    now = [1000.0]
    monkeypatch.setattr(seqpacket, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return seqpacket.CpuContention(stat), stat, now


def test_polling_stops_while_the_thread_waits_for_a_cpu_and_starts_again_once_it_does_not(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gauge, stat, now = _made_up_gauge(tmp_path, monkeypatch)
    window = seqpacket.CpuContention.WINDOW

    def after(seconds: float, waited: float) -> bool:
        """The gauge's answer ``seconds`` on, the thread having waited ``waited`` windows of them."""
        with open(stat) as f:
            delay = int(f.read().split()[1])
        _schedstat(stat, delay + round(waited * window * 1e9))
        now[0] += seconds + 1e-6  # (a microsecond more: a float sum of windows may fall short of one)
        return gauge.contended()

    assert not gauge.contended()  # the first reading: nothing to compare it with yet
    assert not after(window, 0.09)  # under ON (10% of the window)
    assert after(window, 0.11)
    assert after(window / 2, 0.0)  # within the window: not read, the answer stands
    assert not after(window / 2, 0.0)  # read: no wait over the whole window
    assert after(window, 0.5)
    assert after(window, 0.04)  # contended it stays until a window under OFF (3%)
    assert not after(window, 0.02)
    assert not after(window, 0.05)  # not contended it stays until ON again
    assert not after(10.0, 0.5 / window)  # a long window (polls far apart): 0.5 s of 10 is 5%
    assert after(10.0, 1.1 / window)  # 11%
    # Where the kernel keeps no such numbers (no CONFIG_SCHED_INFO): never contended, and
    # not looked for again.
    os.unlink(stat)
    now[0] += window + 1e-6
    assert not gauge.contended()
    _schedstat(stat, 10**18)
    now[0] += window + 1e-6
    assert not gauge.contended()


def test_numbers_that_cannot_be_read_for_a_moment_leave_the_answer_as_it_was(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of fds for a moment (EMFILE: the node agent near its limit) is not a kernel without
    the numbers: the gauge keeps its answer and reads them again, not never again."""
    gauge, stat, now = _made_up_gauge(tmp_path, monkeypatch)
    window = seqpacket.CpuContention.WINDOW
    assert not gauge.contended()
    _schedstat(stat, round(0.5 * window * 1e9))
    now[0] += window + 1e-6
    assert gauge.contended()
    real_open = os.open

    def no_fds(path: str, flags: int) -> int:
        if path == stat:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags)

    monkeypatch.setattr(os, "open", no_fds)
    now[0] += window + 1e-6
    assert gauge.contended()  # the answer stands
    monkeypatch.setattr(os, "open", real_open)
    now[0] += window + 1e-6
    assert gauge.contended()  # read again: a fresh start, nothing to compare with yet
    now[0] += window + 1e-6
    assert not gauge.contended()  # no wait over that window
    _schedstat(stat, 10**9)
    now[0] += window + 1e-6
    assert gauge.contended()  # still read


def _spin_until(gauge: seqpacket.CpuContention, contended: bool, seconds: float) -> bool:
    """Keep this thread busy asking ``gauge`` until it says ``contended`` (True) or
    ``seconds`` have passed (False)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if gauge.contended() is contended:
            return True
    return False


def test_the_gauge_sees_this_thread_share_its_cpu_with_a_busy_process() -> None:
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    gauge = seqpacket.CpuContention()  # the kernel's numbers, for this thread
    if gauge._run_delay() is None:
        skip_outside_ci("this kernel keeps no run-queue delay (no CONFIG_SCHED_INFO): never contended")
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # (busy until killed, or until the suite is gone: not spinning for good after a kill -9)
            "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\n"
            "while os.getppid() == int(sys.argv[2]): pass",
            str(cpu),
            str(os.getpid()),
        ]
    )
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only (and the hog) on that CPU
        assert _spin_until(gauge, True, 30.0), "a CPU shared with a busy process was never seen contended"
    finally:
        hog.kill()
        hog.wait()
        os.sched_setaffinity(0, cpus)
    assert _spin_until(gauge, False, 30.0), "with the busy process gone, the thread was still seen waiting"


def test_a_poll_while_the_thread_waits_for_a_cpu_reads_once_and_gives_up(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn, theirs = pair
    monkeypatch.setattr(seqpacket, "CPU_CONTENTION", types.SimpleNamespace(contended=lambda: True))
    reads: list[socket.socket] = []

    def reading(sock: socket.socket) -> Record | None:
        reads.append(sock)
        return recv_record(sock)

    monkeypatch.setattr(seqpacket, "recv_record", reading)
    assert conn.poll(5.0) is None  # nothing there: one read, then given up (no 5 s poll)
    assert len(reads) == 1
    theirs.send(b"\x08\x01")
    record = conn.poll(5.0)  # what is there is read
    assert record is not None and record.payload == b"\x08\x01"


async def test_a_send_the_peer_has_no_room_for_gives_up_within_its_deadline(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that does not read (its queue full: the sender's buffer is spent) makes a send with
    ``within`` fail in that time, as Istio's node agent's write deadline; without it, the send waits."""
    conn, theirs = pair
    loop = asyncio.get_running_loop()
    deadlines: list[float | None] = []
    timeout_at = asyncio.timeout_at

    def noted(when: float | None) -> asyncio.Timeout:
        deadlines.append(when)
        return timeout_at(when)

    monkeypatch.setattr(asyncio, "timeout_at", noted)
    conn.socket.setblocking(False)
    filled = 0
    with pytest.raises(BlockingIOError):
        while True:
            conn.socket.send(b"\x0a\x00" * 100)
            filled += 1
    assert filled > 0
    start = loop.time()
    with pytest.raises(TimeoutError, match=r"^no room to write for 0.1s: the peer does not read$"):
        await conn.send(b"\x1a\x00", within=0.1)
    # One deadline, set as the send began (0.1 s from then), and waited for.
    [deadline, *again] = deadlines
    assert deadline is not None and all(other == deadline for other in again)
    assert start + 0.1 <= deadline < start + 0.15
    assert loop.time() >= deadline
    waiting = asyncio.ensure_future(conn.send(b"\x1a\x00"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    theirs.setblocking(False)
    for _ in range(filled):  # room again (a writer is woken once its buffer is 3/4 free)
        theirs.recv(1024)
    await asyncio.wait_for(waiting, 1.0)
    assert theirs.recv(1024) == b"\x1a\x00"  # (the one that timed out never went)
