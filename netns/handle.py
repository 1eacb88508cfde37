"""Open, validate, identify, enter and leave network namespaces.

A network namespace is held as an open fd (``NetnsHandle``): the fd keeps the
namespace alive, is what travels to ztunnel over ``SCM_RIGHTS``, and is what
``setns(2)`` takes. Namespaces are per *thread*: ``in_netns`` moves only the
calling thread and always brings it back, like ztunnel's ``InpodNetns::run``.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from zds import defaults

log = logging.getLogger(__name__)

T = TypeVar("T")

# linux/sched.h
CLONE_NEWNET = 0x40000000
# linux/nsfs.h: _IO(NSIO, 0x3), NSIO = 0xb7
NS_GET_NSTYPE = 0xB703
# linux/magic.h
NSFS_MAGIC = 0x6E736673
PROC_SUPER_MAGIC = 0x9FA0

#: The calling thread's own network namespace (setns is per thread, so never /proc/self).
THREAD_NETNS = "/proc/thread-self/ns/net"

# Namespace types NS_GET_NSTYPE can answer, for "is a mnt namespace, not ..." messages.
_NS_TYPE_NAMES = {
    0x00020000: "mnt",
    0x02000000: "cgroup",
    0x04000000: "uts",
    0x08000000: "ipc",
    0x10000000: "user",
    0x20000000: "pid",
    0x40000000: "net",
    0x00000080: "time",
}

_PROC_PID_NETNS = re.compile(r"^/proc/(\d+)/ns/net$")


class NetnsError(Exception):
    """A network-namespace operation failed; the message says what, on what, and what to do."""


@dataclass(frozen=True)
class NetnsIdentity:
    """What makes a network namespace itself: the (st_dev, st_ino) of its nsfs inode.

    Two fds refer to the same namespace exactly when their identities are equal
    (ztunnel compares these to tell a re-sent pod from a replaced one).
    """

    dev: int
    ino: int

    def __str__(self) -> str:
        return f"{self.dev}:{self.ino}"


# --- libc ----------------------------------------------------------------------


class _StatFs(ctypes.Structure):
    # struct statfs on 64-bit Linux; only f_type is read, the tail is padding to size.
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_rest", ctypes.c_byte * 256),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) the calling thread into the network namespace ``fd`` (raises OSError)."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _fstatfs_type(fd: int) -> int:
    buf = _StatFs()
    if _libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(buf.f_type) & 0xFFFFFFFF


@functools.cache
def _kernel_has_nstype_ioctl() -> bool:
    """Whether NS_GET_NSTYPE works here (Linux >= 4.11), probed on our own netns.

    When it does, an fd that answers ENOTTY is simply not a namespace; only on
    older kernels is the fstatfs magic the best evidence there is (it cannot
    tell a net namespace from any other, and PROC_SUPER_MAGIC matches every
    /proc file), so the fallback is taken only there.
    """
    try:
        fd = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


# --- validation and identity ------------------------------------------------------


def validate_netns_fd(fd: int, what: str = "") -> None:
    """Raise NetnsError unless ``fd`` is an open network-namespace fd.

    Asks the kernel with ``ioctl(NS_GET_NSTYPE) == CLONE_NEWNET``; on kernels
    without that ioctl (ENOTTY/EINVAL), falls back to the fstatfs magic of
    nsfs (or of /proc, before nsfs existed). ``what`` names the fd in messages
    (a path, or "fd N" by default).
    """
    what = what or f"fd {fd}"
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise NetnsError(f"{what} is not an open file descriptor") from None
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise NetnsError(f"cannot check whether {what} is a network namespace: {e.strerror}") from None
        if _kernel_has_nstype_ioctl():
            raise NetnsError(f"{what} is not a network namespace") from None
        try:
            magic = _fstatfs_type(fd)
        except OSError as e2:
            raise NetnsError(f"cannot check whether {what} is a network namespace: {e2.strerror}") from None
        if magic not in (NSFS_MAGIC, PROC_SUPER_MAGIC):
            raise NetnsError(f"{what} is not a network namespace") from None
        return
    if nstype != CLONE_NEWNET:
        kind = _NS_TYPE_NAMES.get(nstype, f"type {nstype:#x}")
        raise NetnsError(f"{what} is a {kind} namespace, not a network namespace")


def netns_identity(fd: int) -> NetnsIdentity:
    """The identity (st_dev, st_ino) of the namespace ``fd`` refers to."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise NetnsError(f"cannot read the identity of fd {fd}: {e.strerror}") from None
    return NetnsIdentity(st.st_dev, st.st_ino)


