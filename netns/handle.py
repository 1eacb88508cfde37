"""``NetnsHandle``: one open fd of a network namespace, and the ways to open one.

The fd keeps the namespace alive, is what travels to ztunnel over
``SCM_RIGHTS``, and is what ``setns(2)`` takes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import warnings
from contextlib import suppress

from zds import defaults

from .errors import NetnsError, OutOfFds
from .kernel import (
    NSFS_MAGIC,
    THREAD_NETNS,
    NetnsIdentity,
    fstatfs_type,
    kernel_has_nstype_ioctl,
    netns_identity,
    validate_netns_fd,
)
from .ref import NetnsRef

_PROC_PID_NETNS = re.compile(r"^/proc/(\d+)/ns/net$")
#: What ``zds netns create`` takes as a name: names become file names and interface-name
#: parts, so they stay plain.
NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


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
    def from_fd(cls, fd: int, path: str = "", *, validate: bool = True, cloexec: bool = False) -> NetnsHandle:
        """Take ownership of ``fd``: on any failure here it is closed too.

        The fd is made close-on-exec (it must not leak into iptables-restore and
        other children); ``cloexec``: it was opened so already (no system call to make it
        so). ``path`` is only for messages and display.
        """
        try:
            if validate:
                validate_netns_fd(fd, path or f"fd {fd}")
            identity = netns_identity(fd)
            if not cloexec:
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

    def move_above(self, floor: int) -> None:
        """Renumber the fd to the lowest free number at or above ``floor`` (where the limit
        allows): a process holding thousands of these keeps the numbers below ``floor`` for
        code that cannot use higher ones (``select()``: FD_SETSIZE is 1024)."""
        fd = self.fileno()
        if fd >= floor:
            return
        try:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
        except OSError:
            return  # no number that high (RLIMIT_NOFILE): stay where it is
        self.fd = moved
        os.close(fd)

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
    if os.path.normpath(parent) == os.path.normpath(defaults.NETNS_RUN_DIR) and NETNS_NAME.fullmatch(name):
        return f'cannot open netns {path}: no such file; create it with "zds netns create {name}"'
    return f"cannot open netns {path}: no such file"


def open_netns(path: str, *, directory: int | None = None) -> NetnsHandle:
    """Open and validate the network namespace at ``path`` (``/var/run/netns/NAME``, ``/proc/PID/ns/net``).

    ``directory``: an fd of ``path``'s directory, already open: the file is opened in it (by
    its last part) rather than by walking ``path`` again."""
    if not path:
        raise NetnsError("cannot open netns: empty path")
    try:
        # First without opening what is there (O_PATH: no device's open, no FIFO's wait), and
        # opened only if it is an nsfs file: a path that led to /dev/watchdog or a tape
        # started it, one to /etc/shadow opened it as root.
        where = os.open(path if directory is None else os.path.basename(path), _PATH_ONLY, dir_fd=directory)
        try:
            if fstatfs_type(where) != NSFS_MAGIC and kernel_has_nstype_ioctl():
                raise NetnsError(f"{path} is not a network namespace" + _stale_hint(where, path))
            # (O_NONBLOCK, as before O_PATH: a FIFO fails validation instead of hanging the open)
            fd = os.open(f"/proc/self/fd/{where}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        finally:
            os.close(where)
    except FileNotFoundError:
        raise NetnsError(_missing_message(path)) from None
    except PermissionError:
        if os.geteuid() == 0:  # (root told to be root was no help: a sandbox's pid 1, a security module)
            raise NetnsError(
                f"cannot open netns {path}: permission denied, as root (the kernel or a security module "
                "keeps what it leads to from this process: not a netns the node agent may open)"
            ) from None
        raise NetnsError(
            f"cannot open netns {path}: permission denied; run as root with CAP_SYS_ADMIN"
            " (and CAP_SYS_PTRACE over the process, for /proc/PID/ns/net)"
        ) from None
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise OutOfFds(
                f"cannot open netns {path}: {e.strerror}; raise the limit (ulimit -n, LimitNOFILE)"
            ) from None
        raise NetnsError(f"cannot open netns {path}: {e.strerror}") from None
    except ValueError:  # os.open's "embedded null byte"
        raise NetnsError(f"cannot open netns {path!r}: a path has no NUL byte") from None
    try:
        validate_netns_fd(fd, path)
        os.set_blocking(fd, True)
    except NetnsError as e:
        message = str(e) + _stale_hint(fd, path)
        os.close(fd)
        raise NetnsError(message) from None
    except BaseException:
        os.close(fd)
        raise
    return NetnsHandle.from_fd(fd, path, validate=False, cloexec=True)  # (opened with O_CLOEXEC)


#: How a netns path is looked at before it is opened (its file system, never its content).
_PATH_ONLY = os.O_PATH | os.O_CLOEXEC


def _stale_hint(fd: int, path: str) -> str:
    """For a plain file in the run dir (a named namespace whose bind mount is gone), how to
    remove it; '' otherwise."""
    if os.path.normpath(os.path.dirname(path)) != os.path.normpath(defaults.NETNS_RUN_DIR):
        return ""
    try:
        if fstatfs_type(fd) == NSFS_MAGIC:
            return ""
    except OSError:
        return ""
    return f'; it is a stale entry: remove it with "zds netns delete {os.path.basename(path)}"'


def open_netns_pid(pid: int) -> NetnsHandle:
    """Open the network namespace of process ``pid`` (``/proc/PID/ns/net``)."""
    return open_netns_ref(NetnsRef.of_pid(pid))


def open_netns_ref(ref: NetnsRef) -> NetnsHandle:
    """Open the network namespace ``ref`` names (a path, or a process's)."""
    return open_netns(ref.location)


def current_netns() -> NetnsHandle:
    """A handle on the calling thread's current network namespace."""
    return open_netns(THREAD_NETNS)
