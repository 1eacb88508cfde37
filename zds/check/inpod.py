"""What the ztunnel under test has open inside a pod's network namespace, and on the host.

``/proc/net/tcp{,6}`` shows the sockets of the namespace of whoever reads it, so
a worker thread reads it from inside the pod's netns (``run_in_netns``); the
ztunnel's own sockets are told apart by inode (``/proc/PID/fd``) when its pid is
known.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

from zds import defaults
from zds.netns import in_netns, open_netns, run_in_netns

#: The in-pod listener ports ztunnel opens (its HBONE, inbound plaintext and outbound).
INPOD_PORTS = (defaults.INBOUND_HBONE_PORT, defaults.INBOUND_PLAINTEXT_PORT, defaults.OUTBOUND_PORT)
_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    port: int
    inode: int
    address: str


def _read_listeners() -> list[Listener]:
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/thread-self/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == _LISTEN:
                    address, _, port = fields[1].rpartition(":")
                    found.append(Listener(int(port, 16), int(fields[9]), f"{table}:{address}"))
    return found


async def listeners_in(netns: str) -> list[Listener]:
    """Every TCP listener inside the netns at path ``netns``."""
    handle = open_netns(netns)
    try:
        return await run_in_netns(handle, _read_listeners)
    finally:
        handle.close()


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds (OSError when its fds cannot be listed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


async def ports_of(netns: str, pid: int | None) -> dict[int, set[int]]:
    """The in-pod ports listening in ``netns``: port -> socket inodes (only ``pid``'s when given)."""
    mine: set[int] | None = None
    if pid:
        mine = set()  # a ztunnel that is gone holds no sockets
        with contextlib.suppress(OSError):
            mine = socket_inodes(pid)
    ports: dict[int, set[int]] = {}
    for listener in await listeners_in(netns):
        if listener.port in INPOD_PORTS and (mine is None or listener.inode in mine):
            ports.setdefault(listener.port, set()).add(listener.inode)
    return ports


class PortBlocker:
    """A TCP listener inside a pod's netns on one of ztunnel's ports, without SO_REUSEPORT, so
    ztunnel cannot bind it (ztunnel's own tests make the same conflict: create_proxy_conflict)."""

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        with open_netns(netns) as handle, in_netns(handle):
            self._sock = _bind_any(port)

    def release(self) -> None:
        self._sock.close()


def _bind_any(port: int) -> socket.socket:
    """[::]:port dual-stack (where ztunnel binds), or 0.0.0.0:port when the netns has no IPv6."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
            sock.listen(1)
        except OSError:
            sock.close()
            if family == socket.AF_INET:
                raise
            continue
        return sock
    raise AssertionError("unreachable")


def own_netns(pid: int | None) -> str:
    """The netns path of ``pid`` (the ztunnel), or of this process."""
    return f"/proc/{pid}/ns/net" if pid else f"/proc/{os.getpid()}/ns/net"
