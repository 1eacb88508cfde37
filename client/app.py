"""``zds ztunnel`` put together: the ZDS client, the proxies, the HTTP endpoints,
and a graceful stop on SIGTERM/SIGINT/SIGHUP.

Shutdown, as ztunnel drains: stop reading from the node agent, close every
listener at once, give established connections ``drain_timeout`` to finish,
then close what is left and every netns fd. A fatal protocol error also closes
everything, and the process exits 1 with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from zds import defaults, logs, runtime
from zds.client.admin import Views, admin_routes, metrics_routes, parse_listen, readiness_routes
from zds.client.config import ZtunnelConfig, ZtunnelParts
from zds.client.connection import FatalProtocolError, ZdsClient
from zds.client.datapath import WorkloadTraffic, connection_dump, flush_drops, proxy_connection
from zds.client.faults import ZtunnelFaultKind, ZtunnelFaults, load_faults
from zds.client.listeners import AcceptedConnection, ConnectionHandler, flush_refusals
from zds.client.session import Handover, count_answer
from zds.client.workloads import WorkloadProxy
from zds.netns import NetnsIdentity
from zds.protocol.workloads import WorkloadState

log = logging.getLogger("zds.ztunnel")

#: Traffic counters of workloads that are gone kept before a new connection prunes them (a
#: /metrics scrape prunes them too).
TRAFFIC_SLACK = 64


async def serve_dns_tcp(conn: AcceptedConnection) -> None:
    """TCP DNS on 15053: forwarded by the workload's DNS proxy."""
    proxy = conn.owner
    assert isinstance(proxy, WorkloadProxy)
    if proxy.dns is None:
        conn.sock.close()
        return
    await proxy.dns.handle_tcp(conn)


def _drained(gathered: asyncio.Future[Any]) -> None:
    """The end of the drain's gather of waits, taken: cancelled (the drain cut short), it ends
    with a CancelledError that, left alone, asyncio logged at exit as "_GatheringFuture
    exception was never retrieved" with a traceback; a wait that failed is said."""
    if gathered.cancelled():
        return
    error = gathered.exception()
    if error is not None and not isinstance(error, asyncio.CancelledError):
        log.error("waiting for the proxies' connections failed: %r", error)


