"""The bench's pods: N named network namespaces made fast, outside any timed section.

``zds netns create`` (pyroute2, a forked child per namespace) takes ~8 ms each; the bench
needs up to 2,500, so it does what ``ip netns add`` does in-process instead: the calling
thread unshares a new netns, bind-mounts ``/proc/thread-self/ns/net`` on
``/var/run/netns/NAME``, brings ``lo`` up (the DNS listeners bind 127.0.0.1 and ::1) and
goes back (~0.3 ms each). Removal unmounts and unlinks, as ``ip netns del`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct

from zds.netns.kernel import CLONE_NEWNET, setns

NETNS_DIR = "/var/run/netns"
MS_BIND = 0x1000
MNT_DETACH = 0x2
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def create(names: list[str]) -> list[str]:
    """Create ``/var/run/netns/NAME`` for each name (none may exist); returns the paths made.

    On an error, what was made so far is removed again before the error is raised."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    made: list[str] = []
    try:
        for name in names:
            path = os.path.join(NETNS_DIR, name)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            os.close(fd)
            made.append(path)
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            try:
                _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None), "mount")
                _loopback_up()
            finally:
                setns(home)
    except BaseException:
        remove(made)
        raise
    finally:
        os.close(home)
    return made


def remove(paths: list[str]) -> None:
    """Unmount and unlink each path (missing ones are fine)."""
    for path in paths:
        _libc.umount2(path.encode(), MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
