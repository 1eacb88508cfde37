"""The data path: what the in-pod listeners do with a redirected connection.

- 15001 (outbound): the pod's app connected somewhere; the in-pod rules sent it
  here instead. Read where it was going (``SO_ORIGINAL_DST``), connect there
  from inside the *source* pod's netns with mark 1337 (so the rules leave it
  alone), and relay both ways.
- 15006 (inbound plaintext): a connection to the pod's own address arrived; the
  rules sent it here. Connect to the original destination (the pod's app) from
  inside the pod's netns with mark 1337 (not redirected again) and relay.

Relaying keeps half-close (EOF one way does not end the other) and
backpressure (a slow side slows the other: we wait for the write buffer to
drain before reading more). Per-workload counters (connections, bytes each
way) feed config_dump and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable

from zds import defaults
from zds.client.listeners import past_data_path_reserve
from zds.errors import ZdsError
from zds.logs import Tally
from zds.netns import NetnsError, NetnsHandle, in_netns
from zds.netns.kernel import socket_netns

log = logging.getLogger("zds.ztunnel.datapath")
#: Connections dropped for want of an upstream socket (out of fds), said every 10 s.
_NO_UPSTREAM = Tally(10.0, log)
#: What a pod's traffic makes happen to many connections at once is said in a line every 10 s
#: with a count and the latest (a pod connecting to a closed port in a loop wrote a line per
#: connection: 44,000 in 30 s); each connection's own line is at debug.
_NOT_REDIRECTED = Tally(10.0, log)
_REFUSED_DESTINATION = Tally(10.0, log)
_UNREACHABLE = Tally(10.0, log)


def _no_upstream(reason: object) -> None:
    _NO_UPSTREAM.add("dropped %d connection(s): cannot make the upstream socket: %s", reason)


def flush_drops() -> None:
    """Say the drops counted and not said yet (at a stop)."""
    for tally in (_NO_UPSTREAM, _NOT_REDIRECTED, _REFUSED_DESTINATION, _UNREACHABLE):
        tally.flush()


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
#: What a relay lets wait each way before it stops reading: a reader's limit (it pauses at
#: twice that) and a writer's high-water mark (asyncio's defaults: 64 KiB; one read of the
#: transport may still bring up to 256 KiB; ztunnel's copy starts at 1 KiB buffers and grows
#: them with the bytes moved).
RELAY_BUFFER = 16 * 1024
#: Read size per relay step.
CHUNK = 2 * RELAY_BUFFER
#: Seconds a relay that ended gives what it still buffers to go out before its sockets are cut.
RELAY_CLOSE_GRACE = 5.0


class OriginalDestinationError(ZdsError, OSError):
    """The connection carries no original destination (it was not redirected)."""


def original_destination(sock: socket.socket) -> tuple[int, str, int]:
    """``(family, address, port)`` the redirected connection was going to.

    On a dual-stack ``[::]`` listener an IPv4 client arrives v4-mapped and its
    original destination is in the IPv4 table (``SOL_IP``); ask that first,
    then the IPv6 one, as ztunnel does.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.AF_INET, socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    except OSError as v4_error:
        if sock.family != socket.AF_INET6:
            raise OriginalDestinationError(
                v4_error.errno, f"no original destination: {v4_error}"
            ) from v4_error
    try:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    except OSError as exc:
        raise OriginalDestinationError(exc.errno, f"no original destination: {exc}") from exc
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h


def socket_in_netns(
    netns: NetnsHandle | int, family: int, mark: int, *, source: str | None = None
) -> socket.socket:
    """A non-blocking TCP socket created inside ``netns`` with ``SO_MARK`` (inline setns, way back
    guaranteed). With ``source``, it is made transparent and bound to that address, so the
    destination sees the original client's address (real ztunnel does this for inbound)."""
    with in_netns(netns):
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        if source is not None:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def tune_relay_socket(sock: socket.socket) -> None:
    """What ztunnel sets on both sockets of a relayed connection (``setup_socket``, and its
    listeners' accept): TCP_NODELAY and keepalive with its default timings."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, defaults.RELAY_KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, defaults.RELAY_KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, defaults.RELAY_KEEPALIVE_PROBES)


async def connect_within(sock: socket.socket, address: tuple[str, int], seconds: float) -> None:
    """``sock_connect`` within ``seconds`` (else TimeoutError). A cancel that comes as the connect
    completes is a cancel: Python 3.11's ``asyncio.wait_for`` returned the connect's result
    then, and the relay went on, past the removal of its workload, for good."""
    async with asyncio.timeout(seconds):
        await asyncio.get_running_loop().sock_connect(sock, address)


def peer_address(sock: socket.socket) -> str | None:
    """The client's address, v4-mapped IPv6 turned back into IPv4."""
    try:
        host = str(sock.getpeername()[0])
    except OSError:
        return None
    ip = _unmapped(host)
    return str(ip) if ip.version == 4 else host


