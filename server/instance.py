"""One node agent per socket and per state directory, and socket files it owns.

Each path a node agent serves (its sockets, its state directory) gets a lock
file beside it (``PATH.lock``; ``DIR/zds.lock``) held with ``flock`` for the
life of the process: the kernel drops the lock when the process dies, so a
crashed agent never blocks the next one, and a second agent for any of the
same paths is refused before it touches anything (the state directory is
``flock``ed itself too: a deleted ``zds.lock`` does not let two agents share one
pod store). The lock file holds the holder's pid, for the message. Lock files
are left in place on exit (removing them would race with the next agent taking
them).

A socket path is only ever unlinked when it holds a socket: a stale one (no
agent holds its lock) is replaced; anything else there (a regular file, a
directory) is refused. On exit a node agent unlinks a socket only if it is
still the very file it bound (same ``st_dev``/``st_ino``): ``zds.transport``'s
``clear_socket_path`` and ``SocketFile``, which ``zds check`` uses too.

The control API's gRPC socket lives beside its public socket, in ``PATH.private``
(``PrivateDir``), under the same lock: what a killed agent left there is the next one's to
clear, so nothing piles up in ``/run`` or elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterable

from zds import defaults
from zds.errors import ZdsError


class InstanceError(ZdsError):
    """Another node agent holds a path, or a path cannot be used; the message says which and why."""


def socket_lock(path: str) -> str:
    """The lock file of a socket path."""
    return path + ".lock"


def state_lock(directory: str) -> str:
    """The lock file of a state directory."""
    return os.path.join(directory, "zds.lock")


def missing_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, outermost first: what ``makedirs``
    would make (a refused start removes them deepest first, once empty)."""
    missing: list[str] = []
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def remove_dirs(made: list[str]) -> None:
    """Remove the directories ``made`` (outermost first) deepest first, each once empty."""
    for directory in reversed(made):
        with contextlib.suppress(OSError):  # (not empty: someone else's files, or a socket)
            os.rmdir(directory)


class InstanceLock:
    """The ``flock``s of every path one node agent serves; ``acquire`` all or none."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        #: The lock files ``acquire`` made (they were not there).
        self.made: list[str] = []
        #: The socket lock files held (not the state directory's), and the directories made
        #: for the lock files.
        self._socket_locks: list[str] = []
        self._made_dirs: list[str] = []

    def acquire(self, locks: Iterable[tuple[str, str]]) -> None:
        """Lock each ``(path, lock file)`` (creating parent directories); InstanceError, with
        every lock taken so far released and the lock files this call made removed, if another
        agent holds one. A lock file inside the directory it guards (the state directory's)
        comes with a ``flock`` of that directory itself: a lock file deleted while its agent
        runs would otherwise let a second agent lock a new one there and open the same pod
        store."""
        try:
            for path, lock in locks:
                parent = os.path.dirname(lock)
                if parent:  # (each level makedirs will make: a refused start leaves none)
                    self._made_dirs += [d for d in missing_dirs(parent) if d not in self._made_dirs]
                fd, created = _lock(path, lock)
                self._fds.append(fd)
                if created:
                    self.made.append(lock)
                if lock == state_lock(path):
                    self._fds.append(_lock_dir(path))
                else:
                    self._socket_locks.append(lock)
        except BaseException:
            self.remove_made()
            self._remove_made_dirs()
            self.release()
            raise

    def remove_made(self, keep: Iterable[str] = ()) -> None:
        """Remove the lock files ``acquire`` made, but ``keep`` (a start that failed: before
        ``release``, while they are still locked, so no other agent holds them)."""
        for lock in self.made:
            if lock not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
        self.made = [lock for lock in self.made if lock in keep]

    def remove_socket_locks(self, *, served: bool) -> None:
        """A stop: remove every lock file held but the state directory's (its ``zds.lock`` says
        the directory held a node agent), while still held. An agent that opened one meanwhile
        finds it gone once it holds its ``flock`` (``_still_there``) and opens a new one.

        The directories made for them go too (once empty) only if the agent never ``served``
        its sockets: once it did, a ztunnel may have bind-mounted a socket's directory (a
        container's volume), and a directory made anew at the next start would be one that
        mount never shows (Istio's node agent never removes it either)."""
        for lock in self._socket_locks:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        if not served:
            self._remove_made_dirs()

    @property
    def made_dirs(self) -> list[str]:
        """The directories made for the lock files (absolute, outermost first)."""
        return list(self._made_dirs)

    def _remove_made_dirs(self) -> None:
        remove_dirs(self._made_dirs)

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())  # closing the fd drops its flock


def _lock(path: str, lock: str) -> tuple[int, bool]:
    """The locked fd of ``lock``, and whether this call made the file."""
    for _ in range(_LOCK_TRIES):
        opened = _open_lock(path, lock)
        if opened is None:
            continue  # (its directory went meanwhile: a refused start took the one it made)
        fd, created = opened
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {holder}" if holder else "pid unknown"
                raise InstanceError(
                    f"another zds server ({who}) is serving {path}; stop it first, or give this one "
                    "other paths (--zds-socket, --control-socket, --cni-socket, --state-dir)"
                ) from None
            raise InstanceError(f"cannot lock {path}: {lock}: {exc.strerror}") from exc
        if _still_there(fd, lock):
            break
        # Removed (by a refused start that had made it) between the open and the flock: the
        # lock is on a file no one else will open.
        os.close(fd)
    else:
        raise InstanceError(f"cannot lock {path}: {lock} keeps being replaced or removed")
    # Who holds it, for another agent's refusal; the lock is the flock, so a full disk
    # (ENOSPC: a traceback at start) leaves the pid out and nothing else.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd, created


