"""asyncio SOCK_SEQPACKET transport with SCM_RIGHTS, shared by both ends.

Thin and boring on purpose: it moves whole records (payload + fds + flags)
between a unix socket and the sans-I/O protocol objects; it decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
import time
from typing import NamedTuple

from zds import defaults
from zds.errors import ZdsError
from zds.protocol.records import Record
from zds.seqpacket import poll_budget, poll_record, recv_record, send_record
from zds.values import frozen


@frozen
class PeerCredentials(NamedTuple):
    """``SO_PEERCRED`` of a unix socket peer, and its supplementary groups (``SO_PEERGROUPS``)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


#: SO_PEERGROUPS (Linux >= 4.13; not in Python 3.11's socket module): asm-generic/socket.h's,
#: but sparc's and parisc's own (on sparc 59 is another option).
SO_PEERGROUPS = {"sparc": 0x3D, "parisc": 0x4034}.get(os.uname().machine.rstrip("0123456789"), 59)
#: The largest buffer Python's getsockopt takes (1024 bytes: 256 groups); a peer in more is
#: asked through libc with room for NGROUPS_MAX.
_GROUPS_AT_ONCE = 256
#: struct ucred: pid_t, and uid_t and gid_t unsigned (a gid past 2**31 is that number, as
#: in the groups and in --allow-gid).
_UCRED = struct.Struct("iII")
_NGROUPS_MAX = 65_536


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """``SO_PEERCRED`` of a connected unix socket: who is at the other end, in the kernel's
    words (None if it cannot say), with the groups it was in when it connected (none where the
    kernel cannot say)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _GROUPS_AT_ONCE)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            return ()  # (a kernel without the option)
        raw = _many_peer_groups(sock.fileno())
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _many_peer_groups(fd: int) -> bytes:
    """SO_PEERGROUPS of a peer in more groups than Python's getsockopt has room for."""
    import ctypes

    size = ctypes.c_uint32(4 * _NGROUPS_MAX)
    buffer = ctypes.create_string_buffer(size.value)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) != 0:
        return b""
    return buffer.raw[: size.value]


