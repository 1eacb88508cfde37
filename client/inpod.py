"""The sockets a workload's proxy makes inside its pod's network namespace; no event loop.

ztunnel's ``src/inpod/config.rs``: each in-pod socket is created with a short
synchronous ``setns`` in and out (``InpodNetns::run``) and then served from the
runtime; a socket keeps the namespace it was created in. Here the caller enters
the pod's netns (``zds.netns.in_netns``, never across an ``await``) and these
functions create, configure, bind and listen: the three TCP listeners
(15001 outbound, 15006 inbound, 15008 HBONE; ``zds.client.listeners`` serves
them) and the DNS forwarder's UDP and TCP sockets on 15053 (``zds.client.dns``
answers on them). Nothing here imports asyncio: ``zds ztunnel`` takes its first
snapshot before the event loop exists (``zds.client.session``).

Address family: one dual-stack ``[::]`` socket per port, as ztunnel binds
(``config.rs``: ``bind_wildcard`` is ``[::]`` when IPv6 is enabled). IPv4
clients arrive as v4-mapped peers; for ``SO_ORIGINAL_DST`` the relay asks
``SOL_IP`` first and ``IPPROTO_IPV6`` second, as ztunnel's ``socket.rs``
``orig_dst_addr`` does. Where the kernel has no IPv6 at all, the listener
falls back to ``0.0.0.0``. One socket per port also keeps a conflict simple:
a port taken by the pod fails the whole proxy, never half of it.

Socket options are ztunnel's: ``SO_MARK`` (1337, so what the proxy sends is
not redirected again), ``SO_REUSEPORT`` (ztunnel's ``INPOD_PORT_REUSE``, on by
default: an old and a new ztunnel both listen in the pod during an upgrade)
and ``SO_REUSEADDR``. A socket the pod bound without ``SO_REUSEPORT`` still
conflicts, which is how "port already taken" shows up.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import NamedTuple

from zds import defaults
from zds.errors import ZdsError
from zds.netns import in_netns
from zds.values import frozen

DNS_PORT = 53

#: Listen backlog (ztunnel: 128 for in-pod listeners with port reuse).
LISTEN_BACKLOG = 128


@frozen
class ListenerSpec(NamedTuple):
    """What to listen on in a pod: a named role and a TCP port."""

    name: str
    port: int


def default_specs(
    outbound: int = defaults.OUTBOUND_PORT,
    inbound: int = defaults.INBOUND_PLAINTEXT_PORT,
    hbone: int = defaults.INBOUND_HBONE_PORT,
) -> tuple[ListenerSpec, ...]:
    """ztunnel's three in-pod TCP listeners: outbound 15001, inbound plaintext 15006, HBONE 15008."""
    return (
        ListenerSpec("outbound", outbound),
        ListenerSpec("inbound", inbound),
        ListenerSpec("hbone", hbone),
    )


class ListenerError(ZdsError):
    """A listener could not be made in the pod; the text reads like ztunnel's ``Bind(addr, err)``."""

    def __init__(self, address: str, cause: OSError | str) -> None:
        super().__init__(f"Bind({address}, {cause})")
        self.address = address
        self.errno = cause.errno if isinstance(cause, OSError) else None


@frozen
class InpodListener(NamedTuple):
    """A listening socket that lives in a pod's netns (created there, served from here)."""

    spec: ListenerSpec
    sock: socket.socket
    address: str

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0


