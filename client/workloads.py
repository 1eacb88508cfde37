"""The running proxies: one per workload that is Up, with its listeners in the pod.

``zds.protocol.ztunnel`` decides *which* workloads should have a proxy; this
module is what starts and stops one (ztunnel's ``ProxyFactory`` plus the
per-workload drain of ``statemanager.rs``). Starting is synchronous, so its
outcome is known before the ack is sent:

1. the netns fd must be a network namespace (ztunnel notices a bad one when
   ``setns`` fails; checking first gives a clearer error);
2. unless listeners are off, every listener is made inside that netns in one
   visit (15001, 15006, 15008, and the DNS proxy's 15053 unless DNS is off);
3. the fd budget is checked: a pod that would leave the process fewer than
   ``FD_RESERVE`` free fds is refused (its sockets closed again);
4. after the ack has gone out (``activate``), each listener is served from the
   event loop by a ``ListenerServer``: the sockets listen already, so nothing
   that arrives meanwhile is lost, and the node agent is not kept waiting
   (during the first snapshot, taken before the loop runs, from when it runs).

Starting needs no event loop, and this module loads none: ``zds ztunnel`` takes
its first snapshot before asyncio is imported (``zds.client.session``), so the
serving half (``zds.client.listeners``, ``zds.client.dns``) is imported when the
first proxy is served; the proxies of that snapshot are served, counted and
logged once the loop runs (one stopped before is said started first).

A proxy keeps no fd of the pod's netns: its sockets hold the namespace, and a
connection handler that must make a socket in the pod (the relays of 15001
and 15006) gets the netns back from the accepted socket (``SIOCGSKNS``). So a
pod costs exactly its listening sockets: 7 fds with IPv6 (3 TCP, UDP+TCP DNS
on 127.0.0.1 and ::1), 5 without.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from zds import defaults, limits
from zds.client.inpod import (
    DnsSockets,
    InpodListener,
    ListenerError,
    ListenerSpec,
    Resolver,
    bind_listeners,
    close_listeners,
    default_specs,
    dns_port_error,
)
from zds.client.metrics import ZtunnelMetrics
from zds.errors import ZdsError, printable
from zds.netns import (
    NetnsError,
    NetnsHandle,
    NetnsIdentity,
    OutOfFds,
    current_netns,
    in_netns,
    netns_identity,
    netns_identity_of_path,
    validate_netns_fd,
)
from zds.netns.kernel import THREAD_NETNS
from zds.protocol.messages import WorkloadInfo
from zds.protocol.workloads import Workload
from zds.values import frozen

if TYPE_CHECKING:  # serving needs asyncio, loaded once the first snapshot is in (module docstring)
    from zds.client.dns import DnsProxy
    from zds.client.listeners import ConnectionHandler, ListenerServer, SocketWatcher

log = logging.getLogger("zds.ztunnel.proxy")


@frozen
class ProxySettings(NamedTuple):
    """How proxies are made: which listeners, with which mark, or none at all."""

    #: False: protocol-only mode (``--no-listeners``); the netns is still checked.
    listeners: bool = True
    specs: tuple[ListenerSpec, ...] = default_specs()
    mark: int = defaults.ZTUNNEL_MARK
    #: SO_REUSEPORT on the listeners (ztunnel's INPOD_PORT_REUSE, default on).
    reuse_port: bool = True
    #: UDP+TCP DNS forwarder port in each pod (where the in-pod rules send DNS); None: off.
    dns_port: int | None = defaults.DNS_PORT
    #: Resolvers the DNS forwarder asks (the node's; read once at start).
    resolvers: tuple[tuple[str, int], ...] = ()
    #: Inbound relays connect from the client's address (IP_TRANSPARENT), as ztunnel does.
    preserve_source: bool = True
    #: Serve a workload whose netns is ztunnel's own (the node's): off unless asked for.
    allow_own_netns: bool = False
    #: Free fds a proxy start must leave (see ``defaults.FD_RESERVE``).
    fd_reserve: int = defaults.FD_RESERVE


class ProxyStartError(ZdsError):
    """A proxy could not start; the text goes after ``failure to start proxy : ``."""


class FdBudgetExhausted(ProxyStartError):
    """Starting the proxy would leave the process fewer than ``fd_reserve`` fds; ``free``:
    how many are free once its sockets are closed again."""

    def __init__(self, message: str, free: int) -> None:
        super().__init__(message)
        self.free = free


def out_of_fds(exc: BaseException) -> bool:
    """Whether a failed proxy start ran out of fds: the budget, or EMFILE/ENFILE on the way."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FdBudgetExhausted | OutOfFds):
            return True
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def workload_log_extra(uid: str, info: WorkloadInfo | None) -> dict[str, str]:
    """Structured-log context for a workload."""
    extra = {"uid": uid}
    if info is not None:
        extra.update(pod=info.name, namespace=info.namespace)
    return extra