#: How often a lock file replaced under the flock is opened again before giving up.
_LOCK_TRIES = 5


def _open_lock(path: str, lock: str) -> tuple[int, bool] | None:
    """``lock`` opened (made, with its directory, if missing), and whether this call made it;
    None if it or its directory went between the steps."""
    parent = os.path.dirname(lock)
    try:
        if parent:
            os.makedirs(parent, mode=0o750, exist_ok=True)
    except OSError as exc:  # (makedirs says "File exists" for a parent that is a file)
        why = "not a directory" if isinstance(exc, FileExistsError | NotADirectoryError) else exc.strerror
        raise InstanceError(f"cannot use {path}: its directory {parent}: {why}") from exc
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            return os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            fd = os.open(lock, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstanceError(f"cannot lock {path}: {lock}: {exc.strerror}") from exc
    if why := _not_a_lock_file(fd):
        os.close(fd)
        # (it is written with a pid and removed at the stop: a file of someone else's was lost)
        raise InstanceError(
            f"cannot lock {path}: {lock} is there and is not a zds lock file ({why}); {_NOT_OURS}"
        )
    return fd, False


def _not_a_lock_file(fd: int) -> str:
    """Why the file at ``fd`` is not one a zds lock leaves ('' if it may be): a regular file of
    this user holding a pid, or nothing (a start killed before it wrote one)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return "owned by another user"
    text = os.pread(fd, 32, 0)
    if st.st_size > 21 or (text.strip() and not text.rstrip(b"\n").isdigit()):
        return "it holds something else than a pid"
    return ""


def _still_there(fd: int, lock: str) -> bool:
    """The file ``fd`` holds is still the one at ``lock``."""
    try:
        at_path = os.lstat(lock)
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def _lock_dir(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InstanceError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            # Its lock file was taken away (this start made a new one): the pid is not known.
            raise InstanceError(
                f"another zds server is serving {path} (its lock file {state_lock(path)} may have "
                "been deleted); stop it first, or give this one another --state-dir"
            ) from None
        raise InstanceError(f"cannot lock {path}: {exc.strerror}") from exc
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


_NOT_OURS = "refusing to use it (remove it yourself if it is stale)"


class PrivateDir:
    """What only the node agent itself may reach, in a directory beside a public socket:
    ``PATH.private`` (0700), holding the control API's gRPC socket (``grpc.sock``) behind the
    gate that checks each peer of ``PATH``. Claimed while ``PATH``'s lock is held, so what a
    killed agent left there (the directory and its dead socket) is this agent's to clear, and
    is cleared at the next start; anything else found there is refused and left alone."""

    SUFFIX = ".private"
    SOCKET = "grpc.sock"

    def __init__(self, path: str, fd: int, dev: int, ino: int) -> None:
        self.path = path
        self._fd = fd
        self._id = (dev, ino)

    @classmethod
    def claim(cls, public: str) -> PrivateDir:
        """Make ``public``'s private directory, or take over a stale one (InstanceError when it
        is not a directory of ours, is open to others, or holds anything but a socket). What is
        checked is the directory opened, not the path: nothing can be swapped in between."""
        path = public + cls.SUFFIX
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # a killed agent's (or not ours: checked below)
        except OSError as exc:
            raise InstanceError(f"cannot make {path}: {exc.strerror}") from exc
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise InstanceError(f"cannot open {path}: {exc.strerror}") from exc
            what = "a symlink" if os.path.islink(path) else "not a directory"
            raise InstanceError(f"{path} is {what}; {_NOT_OURS}") from None
        try:
            st = os.fstat(fd)
            cls._clear(path, fd, st)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, st.st_dev, st.st_ino)

    @classmethod
    def _clear(cls, path: str, fd: int, st: os.stat_result) -> None:
        """Check the opened directory and take out a dead socket a killed agent left in it
        (the caller holds the public path's lock: no live agent uses it)."""
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise InstanceError(f"{path} is not a 0700 directory of this user; {_NOT_OURS}")
        for name in os.listdir(fd):
            if name != cls.SOCKET or not stat.S_ISSOCK(
                os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            ):
                raise InstanceError(f"{path} holds {name!r}, which zds did not put there; {_NOT_OURS}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cls.SOCKET, dir_fd=fd)

    @classmethod
    def socket_path(cls, public: str) -> str | None:
        """The gRPC socket's own path beside ``public``, if it is bound and dialled there; None
        when that is longer than a unix socket path may be (then ``socket`` is the same file
        through this process's fd of the directory)."""
        path = os.path.join(public + cls.SUFFIX, cls.SOCKET)
        return path if len(os.fsencode(path)) <= defaults.SUN_PATH_MAX else None

    @property
    def socket(self) -> str:
        """Where the gRPC socket is bound and dialled (``socket_path``)."""
        public = self.path.removesuffix(self.SUFFIX)
        return self.socket_path(public) or f"/proc/self/fd/{self._fd}/{self.SOCKET}"

    def remove(self) -> None:
        """Take the directory out (its socket first, if gRPC left it), only if it is still the
        one this agent claimed and nothing else went in."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._id:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(self.SOCKET, dir_fd=self._fd, follow_symlinks=False).st_mode):
                        os.unlink(self.SOCKET, dir_fd=self._fd)
                os.rmdir(self.path)
        except OSError:
            pass  # gone already, or something else is in it now: left as it is
        finally:
            os.close(self._fd)