class Ztunnel:
    """One ``zds ztunnel`` process's worth of state and tasks."""

    def __init__(
        self,
        config: ZtunnelConfig,
        handlers: Mapping[str, ConnectionHandler] | None = None,
        *,
        parts: ZtunnelParts | None = None,
        handover: Handover | None = None,
    ) -> None:
        """``parts`` and ``handover``: what ``zds ztunnel`` made and did before its event loop
        (``zds.client.session.take_first_snapshot``); by default everything starts here."""
        self.config = config
        self.parts = parts or ZtunnelParts.build(config)
        self.metrics = self.parts.metrics
        self.protocol = self.parts.protocol
        #: Per-workload traffic through the data path (config_dump, /metrics).
        self.traffic: dict[str, WorkloadTraffic] = {}
        if handlers is None:
            handlers = {"outbound": self.relay, "inbound": self.relay, "dns": serve_dns_tcp}
        self._own_ports = frozenset(config.ports().values())
        self.proxies = self.parts.proxies
        self.proxies.handlers.update(handlers)
        self.client = ZdsClient(
            config.zds_socket,
            self.protocol,
            self.proxies,
            self.metrics,
            retry_interval=config.retry_interval,
            busy_poll=config.busy_poll,
            handover=handover,
        )
        self.http = self.parts.http
        #: Set by a stop signal that comes while draining: the drain is cut short (ztunnel's
        #: "Double Ctrl+C, exit immediately").
        self.again = asyncio.Event()
        #: Faults on demand; the client only consults them once one was armed.
        self.faults = ZtunnelFaults(
            on_count=lambda kind, outcome: self.metrics.inc(
                "zds_ztunnel_faults_total", kind=kind, outcome=outcome
            ),
            on_nack=lambda text: count_answer(self.metrics, "add", text),
        )
        if config.faults_file:
            load_faults(config.faults_file, self.faults)
            self.client.faults = self.faults
        self.metrics.observe(
            "workload_manager_active_proxy_count",
            lambda: sum(1 for w in self.protocol.workloads.values() if w.state is WorkloadState.UP),
        )
        self.metrics.observe(
            "workload_manager_pending_proxy_count",
            # (ztunnel's: those waiting for a retry; one whose proxy is starting is in neither)
            lambda: sum(1 for w in self.protocol.workloads.values() if w.state is WorkloadState.PENDING),
        )
        self.metrics.observe("zds_ztunnel_connected", lambda: float(self.client.connected))
        self.metrics.observe("zds_ztunnel_ready", lambda: float(self.ready))

    async def arm_fault(self, entry: dict[str, Any]) -> dict[str, Any]:
        """POST /faults: arm one fault now (ZtunnelFaultError when it is wrong)."""
        fault = self.faults.arm(entry)
        self.client.faults = self.faults
        if fault.kind is ZtunnelFaultKind.STOP_READING and fault.count == 0:
            self.client.interrupt_read()
        elif fault.kind in (ZtunnelFaultKind.SECOND_HELLO, ZtunnelFaultKind.UNSOLICITED_ACK):
            await self.client.write_extras()
        return fault.as_dict()

    def traffic_of(self, uid: str) -> WorkloadTraffic:
        traffic = self.traffic.get(uid)
        if traffic is None:
            if len(self.traffic) > len(self.protocol.workloads) + TRAFFIC_SLACK:
                self._prune_traffic()  # (as each scrape does: with no scrape, gone pods' stayed)
            traffic = self.traffic[uid] = WorkloadTraffic()
        return traffic

    async def relay(self, conn: AcceptedConnection) -> None:
        """The data path of 15001 and 15006: relay to the original destination from inside the pod."""
        proxy = conn.owner
        assert isinstance(proxy, WorkloadProxy)
        role = conn.listener.spec.name
        await proxy_connection(
            conn.sock,
            self.traffic_of(proxy.uid).role(role),
            mark=self.config.proxy.mark,
            log_extra=proxy.log_extra,
            preserve_source=role == "inbound" and self.config.proxy.preserve_source,
            own_ports=self._own_ports,
            inbound=role == "inbound",
        )

    def _prune_traffic(self) -> None:
        """Forget the counters of workloads that are gone and have no connection left."""
        for uid in [u for u in self.traffic if u not in self.protocol.workloads]:
            traffic = self.traffic[uid]
            if traffic.outbound.active or traffic.inbound.active:
                continue
            del self.traffic[uid]
            for name in ("zds_ztunnel_proxied_connections_total", "zds_ztunnel_proxied_bytes_total"):
                self.metrics.forget(name, uid=uid)

    def render_metrics(self) -> str:
        """/metrics: the data path's running totals copied in, then the text format."""
        self._prune_traffic()
        for uid, traffic in self.traffic.items():
            for direction in ("outbound", "inbound"):
                stats = traffic.role(direction)
                self.metrics.set_total(
                    "zds_ztunnel_proxied_connections_total", stats.connections, uid=uid, direction=direction
                )
                for flow, value in (("sent", stats.bytes_sent), ("received", stats.bytes_received)):
                    self.metrics.set_total(
                        "zds_ztunnel_proxied_bytes_total", value, uid=uid, direction=direction, flow=flow
                    )
        return self.metrics.render()

    @property
    def ready(self) -> bool:
        """ztunnel's readiness: connected, the snapshot reconciled, nothing pending."""
        return self.protocol.ready

    # -- views -----------------------------------------------------------------------
    def config_dump(self) -> dict[str, Any]:
        """ztunnel's ``workloadState`` shape, with zds's extras beside ztunnel's fields."""
        states: dict[str, Any] = {}
        for uid, w in sorted(self.protocol.workloads.items()):
            proxy = self.proxies.get(uid)
            netns: dict[str, int] | None = None
            if isinstance(w.netns_id, NetnsIdentity):
                netns = {"dev": w.netns_id.dev, "ino": w.netns_id.ino}
            # (a look, not traffic_of: reading config_dump made its zero series in /metrics)
            traffic = self.traffic.get(uid)
            states[uid] = {"state": w.state.admin_name}
            if w.state.admin_name == "Up":  # (as ztunnel: a connection manager once the proxy is up)
                states[uid]["connections"] = {
                    direction: [
                        connection_dump(*entry, inbound=direction == "inbound")
                        for entry in (traffic.role(direction).open.values() if traffic else ())
                    ]
                    for direction in ("inbound", "outbound")
                }
            states[uid] |= {
                "info": {
                    "name": w.info.name,
                    "namespace": w.info.namespace,
                    "serviceAccount": w.info.service_account,
                },
                # zds extras:
                "netns": netns,
                "listeners": [
                    {"name": listener.spec.name, "address": listener.address}
                    for listener in (proxy.listeners if proxy else [])
                ],
                "activeConnections": proxy.connection_count if proxy else 0,
                "traffic": (traffic or WorkloadTraffic()).as_dict(),
                "dns": proxy.dns.stats.as_dict() if proxy and proxy.dns else None,
                "lastError": w.last_error or None,
                "startFailures": w.failures,
            }
        settings = self.config.proxy
        return {
            "workloadState": states,
            "zds": {
                "zdsSocket": self.config.zds_socket,
                "connectionState": self.protocol.state.value,
                "connected": self.client.connected,
                "ready": self.ready,
                "connections": self.client.connections,
                "lastError": self.client.last_error,
                "fatalError": self.protocol.fatal_error,
                "listeners": settings.listeners,
                "ports": self.config.ports(),
                "mark": settings.mark,
                "reusePort": settings.reuse_port,
                "pendingRetryInterval": self.config.retry_interval,
            },
        }

    # -- running -------------------------------------------------------------------
    def bind_http(self) -> None:
        """Bind the admin, readiness and metrics sockets (a taken port fails here, at start-up)."""
        self.parts.prepare(self.config)

    async def serve_http(self) -> None:
        """Serve the bound endpoints (this loads the HTTP stack)."""
        armable = self.config.faults_api or bool(self.config.faults_file)
        admin = self.http.bound.get("admin")
        if armable and admin is not None and not _loopback(admin):
            log.warning(  # (as zds server's --grpc-insecure: said once, at start)
                "faults can be armed and cleared on %s/faults by anyone who reaches that address "
                "(--faults-api or --faults with a non-loopback --admin-listen)",
                admin,
            )
        views = Views(
            config_dump=self.config_dump,
            ready=lambda: self.ready,
            metrics=self.render_metrics,
            faults=lambda: [f.as_dict() for f in self.faults.faults],
            arm_fault=self.arm_fault if armable else None,
            clear_faults=(lambda fault_id: [f.as_dict() for f in self.faults.clear(fault_id)])
            if armable
            else None,
        )
        await self.http.serve(
            {
                "admin": admin_routes(views),
                "readiness": readiness_routes(views),
                "metrics": metrics_routes(views),
            }
        )

    async def _serve_http_once_settled(self) -> None:
        """Serve HTTP once the first snapshot is in (or no node agent answered, or after
        ``HTTP_START_DELAY``): loading the HTTP stack then never delays a pod."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(defaults.HTTP_START_DELAY):
                await self.client.settled.wait()
        runtime.started()  # start-up is over: collection resumes (zds.cli held it)
        logs.flush()  # what was said so far goes out before the imports hold the loop up
        try:
            await self.serve_http()
        except Exception:
            log.exception("cannot serve the HTTP endpoints")
        if self.config.proxy.dns_port and self.config.proxy.listeners:
            # What serving a pod loads, now: the first pod after an empty snapshot would (~1 ms).
            import zds.client.dns  # noqa: F401

    async def shutdown(self, *, drain: bool = True) -> None:
        """Close every listener now, let connections finish (bounded; not at all without
        ``drain``: a fatal protocol error, on which ztunnel exits at once), release every
        netns fd."""
        stopped = self.proxies.stop_all("ztunnel is shutting down", abort=not drain)
        busy = [proxy for proxy in stopped if proxy.connection_count]
        if busy:
            if drain:
                log.info(
                    "waiting up to %gs for %d proxies' connections", self.config.drain_timeout, len(busy)
                )
                finished: asyncio.Future[Any] = asyncio.gather(*(p.wait_connections() for p in busy))
                again: asyncio.Future[Any] = asyncio.ensure_future(self.again.wait())
                done, _ = await asyncio.wait(
                    {finished, again}, timeout=self.config.drain_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in (finished, again):
                    waiter.cancel()
                finished.add_done_callback(_drained)
                if finished not in done:
                    said = "stop signal again" if again in done else "drain timeout"
                    log.warning("%s: closing the connections still open", said)
            for proxy in stopped:
                for server in proxy.servers:
                    server.abort_connections()
                await proxy.wait_connections()
        self.protocol.drain()
        await self.http.close()
        flush_refusals()
        flush_drops()

    def stop_signal(self, stop: asyncio.Event) -> None:
        """A stop signal: the first stops (``stop``), one more cuts the drain short."""
        (self.again if stop.is_set() else stop).set()

    async def run(self) -> NoReturn:
        """Serve until SIGTERM/SIGINT/SIGHUP (exit 0) or a fatal protocol error (exit 1), and end
        the process there (a start that fails raises, as ``serve``)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in runtime.stop_signals():
            loop.add_signal_handler(sig, self.stop_signal, stop)
        try:
            code = await self.serve(stop)
        except BaseException:
            for sig in runtime.stop_signals():
                loop.remove_signal_handler(sig)
            raise
        if code != 0 and self.protocol.fatal_error:
            print(f"zds ztunnel: stopped for good: {self.protocol.fatal_error}", file=sys.stderr)
        runtime.end_process(code)  # (the signals ignored to the end, as zds server's)

    async def serve(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (0) or a fatal protocol error (1); then drain."""
        loop = asyncio.get_running_loop()
        http: asyncio.Task[None] | None = None
        try:
            self.bind_http()
            if self.parts.stop_signals.requested:
                stop.set()  # asked for before the loop's own handlers were there
            client = loop.create_task(self.client.run(), name="zds client")
            http = loop.create_task(self._serve_http_once_settled(), name="http endpoints")
            stopping = loop.create_task(stop.wait(), name="wait for stop")
            try:
                await asyncio.wait({client, stopping}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                client.cancel()
                stopping.cancel()
                raise
            code = 0
            if client.done():
                stopping.cancel()
                exc = client.exception()
                if isinstance(exc, FatalProtocolError):
                    # ztunnel exits at once (process::exit): its connections end with it.
                    log.error("in-pod workload manager stopped for good: %s", exc)
                    code = 1
                elif exc is not None:
                    raise exc
            else:
                log.info("stop requested: draining")
                # Stop reading first: nothing new is taken on while the listeners close.
                client.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client
            await self.shutdown(drain=code == 0)
            log.info("zds ztunnel stopped")
            return code
        finally:
            if http is not None:
                http.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await http
            # On any error path: release sockets and fds too (idempotent).
            self.proxies.stop_all("ztunnel is exiting")
            self.protocol.drain()
            self.proxies.close()
            await self.http.close()


def _loopback(address: str) -> bool:
    """Whether a bound ``host:port`` (``[v6]:port``) is on a loopback address."""
    host, _ = parse_listen(address)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
