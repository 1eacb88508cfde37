"""DNS on port 15053 inside each pod, where the in-pod rules send the pod's DNS.

Istio's in-pod rules (with DNS capture, the default) redirect the pod's UDP
and TCP port-53 traffic to 15053. Real ztunnel answers there with its DNS
proxy; with nothing listening, DNS in an enrolled pod would break. zds
forwards each query unchanged to the node's resolvers (``nameserver`` lines of
the node's ``/etc/resolv.conf``, read at start) from the node's own network
namespace, and sends the answer back into the pod. No caching, no rewriting:
a transparent forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from zds import defaults
from zds.client.datapath import DirectionStats, relay
from zds.client.listeners import AcceptedConnection, InpodListener, ListenerSpec
from zds.netns import in_netns

log = logging.getLogger("zds.ztunnel.dns")

#: How long to wait for a resolver's answer (per resolver tried).
QUERY_TIMEOUT = 5.0
DNS_PORT = 53
MAX_UDP = 65535


Resolver = tuple[str, int]


def node_resolvers(path: str = "/etc/resolv.conf") -> list[Resolver]:
    """The ``nameserver`` addresses of the node (the resolvers zds forwards to), port 53."""
    found: list[Resolver] = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    found.append((str(ipaddress.ip_address(fields[1].split("%")[0])), DNS_PORT))
    return found


def parse_resolver(text: str) -> Resolver:
    """``ADDR``, ``ADDR:PORT`` or ``[V6ADDR]:PORT``; ValueError if it is none of those."""
    host, port = text, DNS_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest.removeprefix(":")) if rest else DNS_PORT
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port}")
    return host, port


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


async def forward_udp(query: bytes, resolvers: list[Resolver]) -> bytes | None:
    """Ask each resolver in turn over UDP from the node's netns; the first answer wins."""
    loop = asyncio.get_running_loop()
    for resolver in resolvers:
        with socket.socket(_family(resolver[0]), socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, resolver)
                await loop.sock_sendall(sock, query)
                return await asyncio.wait_for(loop.sock_recv(sock, MAX_UDP), QUERY_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                log.debug("resolver %s did not answer: %s", resolver, exc)
    return None


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsProxy) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.owner.spawn(self._answer(data, addr))

    async def _answer(self, query: bytes, addr: tuple[str, int]) -> None:
        self.owner.stats.connections += 1
        self.owner.stats.bytes_sent += len(query)
        answer = await forward_udp(query, self.owner.resolvers)
        if answer is None:
            self.owner.stats.failed += 1
            return
        self.owner.stats.bytes_received += len(answer)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(answer, addr)


@dataclass
class DnsProxy:
    """A pod's port 15053: a UDP socket and a TCP listener made inside its netns."""

    udp: socket.socket
    tcp: InpodListener
    resolvers: list[Resolver]
    stats: DirectionStats = field(default_factory=DirectionStats)
    _transport: asyncio.DatagramTransport | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def open(
        cls, netns_fd: int, port: int, *, mark: int, reuse_port: bool, resolvers: list[Resolver]
    ) -> DnsProxy:
        """Make both sockets inside the netns (inline setns); OSError if the port is taken."""
        made: list[socket.socket] = []
        try:
            with in_netns(netns_fd):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    sock = socket.socket(socket.AF_INET6, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
                    made.append(sock)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if reuse_port:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                    sock.bind(("::", port))
            made[1].listen(128)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        tcp = InpodListener(spec=ListenerSpec("dns", port), sock=made[1], address=f"[::]:{port}")
        return cls(udp=made[0], tcp=tcp, resolvers=resolvers)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start_udp(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self), sock=self.udp)
        self._transport = transport

    async def handle_tcp(self, conn: AcceptedConnection) -> None:
        """TCP DNS: relay the stream to the first resolver that takes the connection."""
        loop = asyncio.get_running_loop()
        for resolver in self.resolvers:
            upstream = socket.socket(_family(resolver[0]), socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            upstream.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(upstream, resolver), QUERY_TIMEOUT)
            except (OSError, TimeoutError):
                upstream.close()
                continue
            self.stats.connections += 1
            conn.sock.setblocking(False)
            await relay(conn.sock, upstream, self.stats)
            return
        self.stats.failed += 1
        conn.sock.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.udp.close()
        self.tcp.sock.close()
        for task in list(self._tasks):
            task.cancel()


def dns_port_error(exc: OSError, port: int = defaults.DNS_PORT) -> str:
    """A readable reason for a DNS port that could not be opened."""
    if exc.errno == errno.EADDRINUSE:
        return f"[::]:{port}: address already in use"
    return f"[::]:{port}: {exc.strerror or exc}"