class SeqpacketConnection:
    """A connected, non-blocking AF_UNIX SOCK_SEQPACKET socket driven by the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        #: The fd the loop watches for reading (-1: none) and who waits for it.
        self._reading = -1
        self._waiter: asyncio.Future[bool] | None = None

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def peer_credentials(self) -> PeerCredentials | None:
        return peer_credentials(self._sock)

    def try_recv(self, max_size: int = defaults.MAX_MESSAGE_SIZE) -> Record | None:
        """Read one record if one is waiting; None if nothing is (never blocks)."""
        return recv_record(self._sock, max_size)

    def poll(self, seconds: float) -> Record | None:
        """Read one record, asking again until one is there or ``seconds`` have passed
        (None; asked once while the thread waits for a CPU: ``seqpacket.CpuContention``);
        never sleeps, never lets the event loop run (``BusyPoll`` does)."""
        return poll_record(self._sock, seconds)

    async def recv(self, max_size: int = defaults.MAX_MESSAGE_SIZE) -> Record:
        """Wait for one record. A 0-byte record (``is_eof``) means the peer is gone."""
        while True:
            record = self.try_recv(max_size)
            if record is not None:
                return record
            await self._wait(readable=True)

    async def send(
        self, payload: bytes, fds: list[int] | tuple[int, ...] = (), *, within: float | None = None
    ) -> None:
        """Send one record, with ``fds`` as SCM_RIGHTS on the same sendmsg. ``within``: while the
        peer's queue is full (it does not read), wait at most that long for room, then
        TimeoutError (Istio's node agent sets a 5 s write deadline on each send)."""
        deadline = None if within is None else self._loop.time() + within
        while True:
            try:
                send_record(self._sock, payload, fds)
                return
            except (BlockingIOError, InterruptedError):
                pass
            try:
                async with asyncio.timeout_at(deadline):  # (None: no deadline)
                    await self._wait(readable=False)
            except TimeoutError:
                if within is None:  # (not our deadline's: there is none)
                    raise
                # (asyncio's own has no words: a caller that reports OSErrors says these)
                raise TimeoutError(f"no room to write for {within:g}s: the peer does not read") from None

    async def wait_readable(self, within: float | None = None) -> bool:
        """Until a record (or EOF) can be read: True; False if ``within`` seconds passed first.

        The hot path of both ends (``try_recv`` first, this only when nothing is waiting):
        one future, no task, and the socket stays registered with the loop between waits
        (registering and unregistering it for every message cost several syscalls each)."""
        fd = self._sock.fileno()
        if fd < 0:
            raise ConnectionError("socket is closed")
        loop = self._loop
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiter = fut
        if self._reading != fd:
            self._stop_reading()
            loop.add_reader(fd, self._readable)
            self._reading = fd
        timer = loop.call_later(within, _resolve, fut, False) if within is not None else None
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiter is fut:
                self._waiter = None

    def wake(self) -> bool:
        """End a ``wait_readable`` now (it returns False); False if nobody was waiting."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return False
        waiter.set_result(False)
        return True

    def _readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            # Nobody waits (the record is read later): stop watching until someone does, or a
            # level-triggered loop would call this again on every turn.
            self._stop_reading()
        elif not waiter.done():
            waiter.set_result(True)

    def _stop_reading(self) -> None:
        if self._reading >= 0:
            self._loop.remove_reader(self._reading)
            self._reading = -1

    async def _wait(self, *, readable: bool) -> None:
        if readable:
            await self.wait_readable()
            return
        fd = self._sock.fileno()
        if fd < 0:
            raise ConnectionError("socket is closed")
        fut: asyncio.Future[bool] = self._loop.create_future()
        self._loop.add_writer(fd, _resolve, fut, True)
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._stop_reading()
        self._reading = -1
        self._sock.close()


class BusyPoll:
    """Wait for a record due any moment by asking the socket for it, not by sleeping.

    ZDS is one message at a time: each side sends, then waits for the other's answer. A side
    asleep in the event loop's poll is woken by the sender's kernel through the scheduler, and
    on a virtual machine waking another CPU is an interrupt through the hypervisor: tens of
    microseconds on every hop, more than the message's own work (measured: README
    "Performance"). Go's scheduler spins for a while before it parks a thread for the same
    reason; zds polls the socket for up to ``budget`` seconds, then sleeps as before.

    Fair to the rest of the process: a poll first lets the event loop have a turn when it
    had none for ``turn_every`` seconds. Off (budget 0) where the process may run on one CPU only:
    polling there would only keep the CPU from the peer it waits for; for the same reason
    paused while other work keeps this thread waiting for a CPU (``seqpacket.CpuContention``).

    While the peer's answers take ``slow_peer`` seconds or more (ztunnel opening a pod's
    sockets: ~150 us), the loop has its turn before the poll: what waits there (the node
    agent's next enrollments, the ztunnel side's proxies of the last pod) is done while the
    peer works instead of after. While they come sooner (a ZDS exchange alone: ~20 us), a
    turn before every poll would only delay the next message by the turn's own work. An
    answer that came during the turn says only that the turn took longer than the peer:
    the next poll goes without a turn and measures the peer again (with much work waiting,
    every other poll has a turn; taken for slow then, a quick peer would wait on every turn).
    """

    def __init__(
        self,
        budget: float = defaults.BUSY_POLL,
        *,
        turn_every: float = defaults.BUSY_POLL_SLICE,
        slow_peer: float = defaults.BUSY_POLL_SLOW_PEER,
    ) -> None:
        self.budget = poll_budget(budget)
        self.turn_every = turn_every
        self.slow_peer = slow_peer
        #: When the event loop last had a turn (as far as this poller knows).
        self._turn = time.monotonic()
        #: Whether the peer's last answer measured took ``slow_peer`` or more, or none came
        #: within the budget (the peer idle: a turn before the next poll costs nothing).
        self.peer_slow = False

    async def poll(self, conn: SeqpacketConnection) -> Record | None:
        """The next record if it comes within the budget; None if it did not (sleep then)."""
        if not self.budget:
            return None
        now = time.monotonic()
        if self.peer_slow or now - self._turn >= self.turn_every:
            self._turn = now
            await asyncio.sleep(0)  # the loop's turn: timers, other sockets, logs, work waiting
            record = conn.try_recv()
            if record is not None:
                # It came during the turn: how long the peer took is not known, and a peer
                # that is quick would be kept waiting by a turn before every message.
                self.peer_slow = False
                return record
        record = conn.poll(self.budget)
        end = time.monotonic()
        if record is None:
            self._turn = end  # the caller sleeps in the loop now
        self.peer_slow = record is None or end - now >= self.slow_peer
        return record


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def bind_unix_listener(
    path: str, *, mode: int, kind: int = socket.SOCK_SEQPACKET, backlog: int = 128
) -> socket.socket:
    """Bind a listening unix socket at ``path``: make the parent directory, restrict the
    file's mode. Whatever is at ``path`` already stays (the bind fails): clearing a stale
    socket is the caller's decision (``clear_socket_path``)."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o750, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        # Create the file with the final mode already (no window where it is wider).
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class SocketPathTaken(ZdsError):
    """Something that is not a stale socket is where a socket is to be bound; the message says what."""