class WorkloadProxy:
    """A workload's running proxy: its listeners and their servers (and the pod's netns through them)."""

    def __init__(self, uid: str, info: WorkloadInfo, listeners: list[InpodListener], netns: str = "") -> None:
        self.uid = uid
        self.info = info
        self.listeners = listeners
        self.servers: list[ListenerServer] = []
        #: The DNS forwarder's sockets, made with the listeners; served by ``dns`` once active.
        self.dns_sockets: DnsSockets | None = None
        self.dns: DnsProxy | None = None
        self.log_extra = workload_log_extra(uid, info)
        #: The pod's netns identity (``dev:ino``), for the log.
        self.netns = netns
        self.closed = False
        #: Counted and logged as started (``WorkloadProxies.announce``).
        self.announced = False

    @property
    def addresses(self) -> list[str]:
        """``name=address`` of each listener (in the pod's netns)."""
        return [f"{listener.spec.name}={listener.address}" for listener in self.listeners]

    @property
    def connection_count(self) -> int:
        """Connections being served now, over all listeners."""
        return sum(server.connection_count for server in self.servers)

    def serve(
        self, handlers: Mapping[str, ConnectionHandler], watcher: SocketWatcher, resolvers: list[Resolver]
    ) -> None:
        """Start accepting on every listener, and answering DNS with ``resolvers`` (needs a running loop)."""
        from zds.client.dns import DnsProxy
        from zds.client.listeners import ListenerServer, close_at_once

        if self.closed or self.servers:
            return
        if self.dns_sockets is not None:
            self.dns = DnsProxy(self.dns_sockets, resolvers)
        for listener in self.listeners:
            server = ListenerServer(
                listener=listener,
                handler=handlers.get(listener.spec.name, close_at_once),
                owner=self,
                log_extra=self.log_extra,
            )
            self.servers.append(server)
            server.start(watcher)
        if self.dns is not None:
            self.dns.start_udp(watcher)

    def close(self, *, abort: bool = True) -> None:
        """Close the listeners now; with ``abort``, cancel established connections too."""
        self.closed = True
        for server in self.servers:
            server.close()
            if abort:
                server.abort_connections()
        close_listeners(self.listeners)
        if self.dns is not None:
            self.dns.close()  # it stops watching its sockets, then closes them
        elif self.dns_sockets is not None:
            self.dns_sockets.close()

    async def wait_connections(self) -> None:
        """Wait until no connection accepted by this proxy is being served."""
        for server in self.servers:
            await server.wait_connections()


