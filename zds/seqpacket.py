"""Records on a connected AF_UNIX SOCK_SEQPACKET socket: one system call each, no event loop.

``zds.transport`` drives these from asyncio; ``zds ztunnel`` also calls them as they are
to take its first snapshot before asyncio is loaded (``zds.client.session``).
"""

from __future__ import annotations

import array
import math
import os
import select
import socket
import time

from zds import defaults
from zds.protocol.records import Record

# Flags as plain ints: or-ing socket's IntFlag members costs microseconds per call.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

_FD_SIZE = array.array("i").itemsize
#: Room for fds in one received record: ztunnel's (``cmsg_space!(RawFd)`` in protocol.rs),
#: which alignment makes room for two on 64-bit. Three or more come as two, the record
#: flagged MSG_CTRUNC (the kernel closes the rest), and are refused as ztunnel refuses
#: them: its nix (0.31) will not read a cut control buffer, "ENOBUFS: No buffer space available".
_CMSG_SPACE = socket.CMSG_SPACE(_FD_SIZE)


def recv_record(sock: socket.socket, max_size: int = defaults.MAX_MESSAGE_SIZE) -> Record | None:
    """Read one record if one is waiting; None if nothing is (never blocks). A 0-byte record
    (``is_eof``) means the peer is gone."""
    try:
        # recvmsg itself: socket.recv_fds (3.11) drops MSG_CMSG_CLOEXEC from its flags.
        payload, ancdata, flags, _addr = sock.recvmsg(max_size, _CMSG_SPACE, _RECV_FLAGS)
    except (BlockingIOError, InterruptedError):
        return None
    except ConnectionResetError:
        return Record(payload=b"")
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return Record(payload=payload, fds=fds, flags=flags)


def peer_hung_up(sock: socket.socket) -> bool:
    """The peer closed (POLLRDHUP): a 0-byte read was its EOF, not a 0-byte record (which
    shows no POLLRDHUP; ztunnel would take it for EOF all the same)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def sent_empty(sock: socket.socket, record: Record) -> bool:
    """Whether a 0-byte ``record`` is one the peer sent, not its close: one with fds or
    flags (an EOF carries none), or one while the peer's end is still open (no POLLRDHUP).
    False for a record with bytes."""
    if record.payload:
        return False
    return not record.is_eof or not peer_hung_up(sock)


def send_record(sock: socket.socket, payload: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one record, with ``fds`` as SCM_RIGHTS on the same sendmsg; never blocks
    (BlockingIOError when the socket cannot take it now)."""
    if not payload:
        # ztunnel reads a 0-byte record as EOF; the protocol never sends one.
        raise ValueError("refusing to send an empty record")
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], _SEND_FLAGS)
    else:
        sock.send(payload, _SEND_FLAGS)


def poll_record(sock: socket.socket, seconds: float) -> Record | None:
    """Read one record, asking again until one is there or ``seconds`` have passed (None);
    never sleeps (see ``zds.transport.BusyPoll`` for why a side polls). Not at all (None at
    once) while other work keeps this thread from a CPU (``CPU_CONTENTION``)."""
    if CPU_CONTENTION.contended():
        return recv_record(sock)
    until = time.monotonic() + seconds
    while True:
        record = recv_record(sock)
        if record is not None or time.monotonic() >= until:
            return record


class CpuContention:
    """Whether this thread waits for a CPU: the share of the time since the last reading (``WINDOW``
    seconds or more before) it spent runnable but not running (the kernel's run-queue delay,
    ``/proc/thread-self/schedstat``).

    Polling pays only while the peer has a CPU of its own to answer on. On a machine busy
    with other work the two sides and that work take turns on the CPUs, and a side that
    polls spends its turns asking for an answer its peer has no CPU to write (on 2 vCPUs
    with one CPU kept busy by another program, live 1,000 pods took 3.5-3.8x and the
    1,000-pod snapshot 3-5x as long as Istio's pair: ``bench/results/busy-2026-12-05.md``).
    So a side stops polling once a window saw it wait ``ON`` of the time or more, and starts
    again once one saw it wait less than ``OFF`` (zds's processes alone on the machine wait
    ~1-2%, under such a program 15-30%). Read at most once a window (three system calls,
    ~5 us); where the kernel keeps no such numbers (no ``CONFIG_SCHED_INFO``), never
    contended. The numbers are the calling thread's: every poll of a process is on one
    thread (the event loop's; the ztunnel side's first snapshot, before it, on the same).
    """

    WINDOW = 0.005
    ON = 0.10
    OFF = 0.03

    def __init__(self, path: str = "/proc/thread-self/schedstat") -> None:
        self.path = path
        #: When the run-queue delay was last read, and what it was (None: no reading to compare with).
        self._at = -math.inf
        self._delay: int | None = None
        self._contended = False

    def contended(self) -> bool:
        now = time.monotonic()
        if now - self._at < self.WINDOW:
            return self._contended
        try:
            delay = self._run_delay()
        except OSError:
            # Not now (out of fds for a moment: EMFILE, ENFILE, ENOMEM): the answer stands, and
            # a window on the numbers are read again, from a fresh start.
            self._at, self._delay = now, None
            return self._contended
        if delay is None:
            self._contended = False
            self._at = math.inf  # (never read again)
            return False
        if self._delay is not None:
            share = (delay - self._delay) / 1e9 / (now - self._at)
            self._contended = share >= (self.OFF if self._contended else self.ON)
        self._at, self._delay = now, delay
        return self._contended

    def _run_delay(self) -> int | None:
        """Nanoseconds this thread has waited on a run queue so far; None if the kernel keeps
        no such numbers (no file there, or not these); OSError if they cannot be read now."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        try:
            return int(os.read(fd, 128).split()[1])
        except (ValueError, IndexError):
            return None
        finally:
            os.close(fd)


#: The gauge ``poll_record`` asks, one a process.
CPU_CONTENTION = CpuContention()


def poll_budget(seconds: float) -> float:
    """How long a side may poll for its peer's next message: ``seconds``, or 0 where the
    process may run on one CPU only (polling there would keep the CPU from the peer)."""
    return seconds if seconds > 0.0 and len(os.sched_getaffinity(0)) > 1 else 0.0