def _address(family: int, host: str, port: int) -> str:
    """``host:port`` as logs and errors show it (``[host]:port`` for IPv6)."""
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def _set_ztunnel_options(sock: socket.socket, *, mark: int, reuse_port: bool) -> None:
    """ztunnel's options on every socket it makes in a pod (module docstring)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def _bind_one(spec: ListenerSpec, *, mark: int, reuse_port: bool) -> InpodListener:
    """Create, configure, bind and listen one socket in the current netns."""
    for family in (socket.AF_INET6, socket.AF_INET):
        wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
        addr = _address(family, wildcard, spec.port)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 in this kernel: IPv4 only
            raise ListenerError(addr, exc) from exc
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _set_ztunnel_options(sock, mark=mark, reuse_port=reuse_port)
            sock.bind((wildcard, spec.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise ListenerError(addr, exc) from exc
        if spec.port == 0:  # the kernel picked the port: ask which
            host, port = sock.getsockname()[:2]
            addr = _address(family, host, port)
        return InpodListener(spec=spec, sock=sock, address=addr)
    raise ListenerError(_address(socket.AF_INET, "0.0.0.0", spec.port), "no usable address family")


def bind_listeners(
    specs: Iterable[ListenerSpec], *, mark: int = defaults.ZTUNNEL_MARK, reuse_port: bool = True
) -> list[InpodListener]:
    """Every listener of ``specs`` in the *current* netns (the caller is inside the pod's),
    all or none: ListenerError (a port is taken, ...) leaves nothing open."""
    made: list[InpodListener] = []
    try:
        for spec in specs:
            made.append(_bind_one(spec, mark=mark, reuse_port=reuse_port))
    except BaseException:
        close_listeners(made)
        raise
    return made


def open_listeners(
    netns_fd: int,
    specs: Iterable[ListenerSpec],
    *,
    mark: int = defaults.ZTUNNEL_MARK,
    reuse_port: bool = True,
) -> list[InpodListener]:
    """Open every listener of ``specs`` inside the netns ``netns_fd``, all or none.

    Synchronous and short: setns in, make the sockets, setns back (guaranteed).
    Raises ListenerError (a port is taken, ...) or NetnsError (not a netns, no
    privilege); nothing is left open then.
    """
    with in_netns(netns_fd):
        return bind_listeners(specs, mark=mark, reuse_port=reuse_port)


def close_listeners(listeners: Iterable[InpodListener]) -> None:
    """Close listening sockets (idempotent)."""
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.sock.close()


Resolver = tuple[str, int]


def node_resolvers(path: str = "/etc/resolv.conf") -> list[Resolver]:
    """The ``nameserver`` addresses of the node (the resolvers zds forwards to), port 53."""
    found: list[Resolver] = []
    # (errors replaced: a comment in another encoding, "# G\xe9n\xe9r\xe9" in Latin-1, was a
    # UnicodeDecodeError traceback at every start; the nameserver lines are ASCII)
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
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


IP_PKTINFO = 8  # linux/in.h (Python 3.11's socket module lacks it)


#: Where the DNS forwarder listens in the pod: loopback only, as ztunnel's in-pod DNS
#: (``Address::Localhost``). The in-pod rules' REDIRECT maps locally generated packets to
#: exactly these addresses, so capture works, and the pod's IPs do not offer an open resolver.
DNS_BIND = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))


def _open_dns_socket(
    family: int, host: str, kind: int, port: int, *, mark: int, reuse_port: bool
) -> socket.socket:
    """A UDP or TCP socket on ``host:port``; UDP ones report each datagram's local address (PKTINFO),
    which the reply is sent from (so conntrack maps it back to the server the pod asked)."""
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        _set_ztunnel_options(sock, mark=mark, reuse_port=reuse_port)
        if kind == socket.SOCK_DGRAM:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


@frozen
class DnsSockets(NamedTuple):
    """A pod's port 15053: UDP sockets (IPv4, IPv6) and TCP listeners, made inside its netns."""

    udp: list[socket.socket]
    tcp: list[InpodListener]

    @classmethod
    def bind(cls, port: int, *, mark: int, reuse_port: bool) -> DnsSockets:
        """Make the sockets in the *current* netns (the caller is inside the pod's); OSError if
        the port is taken, nothing left open then. IPv6 loopback is skipped where the pod has no IPv6."""
        udp: list[socket.socket] = []
        tcp: list[InpodListener] = []
        try:
            for family, host in DNS_BIND:
                try:
                    u = _open_dns_socket(
                        family, host, socket.SOCK_DGRAM, port, mark=mark, reuse_port=reuse_port
                    )
                except OSError as exc:
                    if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                        continue  # no IPv6 in this pod
                    raise
                udp.append(u)
                t = _open_dns_socket(family, host, socket.SOCK_STREAM, port, mark=mark, reuse_port=reuse_port)
                tcp.append(
                    InpodListener(
                        spec=ListenerSpec("dns", port), sock=t, address=_address(family, host, port)
                    )
                )
        except BaseException:
            cls(udp, tcp).close()
            raise
        return cls(udp=udp, tcp=tcp)

    def close(self) -> None:
        """Close every socket (idempotent)."""
        for sock in self.udp:
            sock.close()
        close_listeners(self.tcp)


def dns_port_error(exc: OSError, port: int = defaults.DNS_PORT) -> str:
    """A readable reason for a DNS port that could not be opened."""
    if exc.errno == errno.EADDRINUSE:
        return f"127.0.0.1:{port}: address already in use"
    return f"127.0.0.1:{port}: {exc.strerror or exc}"
