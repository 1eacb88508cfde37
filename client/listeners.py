"""Serving a workload's in-pod listeners from the event loop.

The sockets are made inside the pod's network namespace by ``zds.client.inpod``
(15001 outbound, 15006 inbound, 15008 HBONE, and the DNS forwarder's TCP 15053);
a socket keeps the namespace it was created in, so serving it needs no ``setns``:
``ListenerServer`` accepts on the event loop, through one ``SocketWatcher`` epoll
set for every listener of the process, and hands each connection to its role's
handler (``zds.client.datapath``'s relays, ``zds.client.dns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import select
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from zds import defaults
from zds.client.inpod import (
    InpodListener,
    ListenerError,
    ListenerSpec,
    bind_listeners,
    close_listeners,
    default_specs,
    open_listeners,
)
from zds.logs import Tally
from zds.netns import NetnsError
from zds.values import frozen

log = logging.getLogger(__name__)

#: Connections refused for want of fds, said in a line every 10 s (a flood would be a line each).
_REFUSED = Tally(10.0, log)


def flush_refusals() -> None:
    """Say the refusals counted and not said yet (at a stop)."""
    _REFUSED.flush()


def past_data_path_reserve(fd: int) -> bool:
    """Whether ``fd``, just made for the data path (an accepted connection, a relay's upstream
    socket, a DNS query's), is numbered within the top DATA_PATH_FD_RESERVE of RLIMIT_NOFILE:
    fds are numbered from the lowest free one up, so fewer than that are free. The data path
    then closes it and gives up what it was for: it never holds one of those fds, which stay
    for the pods' own sockets and netns fds."""
    return fd >= _data_path_ceiling()


def _data_path_ceiling() -> int:
    """The lowest fd number the data path may not keep."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (1 << 62) if limit == resource.RLIM_INFINITY else limit - defaults.DATA_PATH_FD_RESERVE


# -- serving ------------------------------------------------------------------------


@frozen
class AcceptedConnection(NamedTuple):
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


class ListenerServer:
    """Accepts on one in-pod listener from the event loop and hands each connection to ``handler``.

    The listening socket is watched through a ``SocketWatcher`` (no task while nothing
    arrives: a node with thousands of pods has several idle listeners per pod); each
    accepted connection gets a task of its own."""

    def __init__(
        self,
        listener: InpodListener,
        handler: ConnectionHandler,
        owner: object = None,
        log_extra: dict[str, str] | None = None,
    ) -> None:
        self.listener = listener
        self.handler = handler
        # Weak: the owner (a workload's proxy) holds its servers, and a cycle between them kept
        # every stopped proxy, its listeners and their buffers until a full collection.
        self._owner = None if owner is None else weakref.ref(owner)
        self.log_extra = {} if log_extra is None else log_extra
        self.accepted = 0
        #: Connections closed as they were accepted: too few fds free (DATA_PATH_FD_RESERVE).
        self.refused = 0
        self._watcher: SocketWatcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched = -1
        self._resume: asyncio.TimerHandle | None = None
        self._connections: set[asyncio.Task[None]] = set()

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
    def owner(self) -> object:
        """What the connections accepted here belong to (None: nothing, or it is gone)."""
        return None if self._owner is None else self._owner()

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
                # The listener stays readable (level-triggered) while accept fails: called
                # again at once, for good. Out of fds or memory: stop watching for a moment.
                # Anything else (a listener taken out of LISTEN under us, `ss -K`: EINVAL for
                # good): stop watching, said once.
                self._unwatch()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept on %s failed: %s", self.listener.address, exc, extra=self.log_extra)
                    self._resume = self._loop.call_later(0.1, self._watch)
                elif not self.listener.closed:
                    log.error(
                        "accept on %s failed: %s; no longer accepting there",
                        self.listener.address,
                        exc,
                        extra=self.log_extra,
                    )
                return
            if past_data_path_reserve(sock.fileno()):  # (the pods' own sockets come first)
                sock.close()
                self.refused += 1
                _REFUSED.add(
                    "refused %d connection(s) into pods: fewer than %d fds free (RLIMIT_NOFILE), kept for "
                    "the pods' own sockets (the latest to %s of pod %s)",
                    defaults.DATA_PATH_FD_RESERVE,
                    self.listener.address,
                    getattr(self.owner, "uid", "?"),
                )
                continue
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
            # (wait, not gather: a waiter cut short leaves the connections to their owner, and
            # no gathering future with nobody to read it)
            await asyncio.wait(list(self._connections))


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
