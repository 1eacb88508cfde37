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

from zds.client.datapath import DirectionStats, connect_within
from zds.client.inpod import (
    IP_PKTINFO,
    DnsSockets,
    Resolver,
    dns_port_error,
    node_resolvers,
    parse_resolver,
)
from zds.client.listeners import AcceptedConnection, SocketWatcher, past_data_path_reserve

log = logging.getLogger("zds.ztunnel.dns")

#: How long to wait for a resolver's answer (per resolver tried); also how long a TCP DNS
#: query may take to come whole (ztunnel's DNS server: DEFAULT_TCP_REQUEST_TIMEOUT, 5 s).
QUERY_TIMEOUT = 5.0
MAX_UDP = 65535
#: UDP queries of one pod being forwarded at a time (each holds a socket until its answer or
#: QUERY_TIMEOUT): more are dropped, counted as failed, so a pod flooding its DNS cannot take
#: every fd of the process and with them every other pod's data path.
MAX_UDP_IN_FLIGHT = 128
#: TCP DNS connections of one pod open at a time: more are closed at once, counted as failed.
MAX_TCP_CONNECTIONS = 64


def _family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _resolver_socket(resolver: Resolver, kind: int) -> socket.socket | None:
    """A non-blocking socket to ask ``resolver`` with (OSError as ``socket()`` raises it), or
    None when it would be one of the fds kept for the pods' own sockets: the query is then
    dropped (counted as failed)."""
    sock = socket.socket(_family(resolver[0]), kind | socket.SOCK_CLOEXEC)
    if past_data_path_reserve(sock.fileno()):
        sock.close()
        return None
    sock.setblocking(False)
    return sock


async def forward_udp(query: bytes, resolvers: list[Resolver]) -> bytes | None:
    """Ask each resolver in turn over UDP from the node's netns; the first answer wins."""
    loop = asyncio.get_running_loop()
    for resolver in resolvers:
        try:
            if (sock := _resolver_socket(resolver, socket.SOCK_DGRAM)) is None:
                return None
            with sock:
                await loop.sock_connect(sock, resolver)
                await loop.sock_sendall(sock, query)
                async with asyncio.timeout(QUERY_TIMEOUT):
                    return await loop.sock_recv(sock, MAX_UDP)
        except (OSError, TimeoutError) as exc:  # (out of fds too: the query goes unanswered)
            log.debug("resolver %s did not answer: %s", resolver, exc)
    return None


async def forward_tcp(query: bytes, resolvers: list[Resolver]) -> bytes | None:
    """Ask each resolver in turn over TCP from the node's netns (a connection a query); the
    first answer wins."""
    loop = asyncio.get_running_loop()
    for resolver in resolvers:
        try:
            if (sock := _resolver_socket(resolver, socket.SOCK_STREAM)) is None:
                return None
            with sock:
                await connect_within(sock, resolver, QUERY_TIMEOUT)
                async with asyncio.timeout(QUERY_TIMEOUT):
                    await loop.sock_sendall(sock, _framed(query))
                    answer = await read_message(sock)
                if answer is not None:
                    return answer
        except (OSError, TimeoutError) as exc:
            log.debug("resolver %s did not answer over TCP: %s", resolver, exc)
    return None


def _framed(message: bytes) -> bytes:
    """A DNS message as TCP carries it: its length in two bytes first (RFC 1035 4.2.2)."""
    return len(message).to_bytes(2, "big") + message


async def read_message(sock: socket.socket) -> bytes | None:
    """The next DNS message on a TCP connection (non-blocking socket); None at its end, or
    for one cut short or of length 0."""
    head = await _read_exactly(sock, 2)
    if head is None or (size := int.from_bytes(head, "big")) == 0:
        return None
    return await _read_exactly(sock, size)


async def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


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
        self._tcp_connections = 0
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
        """TCP DNS, as ztunnel's DNS server takes it: each query must come whole within
        QUERY_TIMEOUT (of the connection, or of the answer before), else the connection is
        closed (a byte now and then no longer kept it, and a resolver connection, open);
        each goes to the first resolver that answers it, its answer back; at most
        MAX_TCP_CONNECTIONS of a pod at once."""
        sock = conn.sock
        self.stats.connections += 1
        if self._tcp_connections >= MAX_TCP_CONNECTIONS:
            self.stats.failed += 1
            sock.close()
            return
        self._tcp_connections += 1
        sock.setblocking(False)
        try:
            while True:
                async with asyncio.timeout(QUERY_TIMEOUT):
                    query = await read_message(sock)
                if query is None:
                    return
                self.stats.bytes_sent += len(query)
                answer = await forward_tcp(query, self.resolvers)
                if answer is None:
                    self.stats.failed += 1
                    return
                self.stats.bytes_received += len(answer)
                async with asyncio.timeout(QUERY_TIMEOUT):
                    await asyncio.get_running_loop().sock_sendall(sock, _framed(answer))
        except (OSError, TimeoutError):
            return  # (the pod's end reset, or was too slow: closed, as ztunnel closes it)
        finally:
            self._tcp_connections -= 1
            sock.close()

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