@frozen
class SocketFile(NamedTuple):
    """A socket file this process bound: its path and the identity of the inode it made."""

    path: str
    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> SocketFile:
        st = os.lstat(path)
        return cls(path, st.st_dev, st.st_ino)

    def remove(self) -> bool:
        """Unlink the path only if it is still our socket (not one another agent made since)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != (self.dev, self.ino) or not stat.S_ISSOCK(st.st_mode):
            return False
        os.unlink(self.path)
        return True


def clear_socket_path(path: str) -> None:
    """Make room for a socket at ``path``: remove a stale socket, one nothing answers on (left
    by a crashed process: a node agent holds the path's lock, so no live zds serves it); refuse a
    socket something else still serves (another program's, Istio's node agent's) and anything
    that is not a socket."""
    if not refuse_non_socket(path):
        return
    if _answered(path):
        raise SocketPathTaken(
            f"{path} is a socket another program serves; refusing to replace it (stop that "
            "program, or choose another path)"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def refuse_non_socket(path: str) -> bool:
    """SocketPathTaken if ``path`` holds anything but a socket (a file, a directory, a
    symlink); whether it holds a socket."""
    try:
        st = os.lstat(path)
    except OSError:  # (nothing there, or its directory is not one: what binds it will say)
        return False
    if stat.S_ISSOCK(st.st_mode):
        return True
    kind = (
        "a directory"
        if stat.S_ISDIR(st.st_mode)
        else "a symlink"
        if stat.S_ISLNK(st.st_mode)
        else "not a socket"
    )
    raise SocketPathTaken(
        f"{path} is {kind}; refusing to replace it with a socket (remove it yourself if it is stale, "
        "or choose another path)"
    )


def _answered(path: str) -> bool:
    """Something listens on the unix socket at ``path``: a connect is not refused. A listener
    of another socket type answers too (EPROTOTYPE); one that cannot be told is taken as live."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # EPROTOTYPE (a listener of another type), EAGAIN (its backlog full), ...
    finally:
        probe.close()
    return True


async def accept(listener: socket.socket) -> SeqpacketConnection:
    """Accept one connection on a listening SOCK_SEQPACKET socket."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(listener)
    return SeqpacketConnection(conn)


async def connect(path: str) -> SeqpacketConnection:
    """Connect to a SOCK_SEQPACKET listener at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return SeqpacketConnection(sock)