# --- the handle -------------------------------------------------------------------


class NetnsHandle:
    """Owns exactly one open fd of a network namespace; closing it releases the namespace.

    Use it as a context manager, or call ``close()`` (idempotent). ``dup()``
    gives an independent fd the caller owns (e.g. for ``SCM_RIGHTS``).
    """

    fd: int
    path: str
    identity: NetnsIdentity

    def __init__(self, fd: int, path: str, identity: NetnsIdentity) -> None:
        # Prefer from_fd/open_netns: they validate. This only records.
        self.fd = fd
        self.path = path
        self.identity = identity

    @classmethod
    def from_fd(cls, fd: int, path: str = "", *, validate: bool = True) -> NetnsHandle:
        """Take ownership of ``fd``: on any failure here it is closed too.

        The fd is made close-on-exec (it must not leak into iptables-restore and
        other children). ``path`` is only for messages and display.
        """
        try:
            if validate:
                validate_netns_fd(fd, path or f"fd {fd}")
            identity = netns_identity(fd)
            os.set_inheritable(fd, False)
        except BaseException:
            with suppress(OSError):
                os.close(fd)
            raise
        return cls(fd, path, identity)

    def fileno(self) -> int:
        """The owned fd; raises NetnsError once closed (a stale number could be anything by then)."""
        if self.fd < 0:
            raise NetnsError(f"netns handle {self._name()} is closed")
        return self.fd

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self.fd < 0

    def close(self) -> None:
        """Close the fd; calling it again does nothing."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def dup(self) -> int:
        """A new close-on-exec fd of the same namespace; the caller owns (and closes) it."""
        return os.dup(self.fileno())

    def _name(self) -> str:
        return self.path or f"{self.identity}"

    def __enter__(self) -> NetnsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd}"
        return f"NetnsHandle({self.path!r}, {state}, identity={self.identity})"

    def __del__(self) -> None:
        # A safety net like socket's: the owner should have closed it.
        if getattr(self, "fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()


# --- opening ------------------------------------------------------------------------


def _missing_message(path: str) -> str:
    match = _PROC_PID_NETNS.match(path)
    if match:
        pid = match.group(1)
        if os.path.isdir(f"/proc/{pid}"):
            return f"cannot open netns {path}: process {pid} has exited and has no network namespace"
        return f"process {pid} does not exist"
    parent, name = os.path.split(path)
    if os.path.normpath(parent) == os.path.normpath(defaults.NETNS_RUN_DIR):
        return f'cannot open netns {path}: no such file; create it with "zds netns create {name}"'
    return f"cannot open netns {path}: no such file"


def open_netns(path: str) -> NetnsHandle:
    """Open and validate the network namespace at ``path`` (``/var/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    if not path:
        raise NetnsError("cannot open netns: empty path")
    try:
        # O_NONBLOCK so a FIFO at that path fails validation instead of hanging the open.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NetnsError(_missing_message(path)) from None
    except PermissionError:
        raise NetnsError(
            f"cannot open netns {path}: permission denied; run as root with CAP_SYS_ADMIN"
            " (and CAP_SYS_PTRACE over the process, for /proc/PID/ns/net)"
        ) from None
    except OSError as e:
        raise NetnsError(f"cannot open netns {path}: {e.strerror}") from None
    try:
        validate_netns_fd(fd, path)
        os.set_blocking(fd, True)
    except NetnsError as e:
        message = str(e)
        if _is_stale_entry(fd, path):
            name = os.path.basename(path)
            message += f'; it is a stale entry: remove it with "zds netns delete {name}"'
        os.close(fd)
        raise NetnsError(message) from None
    except BaseException:
        os.close(fd)
        raise
    return NetnsHandle.from_fd(fd, path, validate=False)


def _is_stale_entry(fd: int, path: str) -> bool:
    """A plain file in the run dir: a named namespace whose bind mount is gone."""
    if os.path.normpath(os.path.dirname(path)) != os.path.normpath(defaults.NETNS_RUN_DIR):
        return False
    try:
        return _fstatfs_type(fd) != NSFS_MAGIC
    except OSError:
        return False


def open_netns_pid(pid: int) -> NetnsHandle:
    """Open the network namespace of process ``pid`` (``/proc/PID/ns/net``)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise NetnsError(f"bad process id {pid!r}: expected a positive integer")
    return open_netns(f"/proc/{pid}/ns/net")


def open_netns_ref(ref: str) -> NetnsHandle:
    """Open a netns named the way a pods file names it: ``pid:N``, or a path.

    A bare name without ``/`` means a named namespace, ``/var/run/netns/NAME``
    (what ``zds netns create NAME`` makes).
    """
    ref = ref.strip()
    if not ref:
        raise NetnsError('empty netns reference: expected "pid:N" or a path')
    if ref.startswith("pid:"):
        text = ref[4:].strip()
        if not text.isdigit() or int(text) <= 0:
            raise NetnsError(f'bad netns reference "{ref}": expected "pid:N" with N a process id, or a path')
        return open_netns_pid(int(text))
    if "/" not in ref:
        return open_netns(os.path.join(defaults.NETNS_RUN_DIR, ref))
    return open_netns(ref)


def current_netns() -> NetnsHandle:
    """A handle on the calling thread's current network namespace."""
    return open_netns(THREAD_NETNS)


# --- entering and leaving -------------------------------------------------------------


def _target_fd(target: NetnsHandle | int) -> tuple[int, str]:
    if isinstance(target, NetnsHandle):
        return target.fileno(), target.path or str(target.identity)
    return target, f"fd {target}"


@contextmanager
def in_netns(target: NetnsHandle | int) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``target``, then come back.

    Synchronous only: never hold it across an ``await`` (another task would run
    in the wrong namespace). Sockets created inside keep that namespace after
    the way back. If the way back fails, the thread would stay in the wrong
    namespace for good, so the process aborts instead.
    """
    fd, what = _target_fd(target)
    try:
        back = os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"cannot open {THREAD_NETNS} to come back later: {e.strerror}") from None
    try:
        try:
            _setns(fd)
        except OSError as e:
            hint = "; run as root (needs CAP_SYS_ADMIN)" if e.errno == errno.EPERM else ""
            if e.errno == errno.EINVAL:
                hint = " (is it a network namespace?)"
            raise NetnsError(f"cannot enter netns {what}: {e.strerror}{hint}") from None
        try:
            yield
        finally:
            try:
                _setns(back)
            except OSError as e:
                log.critical(
                    "cannot return to the original network namespace after %s: %s; aborting",
                    what,
                    e.strerror,
                )
                os.abort()
    finally:
        os.close(back)


def _call_in_netns(fd: int, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        with in_netns(fd):
            return fn(*args)
    finally:
        os.close(fd)


async def run_in_netns(target: NetnsHandle | int, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a worker thread that is inside ``target``, and await its result.

    For slow or blocking work in a namespace (iptables-restore, probes); the
    event loop's thread never changes namespace. The worker gets its own dup of
    the fd, so closing ``target`` meanwhile cannot pull the namespace away.
    """
    fd, what = _target_fd(target)
    try:
        own = os.dup(fd)
    except OSError as e:
        raise NetnsError(f"cannot use netns {what}: {e.strerror}") from None
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, _call_in_netns, own, fn, args)
    try:
        # Once submitted, the worker closes ``own`` whatever happens (even if we are cancelled).
        future = loop.run_in_executor(None, call)
    except BaseException:
        os.close(own)
        raise
    return await future
