"""What the kernel says about a network-namespace fd: is it one, which one, and setns.

Python 3.11 has no ``os.setns``: ``setns(2)`` and ``fstatfs(2)`` go through
ctypes. Namespaces are per *thread*: see ``enter`` for moving a thread in and back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
from typing import NamedTuple

from zds.values import frozen

from .errors import NetnsError

# linux/sched.h
CLONE_NEWNET = 0x40000000
# linux/nsfs.h: _IO(NSIO, 0x3), NSIO = 0xb7
NS_GET_NSTYPE = 0xB703
# linux/sockios.h: a new fd of the netns a socket was made in (Linux >= 4.9)
SIOCGSKNS = 0x894C
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


@frozen
class NetnsIdentity(NamedTuple):
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
    # The interpreter's own symbols include libc's (no ldconfig run to find it by name).
    return ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """setns(2) the calling thread into the network namespace ``fd`` (raises OSError)."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fstatfs_type(fd: int) -> int:
    buf = _StatFs()
    if _libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(buf.f_type) & 0xFFFFFFFF


@functools.cache
def kernel_has_nstype_ioctl() -> bool:
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
            raise NetnsError(_bad_fd(fd, what)) from None
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise NetnsError(f"cannot check whether {what} is a network namespace: {e.strerror}") from None
        if kernel_has_nstype_ioctl():
            raise NetnsError(f"{what} is not a network namespace") from None
        try:
            magic = fstatfs_type(fd)
        except OSError as e2:
            raise NetnsError(f"cannot check whether {what} is a network namespace: {e2.strerror}") from None
        if magic not in (NSFS_MAGIC, PROC_SUPER_MAGIC):
            raise NetnsError(f"{what} is not a network namespace") from None
        return
    if nstype != CLONE_NEWNET:
        kind = _NS_TYPE_NAMES.get(nstype, f"type {nstype:#x}")
        raise NetnsError(f"{what} is a {kind} namespace, not a network namespace")


def _bad_fd(fd: int, what: str) -> str:
    """Why the kernel answered EBADF about ``fd``: not open, or opened with ``O_PATH`` (open,
    but no ioctl or ``setns`` takes it: ztunnel's start of the proxy fails with EBADF too)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return f"{what} is not an open file descriptor"
    if flags & os.O_PATH:
        return f"{what} was opened with O_PATH: setns cannot enter it (Bad file descriptor)"
    return f"{what} cannot be used: Bad file descriptor"


def netns_identity(fd: int) -> NetnsIdentity:
    """The identity (st_dev, st_ino) of the namespace ``fd`` refers to."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise NetnsError(f"cannot read the identity of fd {fd}: {e.strerror}") from None
    return NetnsIdentity(st.st_dev, st.st_ino)


def netns_identity_of_path(path: str) -> NetnsIdentity | None:
    """The identity of the namespace at ``path`` now (None if nothing is there)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return NetnsIdentity(st.st_dev, st.st_ino)


def socket_netns(sock_fd: int) -> int:
    """A new (close-on-exec) fd of the network namespace the socket ``sock_fd`` was made in.

    A socket keeps its namespace alive, so whoever holds a pod's sockets can always get
    the pod's netns back from them, without holding an fd of it all along."""
    try:
        return fcntl.ioctl(sock_fd, SIOCGSKNS)
    except OSError as e:
        raise NetnsError(f"cannot get the netns of socket fd {sock_fd}: {e.strerror}") from None
