"""Records on a connected AF_UNIX SOCK_SEQPACKET socket: one system call each, no event loop.

``zds.transport`` drives these from asyncio; ``zds ztunnel`` also calls them as they are
to take its first snapshot before asyncio is loaded (``zds.client.session``).
"""

from __future__ import annotations

import array
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
#: them: "Expected 1 FD, got 2".
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
    never sleeps (see ``zds.transport.BusyPoll`` for why a side polls)."""
    until = time.monotonic() + seconds
    while True:
        record = recv_record(sock)
        if record is not None or time.monotonic() >= until:
            return record


def poll_budget(seconds: float) -> float:
    """How long a side may poll for its peer's next message: ``seconds``, or 0 where the
    process may run on one CPU only (polling there would keep the CPU from the peer)."""
    return seconds if seconds > 0.0 and len(os.sched_getaffinity(0)) > 1 else 0.0