class DirectionStats:
    """Counters of one listener role of one workload."""

    __slots__ = ("active", "bytes_received", "bytes_sent", "connections", "failed", "open")

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.failed = 0
        #: Bytes from the connecting client towards the destination, and back.
        self.bytes_sent = 0
        self.bytes_received = 0
        #: The connections being relayed: the client's address and where each was sent, made
        #: into what ztunnel's config_dump lists only when it is read (``connection_dump``).
        self.open: dict[int, tuple[tuple[str, int], str, int]] = {}

    def as_dict(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "active": self.active,
            "failed": self.failed,
            "bytesSent": self.bytes_sent,
            "bytesReceived": self.bytes_received,
        }


class WorkloadTraffic:
    """Per-workload traffic through its listeners."""

    __slots__ = ("inbound", "outbound")

    def __init__(self) -> None:
        self.outbound = DirectionStats()
        self.inbound = DirectionStats()

    def role(self, name: str) -> DirectionStats:
        return self.inbound if name == "inbound" else self.outbound

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"outbound": self.outbound.as_dict(), "inbound": self.inbound.as_dict()}


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: Callable[[int], None]
) -> None:
    """Copy until EOF, then half-close the writer; waits for drain (backpressure)."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        count(len(data))
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def relay(
    client: socket.socket, upstream: socket.socket, stats: DirectionStats, *, idle: float | None = None
) -> None:
    """Relay both ways until both directions reached EOF (or, with ``idle``, until no byte
    moved either way for that many seconds); owns and closes both sockets."""
    c_reader, c_writer = await asyncio.open_connection(sock=client, limit=RELAY_BUFFER)
    try:
        u_reader, u_writer = await asyncio.open_connection(sock=upstream, limit=RELAY_BUFFER)
    except BaseException:
        c_writer.close()
        raise
    for writer in (c_writer, u_writer):
        writer.transport.set_write_buffer_limits(high=RELAY_BUFFER)
    loop = asyncio.get_running_loop()
    last = [loop.time()]

    def sent(n: int) -> None:
        stats.bytes_sent += n
        last[0] = loop.time()

    def received(n: int) -> None:
        stats.bytes_received += n
        last[0] = loop.time()

    pumps = asyncio.gather(_pump(c_reader, u_writer, sent), _pump(u_reader, c_writer, received))
    try:
        if idle is None:
            await pumps
        else:
            while not pumps.done() and (left := last[0] + idle - loop.time()) > 0:
                await asyncio.wait([pumps], timeout=left)
            if not pumps.done():
                log.debug("relay idle for %g s: closed", idle)
            else:
                pumps.result()
    except OSError as exc:
        # A reset from either side ends the relay, as does a peer keepalive found gone
        # (ETIMEDOUT) or unreachable: how TCP connections end, not an error here.
        log.debug("relay ended: %s", exc)
    except asyncio.CancelledError:  # (its pod removed, the process stopping): cut, not flushed
        for writer in (c_writer, u_writer):
            writer.transport.abort()
        raise
    finally:
        pumps.cancel()  # (done already, or the relay is idle or cancelled)
        for writer in (c_writer, u_writer):
            writer.close()
        # What is still buffered has RELAY_CLOSE_GRACE to go out: a close waits for it, and one
        # to a destination that never reads waited for good, its sockets and buffers held
        # past its pod's removal.
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            async with asyncio.timeout(RELAY_CLOSE_GRACE):
                for writer in (c_writer, u_writer):
                    await writer.wait_closed()
        for writer in (c_writer, u_writer):
            writer.transport.abort()  # (closed already: nothing)


async def proxy_connection(
    client: socket.socket,
    stats: DirectionStats,
    *,
    mark: int = defaults.ZTUNNEL_MARK,
    log_extra: dict[str, str] | None = None,
    connect_timeout: float = 10.0,
    preserve_source: bool = False,
    own_ports: frozenset[int] = frozenset(),
    inbound: bool = False,
) -> None:
    """Serve one redirected connection: find its original destination, connect there
    from inside the pod's netns (the one ``client`` was accepted in) with ``mark``, relay.
    Closes ``client`` in every case.

    ``preserve_source`` (inbound): connect from the client's own address (IP_TRANSPARENT),
    falling back to a plain connection when the kernel refuses."""
    stats.connections += 1
    stats.active += 1
    try:
        try:
            family, address, port = original_destination(client)
        except OriginalDestinationError as exc:
            stats.failed += 1
            log.debug("connection without an original destination dropped: %s", exc, extra=log_extra)
            _NOT_REDIRECTED.add(
                "dropped %d connection(s) without an original destination (the latest: %s)", exc
            )
            client.close()
            return
        refusal = _refuse(client, address, port, own_ports, inbound=inbound)
        if refusal is not None:
            # ztunnel refuses these too (its illegal_ports): relaying would dial our own
            # listener again, and again, until the process runs out of fds.
            stats.failed += 1
            log.debug("dropped a connection to %s:%d: %s", address, port, refusal, extra=log_extra)
            _REFUSED_DESTINATION.add(
                "dropped %d connection(s) (the latest to %s:%d: %s)", address, port, refusal
            )
            client.close()
            return
        if ipaddress.ip_address(address).version == 4:
            family = socket.AF_INET  # a v4 destination from a [::] listener
        # Listed from here, while its upstream is made and connected, as ztunnel tracks one
        # before it connects (outbound.rs track_outbound; inbound, assert_rbac)
        with contextlib.suppress(OSError):  # (the client gone already: not listed)
            stats.open[id(client)] = (client.getpeername()[:2], address, port)
        try:
            netns = socket_netns(client.fileno())
        except NetnsError as exc:
            stats.failed += 1
            _no_upstream(exc)
            return
        try:
            upstream = _upstream_socket(netns, family, mark, client if preserve_source else None, log_extra)
        except (OSError, NetnsError) as exc:  # (out of fds: a line every 10 s, no traceback each)
            stats.failed += 1
            _no_upstream(exc)
            return
        finally:
            os.close(netns)
        if past_data_path_reserve(upstream.fileno()):
            stats.failed += 1
            upstream.close()
            _no_upstream(
                f"fewer than {defaults.DATA_PATH_FD_RESERVE} fds free, kept for the pods' own sockets"
            )
            return
        try:
            tune_relay_socket(upstream)
            await connect_within(upstream, (address, port), connect_timeout)
        except (OSError, TimeoutError) as exc:
            stats.failed += 1
            upstream.close()
            client.close()
            log.debug("cannot connect to original destination %s:%d: %s", address, port, exc, extra=log_extra)
            _UNREACHABLE.add(
                "%d connection(s) could not reach their original destination (the latest %s:%d: %s)",
                address,
                port,
                exc,
            )
            return
        client.setblocking(False)
        try:
            tune_relay_socket(client)
        except OSError as exc:  # (the client reset already: the relay finds out)
            log.debug("cannot set the client socket's options: %s", exc, extra=log_extra)
        await relay(client, upstream, stats)
    finally:
        stats.open.pop(id(client), None)
        stats.active -= 1
        client.close()


def connection_dump(src: tuple[str, int], address: str, port: int, *, inbound: bool) -> dict[str, str | None]:
    """A relayed connection (an entry of ``DirectionStats.open``) as ztunnel's config_dump
    lists it (``connections`` of an Up workload, connection_manager.rs): ``src`` the client,
    ``actualDst`` where it was sent; outbound, ``originalDst`` that same destination (plain
    TCP, no waypoint); inbound, the service it was addressed to, which zds never knows (null,
    as ztunnel's for a pod's own address)."""
    actual = _socket_addr(address, port)
    return {
        "src": _socket_addr(str(src[0]), int(src[1])),
        "originalDst": None if inbound else actual,
        "actualDst": actual,
        "protocol": "TCP",
    }


def _socket_addr(host: str, port: int) -> str:
    """``host:port`` as Rust writes a SocketAddr: ``[v6]:port``, a v4-mapped address as v4."""
    ip = _unmapped(host)
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def _unmapped(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _refuse(
    client: socket.socket, address: str, port: int, own_ports: frozenset[int], *, inbound: bool
) -> str | None:
    """Why a connection must not be relayed, or None.

    - its original destination is the listener it arrived on: it was not redirected
      (someone connected to 15001/15006 directly), and relaying it would loop;
    - it is headed for one of ztunnel's own in-pod ports: inbound whatever the address,
      outbound on loopback (ztunnel's ``illegal_ports`` rules).
    """
    try:
        local = client.getsockname()
    except OSError:
        return "the client is gone"
    if _unmapped(str(local[0])) == _unmapped(address) and int(local[1]) == port:
        return "not redirected (a direct connection to the listener)"
    if port in own_ports and (inbound or _unmapped(address).is_loopback):
        return f"port {port} is one of ztunnel's own in-pod ports"
    return None


def _upstream_socket(
    netns: int,
    family: int,
    mark: int,
    client: socket.socket | None,
    log_extra: dict[str, str] | None,
) -> socket.socket:
    source = peer_address(client) if client is not None else None
    if source is not None and ipaddress.ip_address(source).version == (4 if family == socket.AF_INET else 6):
        try:
            return socket_in_netns(netns, family, mark, source=source)
        except OSError as exc:
            log.debug("cannot keep the source address %s: %s", source, exc, extra=log_extra)
    return socket_in_netns(netns, family, mark)
