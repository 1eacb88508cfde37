"""Enter a network namespace and come back: inline for socket creation, or in a worker thread.

Namespaces are per *thread*: ``in_netns`` moves only the calling thread and
always brings it back, like ztunnel's ``InpodNetns::run``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from .errors import NetnsError
from .handle import NetnsHandle
from .kernel import THREAD_NETNS, setns

log = logging.getLogger(__name__)

T = TypeVar("T")


def _target_fd(target: NetnsHandle | int) -> tuple[int, str]:
    if isinstance(target, NetnsHandle):
        return target.fileno(), target.path or str(target.identity)
    return target, f"fd {target}"


@contextmanager
def in_netns(target: NetnsHandle | int, *, back: NetnsHandle | None = None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``target``, then come back.

    Synchronous only: never hold it across an ``await`` (another task would run
    in the wrong namespace). Sockets created inside keep that namespace after
    the way back. If the way back fails, the thread would stay in the wrong
    namespace for good, so the process aborts instead.

    ``back``: the namespace the thread is in now, held open by a caller that enters
    namespaces often (the ztunnel side, once per pod); without it the way back is
    opened (and closed) on every call.
    """
    fd, what = _target_fd(target)
    if back is not None:
        with _entered(fd, what, back.fileno()):
            yield
        return
    try:
        back_fd = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"cannot open {THREAD_NETNS} to come back later: {e.strerror}") from None
    try:
        with _entered(fd, what, back_fd):
            yield
    finally:
        os.close(back_fd)


@contextmanager
def _entered(fd: int, what: str, back: int) -> Iterator[None]:
    """setns into ``fd``; on the way out setns into ``back`` (or abort the process)."""
    try:
        setns(fd)
    except OSError as e:
        hint = "; run as root (needs CAP_SYS_ADMIN)" if e.errno == errno.EPERM else ""
        if e.errno == errno.EINVAL:
            hint = " (is it a network namespace?)"
        raise NetnsError(f"cannot enter netns {what}: {e.strerror}{hint}") from None
    try:
        yield
    finally:
        try:
            setns(back)
        except OSError as e:
            log.critical(
                "cannot return to the original network namespace after %s: %s; aborting",
                what,
                e.strerror,
            )
            os.abort()


def _call_in_netns(fd: int, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        with in_netns(fd):
            return fn(*args)
    finally:
        os.close(fd)


async def run_in_netns(
    target: NetnsHandle | int, fn: Callable[..., T], *args: Any, executor: Executor | None = None
) -> T:
    """Call ``fn(*args)`` in a worker thread that is inside ``target``, and await its result.

    For slow or blocking work in a namespace (iptables-restore, probes); the
    event loop's thread never changes namespace. The worker gets its own dup of
    the fd, so closing ``target`` meanwhile cannot pull the namespace away.
    ``executor``: whose threads (default: the event loop's default executor).

    Cancelled, it returns (raising CancelledError) only once the work either never ran or
    has finished: a worker thread cannot be stopped half-way, and a caller that takes out
    what the work put in must not do so while the work still goes on.
    """
    import asyncio  # here: zds.netns stays light for commands that never await

    fd, what = _target_fd(target)
    try:
        own = os.dup(fd)
    except OSError as e:
        raise NetnsError(f"cannot use netns {what}: {e.strerror}") from None
    loop = asyncio.get_running_loop()
    job: _Job[T] = _Job(own, fn, args, loop.create_future(), loop)
    try:
        future = loop.run_in_executor(executor, contextvars.copy_context().run, job)
    except BaseException:
        os.close(own)
        raise
    try:
        return await future
    except asyncio.CancelledError:
        if job.drop():  # never started (and now never will): its dup is closed here
            raise
        with contextlib.suppress(asyncio.CancelledError):  # a second cancel stops the wait
            await job.finished
        raise


class _Dropped(Exception):
    """A job dropped before it started (nobody waits for it)."""


class _Job(Generic[T]):
    """``run_in_netns``'s work: runs once, unless dropped before it starts; says when it
    has finished, on the event loop's thread."""

    def __init__(
        self, fd: int, fn: Callable[..., T], args: tuple[Any, ...], finished: Any, loop: Any
    ) -> None:
        self.fd, self.fn, self.args = fd, fn, args
        self.finished = finished
        self._loop = loop
        self._lock = threading.Lock()
        self._state = "queued"

    def drop(self) -> bool:
        """Keep it from starting; False if it started already. Its fd is closed when dropped."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "dropped"
        os.close(self.fd)
        return True

    def __call__(self) -> T:
        with self._lock:
            if self._state == "dropped":
                raise _Dropped
            self._state = "running"
        try:
            return _call_in_netns(self.fd, self.fn, self.args)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(_set_done, self.finished)


def _set_done(future: Any) -> None:
    if not future.done():
        future.set_result(None)


#: ``SO_NETNS_COOKIE`` (Linux 5.14): the 64-bit cookie of a socket's netns.
SO_NETNS_COOKIE = 71
#: linux/nsfs.h ``NS_GET_ID``, ``_IOR(NSIO, 13, __u64)`` (Linux 6.18): a namespace's 64-bit id,
#: which for a network namespace is its cookie; trusted only once the two were seen equal.
NS_GET_ID = 0x8008B70D


class _CookieWay:
    """Whether ``NS_GET_ID`` answers the cookie here: unknown (None) until the first namespace
    whose cookie was read through a socket is asked both ways."""

    id_is_cookie: bool | None = None


def netns_cookie(target: NetnsHandle | int) -> int | None:
    """The cookie of network namespace ``target``: unlike its inode number, never given to
    another namespace while the machine runs. None where the kernel cannot say (before 5.14)
    or the namespace cannot be entered.

    Read with one ioctl on the fd where the kernel has ``NS_GET_ID`` and it was seen to give
    the same number (~1 us); otherwise by entering the namespace, making a socket there and
    asking it (~20 us: setns twice, a socket)."""
    fd, _ = _target_fd(target)
    # Only a handle is a network namespace for sure (NS_GET_ID answers for any namespace).
    if _CookieWay.id_is_cookie and isinstance(target, NetnsHandle):
        try:
            return _ns_id(fd)
        except OSError:
            pass  # (a closed fd): the socket's answer is the one to give
    cookie = _socket_cookie(target)
    if _CookieWay.id_is_cookie is None and cookie is not None:
        try:
            _CookieWay.id_is_cookie = _ns_id(fd) == cookie
        except OSError:
            _CookieWay.id_is_cookie = False  # a kernel before 6.18: ENOTTY
    return cookie


def _ns_id(fd: int) -> int:
    return int(struct.unpack("Q", fcntl.ioctl(fd, NS_GET_ID, bytes(8)))[0])


def _socket_cookie(target: NetnsHandle | int) -> int | None:
    try:
        with in_netns(target):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            raw = probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        finally:
            probe.close()
    except (OSError, NetnsError):
        return None
    return int(struct.unpack("Q", raw)[0])
