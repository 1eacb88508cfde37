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
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Coroutine
from typing import Any

from zds.client.datapath import DirectionStats, connect_within, relay
from zds.client.inpod import (
    IP_PKTINFO,
    DnsSockets,
    Resolver,
    dns_port_error,
    node_resolvers,
    parse_resolver,
)
from zds.client.listeners import AcceptedConnection, SocketWatcher

log = logging.getLogger("zds.ztunnel.dns")

#: How long to wait for a resolver's answer (per resolver tried); also how long a TCP DNS
#: connection may sit idle (ztunnel's DNS server: DEFAULT_TCP_REQUEST_TIMEOUT, 5 s).
QUERY_TIMEOUT = 5.0
MAX_UDP = 65535
#: UDP queries of one pod being forwarded at a time (each holds a socket until its answer or
#: QUERY_TIMEOUT): more are dropped, counted as failed, so a pod flooding its DNS cannot take
#: every fd of the process and with them every other pod's data path.
MAX_UDP_IN_FLIGHT = 128


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


async def forward_udp(query: bytes, resolvers: list[Resolver]) -> bytes | None:
    """Ask each resolver in turn over UDP from the node's netns; the first answer wins."""
    loop = asyncio.get_running_loop()
    for resolver in resolvers:
        try:
            with socket.socket(_family(resolver[0]), socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, resolver)
                await loop.sock_sendall(sock, query)
                async with asyncio.timeout(QUERY_TIMEOUT):
                    return await loop.sock_recv(sock, MAX_UDP)
        except (OSError, TimeoutError) as exc:  # (out of fds too: the query goes unanswered)
            log.debug("resolver %s did not answer: %s", resolver, exc)
    return None


_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex


def _local_address(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int, bytes] | None:
    """The PKTINFO control message to send a reply with: the query's local address as source."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _ifindex, _spec_dst, addr = _IN_PKTINFO.unpack_from(data)
            return socket.SOL_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, addr, b"\0" * 4)
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= _IN6_PKTINFO.size:
            addr6, _ifindex = _IN6_PKTINFO.unpack_from(data)
            return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(addr6, 0)
    return None


class DnsProxy:
    """A pod's DNS forwarder on port 15053: answers on the UDP sockets and TCP listeners
    made inside its netns (``zds.client.inpod.DnsSockets``), which it owns."""

    def __init__(self, sockets: DnsSockets, resolvers: list[Resolver]) -> None:
        self.sockets = sockets
        self.resolvers = resolvers
        self.stats = DirectionStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: SocketWatcher | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_udp(self, watcher: SocketWatcher) -> None:
        """Serve the UDP sockets from the event loop (needs a running loop)."""
        for sock in self.sockets.udp:
            watcher.watch(sock.fileno(), functools.partial(self._readable, sock))
        self._watcher = watcher

    def _readable(self, sock: socket.socket) -> None:
        space = socket.CMSG_SPACE(max(_IN_PKTINFO.size, _IN6_PKTINFO.size))
        while True:
            try:
                query, ancdata, _flags, addr = sock.recvmsg(MAX_UDP, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("DNS recvmsg failed: %s", exc)
                return
            if len(self._tasks) >= MAX_UDP_IN_FLIGHT:
                self.stats.connections += 1
                self.stats.failed += 1
                continue
            self.spawn(self._answer(sock, query, _local_address(ancdata), addr))

    async def _answer(
        self, sock: socket.socket, query: bytes, source: tuple[int, int, bytes] | None, addr: Any
    ) -> None:
        self.stats.connections += 1
        self.stats.bytes_sent += len(query)
        answer = await forward_udp(query, self.resolvers)
        if answer is None:
            self.stats.failed += 1
            return
        self.stats.bytes_received += len(answer)
        with contextlib.suppress(OSError):
            sock.sendmsg([answer], [source] if source else [], 0, addr)

    async def handle_tcp(self, conn: AcceptedConnection) -> None:
        """TCP DNS: relay the stream to the first resolver that takes the connection, until
        it ends or sits idle for QUERY_TIMEOUT (as ztunnel's DNS server closes it)."""
        for resolver in self.resolvers:
            try:
                upstream = socket.socket(_family(resolver[0]), socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.debug("cannot make a socket for resolver %s: %s", resolver, exc)
                break
            upstream.setblocking(False)
            try:
                await connect_within(upstream, resolver, QUERY_TIMEOUT)
            except (OSError, TimeoutError):
                upstream.close()
                continue
            self.stats.connections += 1
            conn.sock.setblocking(False)
            await relay(conn.sock, upstream, self.stats, idle=QUERY_TIMEOUT)
            return
        self.stats.failed += 1
        conn.sock.close()

    def close(self) -> None:
        if self._watcher is not None:  # before the sockets close
            for sock in self.sockets.udp:
                if sock.fileno() >= 0:
                    self._watcher.unwatch(sock.fileno())
            self._watcher = None
        self.sockets.close()
        for task in list(self._tasks):
            task.cancel()


__all__ = [
    "DnsProxy",
    "DnsSockets",
    "Resolver",
    "dns_port_error",
    "forward_udp",
    "node_resolvers",
    "parse_resolver",
]
