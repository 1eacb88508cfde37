"""``zds ztunnel``'s configuration, and the parts of it that need no event loop.

``ZtunnelParts`` are made before asyncio is loaded: the metrics, the sans-I/O
protocol, the proxies and the bound HTTP sockets. ``zds ztunnel`` takes its first
snapshot with them (``zds.client.session.take_first_snapshot``), then hands them to
``zds.client.app.Ztunnel``, which makes its own when it is given none.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import NamedTuple

from zds import defaults
from zds.client.admin import HttpEndpoints
from zds.client.metrics import ZtunnelMetrics
from zds.client.session import Handover, StopSignals, take_first_snapshot
from zds.client.workloads import ProxySettings, WorkloadProxies
from zds.netns import NetnsError, netns_identity
from zds.protocol.ztunnel import ZtunnelProtocol
from zds.values import frozen

log = logging.getLogger("zds.ztunnel")


@frozen
class ZtunnelConfig(NamedTuple):
    """Everything ``zds ztunnel`` is told on its command line."""

    zds_socket: str = defaults.ZDS_SOCKET
    admin_listen: str = defaults.ADMIN_LISTEN
    readiness_listen: str = defaults.READINESS_LISTEN
    metrics_listen: str = defaults.METRICS_LISTEN
    proxy: ProxySettings = ProxySettings()
    retry_interval: float = defaults.PENDING_RETRY_INTERVAL
    #: Seconds to poll for the next message after each ack (0: never; ``zds.transport.BusyPoll``).
    busy_poll: float = defaults.BUSY_POLL
    drain_timeout: float = defaults.DRAIN_TIMEOUT
    #: Faults to arm at start (zds ztunnel --faults FILE).
    faults_file: str | None = None
    #: POST /faults is served (--faults-api, or --faults): faults can be armed while it runs.
    faults_api: bool = False

    def ports(self) -> dict[str, int]:
        """Every in-pod port by listener name: outbound, inbound, hbone, and dns unless it is off."""
        ports = {spec.name: spec.port for spec in self.proxy.specs}
        if self.proxy.dns_port:
            ports["dns"] = self.proxy.dns_port
        return ports

    def describe(self) -> str:
        """What the start-up line says about the proxies."""
        if not self.proxy.listeners:
            return "no listeners: protocol only"
        ports = ", ".join(f"{name}={port}" for name, port in self.ports().items())
        return f"listeners {ports}, mark {self.proxy.mark}"


def identify_netns(fd: int) -> Hashable:
    """The netns identity of ``fd`` for the state machine (OSError if it has none)."""
    try:
        return netns_identity(fd)
    except NetnsError as exc:
        raise OSError(str(exc)) from exc


class ZtunnelParts:
    """What a ztunnel is made of before its event loop runs."""

    __slots__ = ("http", "metrics", "prepared", "protocol", "proxies", "stop_signals")

    def __init__(
        self,
        metrics: ZtunnelMetrics,
        protocol: ZtunnelProtocol,
        proxies: WorkloadProxies,
        http: HttpEndpoints,
    ) -> None:
        self.metrics = metrics
        self.protocol = protocol
        self.proxies = proxies
        self.http = http
        #: SIGTERM and SIGINT until the event loop's handlers take over (``install``-ed by ``zds ztunnel``).
        self.stop_signals = StopSignals()
        #: ``prepare`` was done.
        self.prepared = False

    @classmethod
    def build(cls, config: ZtunnelConfig) -> ZtunnelParts:
        metrics = ZtunnelMetrics()
        return cls(
            metrics=metrics,
            protocol=ZtunnelProtocol(identify=identify_netns),
            proxies=WorkloadProxies(config.proxy, metrics),
            http=HttpEndpoints(),
        )

    def prepare(self, config: ZtunnelConfig) -> None:
        """Bind the admin, readiness and metrics sockets (a taken port fails here, at start-up:
        ListenAddressError), and say where this ztunnel connects. Once."""
        if self.prepared:
            return
        self.http.bind(
            {
                "admin": config.admin_listen,
                "readiness": config.readiness_listen,
                "metrics": config.metrics_listen,
            }
        )
        self.prepared = True
        log.info("zds ztunnel connecting to the node agent at %s (%s)", config.zds_socket, config.describe())

    def take_first_snapshot(
        self, config: ZtunnelConfig, within: float = defaults.HTTP_START_DELAY
    ) -> Handover | None:
        """``zds.client.session.take_first_snapshot`` with these parts (None: no connection)."""
        return take_first_snapshot(
            config.zds_socket,
            self.protocol,
            self.proxies,
            self.metrics,
            within=within,
            stop=self.stop_signals,
            busy_poll=config.busy_poll,
        )
