"""The running proxies: one per workload that is Up, with its listeners in the pod.

``zds.protocol.ztunnel`` decides *which* workloads should have a proxy; this
module is what starts and stops one (ztunnel's ``ProxyFactory`` plus the
per-workload drain of ``statemanager.rs``). Starting is synchronous, so its
outcome is known before the ack is sent:

1. the netns fd must be a network namespace (ztunnel notices a bad one when
   ``setns`` fails; checking first gives a clearer error);
2. unless listeners are off, the listeners are made inside that netns
   (15001, 15006, 15008, and the DNS proxy's 15053 unless DNS is off);
3. each listener is served from the event loop by a ``ListenerServer``.

Each proxy holds its own dup of the netns fd (``NetnsHandle``), so a
connection handler that makes a socket in the pod (the relays of 15001 and
15006, the DNS proxy) keeps a valid namespace until it finishes, whatever the
protocol does with its own fd meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from zds import defaults
from zds.client.dns import DnsProxy, dns_port_error
from zds.client.listeners import (
    ConnectionHandler,
    InpodListener,
    ListenerError,
    ListenerServer,
    ListenerSpec,
    close_at_once,
    close_listeners,
    default_specs,
    open_listeners,
)
from zds.client.metrics import ZtunnelMetrics
from zds.errors import ZdsError
from zds.netns import NetnsError, NetnsHandle, NetnsIdentity, netns_identity, validate_netns_fd
from zds.netns.kernel import THREAD_NETNS
from zds.protocol.messages import WorkloadInfo
from zds.protocol.workloads import Workload

log = logging.getLogger("zds.ztunnel.proxy")


@dataclass(frozen=True)
class ProxySettings:
    """How proxies are made: which listeners, with which mark, or none at all."""

    #: False: protocol-only mode (``--no-listeners``); the netns is still checked.
    listeners: bool = True
    specs: tuple[ListenerSpec, ...] = field(default_factory=default_specs)
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


class ProxyStartError(ZdsError):
    """A proxy could not start; the text goes after ``failure to start proxy : ``."""


def workload_log_extra(uid: str, info: WorkloadInfo | None) -> dict[str, str]:
    """Structured-log context for a workload."""
    extra = {"uid": uid}
    if info is not None:
        extra.update(pod=info.name, namespace=info.namespace)
    return extra


class WorkloadProxy:
    """A workload's running proxy: its own netns handle, its listeners and their servers."""

    def __init__(
        self, uid: str, info: WorkloadInfo, netns: NetnsHandle, listeners: list[InpodListener]
    ) -> None:
        self.uid = uid
        self.info = info
        self.netns = netns
        self.listeners = listeners
        self.servers: list[ListenerServer] = []
        self.dns: DnsProxy | None = None
        self._dns_start: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.log_extra = workload_log_extra(uid, info)
        self._release: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        """``name=address`` of each listener (in the pod's netns)."""
        return [f"{listener.spec.name}={listener.address}" for listener in self.listeners]

    @property
    def connection_count(self) -> int:
        """Connections being served now, over all listeners."""
        return sum(server.connection_count for server in self.servers)

    def serve(self, handlers: Mapping[str, ConnectionHandler]) -> None:
        """Start accepting on every listener."""
        for listener in self.listeners:
            server = ListenerServer(
                listener=listener,
                handler=handlers.get(listener.spec.name, close_at_once),
                owner=self,
                log_extra=self.log_extra,
            )
            self.servers.append(server)
            server.start()
        if self.dns is not None:
            self._dns_start = asyncio.get_running_loop().create_task(self.dns.start_udp())

    def close(self, *, abort: bool = True) -> None:
        """Close the listeners now; with ``abort``, cancel established connections too.
        The netns handle is released once no connection is left."""
        for server in self.servers:
            server.close()
            if abort:
                server.abort_connections()
        for listener in self.listeners:
            listener.sock.close()
        if self.dns is not None:
            self.dns.close()
        if self.connection_count == 0:
            self.netns.close()
        elif self._release is None:
            self._release = asyncio.get_running_loop().create_task(self._release_when_idle())

    async def _release_when_idle(self) -> None:
        try:
            await self.wait_connections()
        finally:
            self.netns.close()

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

    def __contains__(self, uid: object) -> bool:
        return uid in self._proxies

    def __len__(self) -> int:
        return len(self._proxies)

    def _refuse_own_netns(self, uid: str, identity: NetnsIdentity) -> None:
        if identity == self._own_netns and not self.settings.allow_own_netns:
            raise ProxyStartError(
                f"the netns fd of {uid} is ztunnel's own network namespace ({identity}): serving it would "
                "listen on the node; refusing (zds ztunnel --allow-own-netns serves it anyway)"
            )

    def get(self, uid: str) -> WorkloadProxy | None:
        """The running proxy of ``uid``, if any."""
        return self._proxies.get(uid)

    def start(self, workload: Workload) -> WorkloadProxy:
        """Start ``workload``'s proxy now (synchronously); raise ProxyStartError if it cannot."""
        uid = workload.uid
        extra = workload_log_extra(uid, workload.info)
        if uid in self._proxies:
            # The protocol stops a proxy before starting its replacement; be safe anyway.
            self.stop(uid, "replaced")
        try:
            validate_netns_fd(workload.netns_fd, f"the netns fd of {uid}")
            self._refuse_own_netns(uid, netns_identity(workload.netns_fd))
            netns = NetnsHandle.from_fd(os.dup(workload.netns_fd), f"netns of {uid}", validate=False)
        except (NetnsError, OSError) as exc:
            raise ProxyStartError(str(exc)) from exc
        listeners: list[InpodListener] = []
        if self.settings.listeners:
            try:
                listeners = open_listeners(
                    netns.fileno(),
                    self.settings.specs,
                    mark=self.settings.mark,
                    reuse_port=self.settings.reuse_port,
                )
            except (ListenerError, NetnsError, OSError) as exc:
                netns.close()
                raise ProxyStartError(str(exc)) from exc
        dns: DnsProxy | None = None
        if self.settings.listeners and self.settings.dns_port is not None:
            try:
                dns = DnsProxy.open(
                    netns.fileno(),
                    self.settings.dns_port,
                    mark=self.settings.mark,
                    reuse_port=self.settings.reuse_port,
                    resolvers=list(self.settings.resolvers),
                )
            except (OSError, NetnsError) as exc:
                close_listeners(listeners)
                netns.close()
                if isinstance(exc, NetnsError):
                    raise ProxyStartError(str(exc)) from exc
                raise ProxyStartError(dns_port_error(exc, self.settings.dns_port)) from exc
            listeners.extend(dns.tcp)
        proxy = WorkloadProxy(uid, workload.info, netns, listeners)
        proxy.dns = dns
        proxy.serve(self.handlers)
        self._proxies[uid] = proxy
        self.metrics.inc("workload_manager_proxies_started_total")
        log.info(
            "proxy started%s",
            f" listening on {', '.join(proxy.addresses)}" if listeners else " (no listeners)",
            extra={**extra, "netns": str(netns.identity)},
        )
        return proxy

    def stop(self, uid: str, reason: str, *, abort: bool = True) -> bool:
        """Stop ``uid``'s proxy (close its listeners now); False if it had none."""
        proxy = self._proxies.pop(uid, None)
        if proxy is None:
            return False
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

    def all(self) -> list[WorkloadProxy]:
        """Every running proxy."""
        return list(self._proxies.values())


def netns_identity_of_path(path: str) -> NetnsIdentity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return NetnsIdentity(st.st_dev, st.st_ino)
