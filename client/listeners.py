"""A workload's TCP listeners (15001 outbound, 15006 inbound, 15008 HBONE), made
inside its network namespace and served here; the DNS proxy's 15053 (UDP and TCP,
on the pod's loopback) is ``zds.client.dns``.

ztunnel (``src/inpod/config.rs``) creates each in-pod socket with a short
synchronous ``setns`` in and out (``InpodNetns::run``) and then serves it from
its runtime: a socket keeps the namespace it was created in. The same here:
``open_listeners`` enters the pod netns with ``zds.netns.in_netns`` (never
across an ``await``), creates, configures, binds and listens, comes back, and
``ListenerServer`` accepts on the event loop.

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

import asyncio
import contextlib
import errno
import logging
import select
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from zds import defaults
from zds.errors import ZdsError
from zds.netns import NetnsError, in_netns

log = logging.getLogger(__name__)

#: Listen backlog (ztunnel: 128 for in-pod listeners with port reuse).
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class ListenerSpec:
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


@dataclass
class InpodListener:
    """A listening socket that lives in a pod's netns (created there, served from here)."""

    spec: ListenerSpec
    sock: socket.socket
    address: str

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0


def _format_addr(family: int, port: int) -> str:
    return f"[::]:{port}" if family == socket.AF_INET6 else f"0.0.0.0:{port}"


def _bind_one(spec: ListenerSpec, *, mark: int, reuse_port: bool) -> InpodListener:
    """Create, configure, bind and listen one socket in the current netns."""
    for family in (socket.AF_INET6, socket.AF_INET):
        addr = _format_addr(family, spec.port)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 in this kernel: IPv4 only
            raise ListenerError(addr, exc) from exc
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", spec.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise ListenerError(addr, exc) from exc
        if spec.port == 0:  # the kernel picked the port: ask which
            host, port = sock.getsockname()[:2]
            addr = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        return InpodListener(spec=spec, sock=sock, address=addr)
    raise ListenerError(f"0.0.0.0:{spec.port}", "no usable address family")


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


# -- serving ------------------------------------------------------------------------


@dataclass
class AcceptedConnection:
    """One connection accepted on an in-pod listener; the handler owns ``sock``."""

    sock: socket.socket
    peer: str
    listener: InpodListener
    #: What the connection belongs to (the workload's proxy), for the handler's use.
    owner: object = None


#: Serves one accepted connection and closes its socket when done. The relay
#: (a later change) plugs in here, one handler per listener role.
ConnectionHandler = Callable[[AcceptedConnection], Awaitable[None]]


async def close_at_once(conn: AcceptedConnection) -> None:
    """The default handler until the data path exists: accept, then close."""
    conn.sock.close()


def _format_peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class SocketWatcher:
    """One epoll set for every in-pod socket a ztunnel serves, watched by the event loop as a
    single fd. Watching a socket is then one ``epoll_ctl``: an event loop's ``add_reader``
    costs several syscalls and a handle per fd (measured: uvloop makes ~20 syscalls per pod
    for its 7 sockets), and a node has thousands of idle pod listeners."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the sockets are served on (the running one, from the first ``watch``)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._ready)
        return self._loop

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) whenever ``fd`` is readable."""
        if self._loop is None:
            self.loop  # noqa: B018 (starts watching the epoll set)
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._epoll.fileno())
        self._loop = None
        self._callbacks.clear()
        self._epoll.close()


@dataclass
class ListenerServer:
    """Accepts on one in-pod listener from the event loop and hands each connection to ``handler``.

    The listening socket is watched through a ``SocketWatcher`` (no task while nothing
    arrives: a node with thousands of pods has several idle listeners per pod); each
    accepted connection gets a task of its own."""

    listener: InpodListener
    handler: ConnectionHandler
    owner: object = None
    log_extra: dict[str, str] = field(default_factory=dict)
    accepted: int = 0
    _watcher: SocketWatcher | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _watched: int = -1
    _resume: asyncio.TimerHandle | None = None
    _connections: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, watcher: SocketWatcher) -> None:
        """Start accepting (needs a running event loop)."""
        if self._loop is None:
            self._loop = watcher.loop
            self._watcher = watcher
            self._watch()

    def _watch(self) -> None:
        assert self._watcher is not None
        self._resume = None
        fd = self.listener.sock.fileno()
        if fd >= 0:
            self._watcher.watch(fd, self._accept_ready)
            self._watched = fd

    def _unwatch(self) -> None:
        if self._watched >= 0 and self._watcher is not None:
            self._watcher.unwatch(self._watched)
        self._watched = -1

    @property
    def connection_count(self) -> int:
        """Connections accepted here whose handler has not finished."""
        return len(self._connections)

    def _accept_ready(self) -> None:
        """The listener is readable: accept every waiting connection (never blocks)."""
        assert self._loop is not None
        while True:
            try:
                sock, addr = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds or memory: stop watching for a moment instead of spinning.
                    log.warning("accept on %s failed: %s", self.listener.address, exc, extra=self.log_extra)
                    self._unwatch()
                    self._resume = self._loop.call_later(0.1, self._watch)
                    return
                if not self.listener.closed:
                    log.error("accept on %s failed: %s", self.listener.address, exc, extra=self.log_extra)
                return
            sock.setblocking(False)
            self.accepted += 1
            conn = AcceptedConnection(
                sock=sock, peer=_format_peer(addr), listener=self.listener, owner=self.owner
            )
            task = self._loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: AcceptedConnection) -> None:
        try:
            await self.handler(conn)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "connection handler failed on %s (peer %s)",
                self.listener.address,
                conn.peer,
                extra=self.log_extra,
            )
        finally:
            conn.sock.close()

    def close(self) -> None:
        """Stop accepting and close the listening socket, now (synchronous)."""
        self._unwatch()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.listener.sock.close()

    def abort_connections(self) -> None:
        """Cancel every connection still being served (their sockets are closed)."""
        for task in list(self._connections):
            task.cancel()

    async def wait_connections(self) -> None:
        """Wait until every connection accepted here is done."""
        while self._connections:
            await asyncio.gather(*list(self._connections), return_exceptions=True)


def close_listeners(listeners: Iterable[InpodListener]) -> None:
    """Close listening sockets (idempotent)."""
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.sock.close()


__all__ = [
    "AcceptedConnection",
    "ConnectionHandler",
    "InpodListener",
    "ListenerError",
    "ListenerServer",
    "ListenerSpec",
    "NetnsError",
    "SocketWatcher",
    "bind_listeners",
    "close_at_once",
    "close_listeners",
    "default_specs",
    "open_listeners",
]