class WorkloadProxies:
    """Starts and stops the proxy of each workload; one per uid at most."""

    def __init__(
        self,
        settings: ProxySettings,
        metrics: ZtunnelMetrics,
        handlers: Mapping[str, ConnectionHandler] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.handlers: dict[str, ConnectionHandler] = dict(handlers or {})
        self._proxies: dict[str, WorkloadProxy] = {}
        #: ztunnel's own netns: a workload in it would have ztunnel listen on the node.
        self._own_netns = netns_identity_of_path(THREAD_NETNS)
        #: The way back from each pod's netns, opened once (not once per pod).
        self._home: NetnsHandle | None = None
        self._watcher: SocketWatcher | None = None

    def __contains__(self, uid: object) -> bool:
        return uid in self._proxies

    def __len__(self) -> int:
        return len(self._proxies)

    def _refuse_own_netns(self, uid: str, identity: NetnsIdentity) -> None:
        if identity == self._own_netns and not self.settings.allow_own_netns:
            raise ProxyStartError(
                f"the netns fd of {printable(uid)} is ztunnel's own network namespace ({identity}): serving it would "
                "listen on the node; refusing (zds ztunnel --allow-own-netns serves it anyway)"
            )

    def get(self, uid: str) -> WorkloadProxy | None:
        """The running proxy of ``uid``, if any."""
        return self._proxies.get(uid)

    def start(self, workload: Workload) -> WorkloadProxy:
        """Start ``workload``'s proxy now (synchronously): its sockets listen when this returns.
        Raises ProxyStartError if it cannot. ``activate`` it once the ack is sent."""
        uid = workload.uid
        if uid in self._proxies:
            # The protocol stops a proxy before starting its replacement; be safe anyway.
            self.stop(uid, "replaced")
        fd = workload.netns_fd
        if fd is None:
            raise ProxyStartError(f"the netns fd of {printable(uid)} is gone")
        try:
            validate_netns_fd(fd, f"the netns fd of {printable(uid)}")
            self._refuse_own_netns(uid, netns_identity(fd))
        except NetnsError as exc:
            raise ProxyStartError(str(exc)) from exc
        listeners: list[InpodListener] = []
        dns: DnsSockets | None = None
        if self.settings.listeners:
            listeners, dns = self._open_sockets(fd)
        proxy = WorkloadProxy(uid, workload.info, listeners, str(workload.netns_id))
        proxy.dns_sockets = dns
        self._proxies[uid] = proxy
        return proxy

    def _open_sockets(self, fd: int) -> tuple[list[InpodListener], DnsSockets | None]:
        """Every socket of a proxy, made in one visit to the pod's netns; all or none."""
        settings = self.settings
        listeners: list[InpodListener] = []
        dns: DnsSockets | None = None
        try:
            if self._home is None:
                self._home = current_netns()
            with in_netns(fd, back=self._home):
                # DNS first, as ztunnel's proxy factory: with several ports taken, the nack names 15053.
                if settings.dns_port is not None:
                    try:
                        dns = DnsSockets.bind(
                            settings.dns_port, mark=settings.mark, reuse_port=settings.reuse_port
                        )
                    except OSError as exc:
                        raise ProxyStartError(dns_port_error(exc, settings.dns_port)) from exc
                listeners = bind_listeners(settings.specs, mark=settings.mark, reuse_port=settings.reuse_port)
                if dns is not None:
                    listeners.extend(dns.tcp)
            self._check_fd_budget(listeners, dns)
        except BaseException as exc:
            close_listeners(listeners)
            if dns is not None:
                dns.close()
            if isinstance(exc, ListenerError | NetnsError | OSError):
                raise ProxyStartError(str(exc)) from exc
            raise
        return listeners, dns

    def _check_fd_budget(self, listeners: list[InpodListener], dns: DnsSockets | None) -> None:
        """Refuse the pod if it leaves fewer than ``fd_reserve`` fds free (counted exactly, but
        only near the limit: the fds just made are the highest numbers in use there)."""
        socks = [listener.sock for listener in listeners] + (dns.udp if dns is not None else [])
        if not socks:
            return
        reserve = self.settings.fd_reserve
        shortage = limits.fd_shortage(reserve, highest=max(s.fileno() for s in socks))
        if shortage is None:
            return
        in_use, limit = shortage
        raise FdBudgetExhausted(
            f"fd budget exhausted: {in_use} of {limit} fds open (RLIMIT_NOFILE), a pod takes "
            f"{len(socks)} and {reserve} are kept free; raise the limit (ulimit -n, LimitNOFILE) "
            "or serve fewer pods with this ztunnel",
            free=limit - in_use + len(socks),
        )

    def activate(self, proxy: WorkloadProxy) -> None:
        """Serve a started proxy's listeners (after its ack went out) and say so."""
        proxy.serve(self.handlers, self.watcher, list(self.settings.resolvers))  # not if it stopped since
        self.announce(proxy)

    def announce(self, proxy: WorkloadProxy) -> None:
        """Count and log a proxy started (its ack went out), once; not if it stopped since."""
        if proxy.closed or proxy.announced:
            return
        proxy.announced = True
        self.metrics.inc("workload_manager_proxies_started_total")
        log.info(
            "proxy started%s",
            "" if proxy.listeners else " (no listeners)",
            extra={**proxy.log_extra, "netns": proxy.netns},
        )
        log.debug("listening on %s", ", ".join(proxy.addresses), extra=proxy.log_extra)

    def stop(self, uid: str, reason: str, *, abort: bool = True) -> bool:
        """Stop ``uid``'s proxy (close its listeners now); False if it had none."""
        proxy = self._proxies.pop(uid, None)
        if proxy is None:
            return False
        self.announce(proxy)  # one taken before the loop ran may not have been said started yet
        proxy.close(abort=abort)
        self.metrics.inc("workload_manager_proxies_stopped_total")
        log.info("proxy stopped: %s", reason, extra=proxy.log_extra)
        return True

    def stop_all(self, reason: str, *, abort: bool = True) -> list[WorkloadProxy]:
        """Stop every proxy; returns them (to wait for their connections)."""
        stopped = list(self._proxies.values())
        for uid in list(self._proxies):
            self.stop(uid, reason, abort=abort)
        return stopped

    def close(self) -> None:
        """Release what the proxies share (the way back from the pods' netns)."""
        if self._home is not None:
            self._home.close()
            self._home = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    @property
    def watcher(self) -> SocketWatcher:
        """Watches every listening socket of every proxy (made when the first is served)."""
        if self._watcher is None:
            from zds.client.listeners import SocketWatcher

            self._watcher = SocketWatcher()
        return self._watcher

    def all(self) -> list[WorkloadProxy]:
        """Every running proxy."""
        return list(self._proxies.values())
