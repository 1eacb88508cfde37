"""The node agent, put together from its parts (as Istio's ``cni/pkg/nodeagent`` is):

- ``PodCache`` (``podcache``): every known pod and its open netns;
- ``ConnectionRegistry`` (``registry``): who is connected, who is newest, the limit;
- ``Enrollment`` (``enrollment``): rules, then the cache, then ztunnel; removal;
- ``ZtunnelConnection`` (``connection``): one connection's hello, snapshot and updates;
- ``AgentObserver`` (``observer``): logs, Watch events and metrics of every connection.

This module accepts ztunnel connections, serves each one's snapshot from the
cache, and answers what the control API asks. Unlike Istio, a pod's netns fd is
closed the moment the pod is removed or replaced, not whenever a garbage
collector gets to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

from zds import defaults
from zds.logs import Tally
from zds.protocol.messages import KeepWorkload
from zds.protocol.nodeagent import AcceptLimiter
from zds.server.admission import Admission, peer_gone
from zds.server.connection import ZtunnelConnection
from zds.server.connrecords import ConnectionInfo, SnapshotItem
from zds.server.enrollment import Enrollment
from zds.server.eventkinds import EventKind
from zds.server.events import DEFAULT_WATCH_QUEUE, AgentEvent, EventBus, Watcher
from zds.server.faults import Fault, FaultBook, FaultSpec
from zds.server.inpodrules import RedirectConfig
from zds.server.netnspolicy import NetnsPolicy
from zds.server.observer import AgentObserver
from zds.server.outcomes import ANY_POD, DeleteResult, Enrolled, Expect
from zds.server.peers import AllowList, PeerGuard
from zds.server.podcache import Pod, PodCache
from zds.server.podrules import PodRules
from zds.server.pods import PodSpec
from zds.server.redirect import Redirector
from zds.server.registry import ConnectionRegistry
from zds.server.store import PodStore
from zds.server.tasks import TaskOwner
from zds.server.telemetry import Telemetry
from zds.transport import accept

#: Why a connection whose peer closed right after its hello is not served.
GONE_AFTER_HELLO = "the peer closed it after its hello"

log = logging.getLogger("zds.server")


@dataclass
class AgentConfig:
    max_connections: int = defaults.MAX_CONNECTIONS
    hello_timeout: float = defaults.HELLO_TIMEOUT
    ack_timeout: float = defaults.ACK_TIMEOUT
    keepalive_interval: float = defaults.KEEPALIVE_INTERVAL
    #: Seconds to poll for each ack before sleeping (0: never; ``zds.transport.BusyPoll``).
    busy_poll: float = defaults.BUSY_POLL
    accepts_per_second: float = defaults.ACCEPTS_PER_SECOND
    #: Events a Watch stream may have queued before it is ended (RESOURCE_EXHAUSTED).
    watch_queue: int = DEFAULT_WATCH_QUEUE
    #: Who may connect to the node agent's unix sockets (SO_PEERCRED).
    allow: AllowList = field(default_factory=AllowList.default)


class NodeAgent:
    """Owns the pod cache (and every netns fd in it) and the ztunnel connections.

    Everything it does is published on ``events`` (Watch), counted in
    ``telemetry`` (metrics) and, when tracing is on, traced: one trace per
    enrollment, removal and snapshot.
    """

    def __init__(
        self,
        config: AgentConfig | None = None,
        redirector: Redirector | None = None,
        telemetry: Telemetry | None = None,
        netns_policy: NetnsPolicy | None = None,
        redirect_config: RedirectConfig | None = None,
    ) -> None:
        self.config = config or AgentConfig()
        self.pods = PodCache()
        self.registry: ConnectionRegistry[ZtunnelConnection] = ConnectionRegistry(self.config.max_connections)
        self.events = EventBus(self.config.watch_queue)
        #: The last current state a watcher got, and the event sequence number it was made at.
        self._current: tuple[int, list[AgentEvent]] | None = None
        self.telemetry = telemetry or Telemetry()
        self.tracer = self.telemetry.tracer
        self.tasks = TaskOwner()
        self.observer = AgentObserver(self.pods, self.events, self.telemetry)
        self.enrollment = Enrollment(
            self.pods,
            self.registry,
            PodRules(redirector, self.tracer) if redirector is not None else None,
            self.events,
            self.telemetry,
            self.tasks,
            policy=netns_policy or NetnsPolicy.for_this_node(),
            earlier=redirect_config,
        )
        #: Who may connect to the ZDS socket (SO_PEERCRED).
        self.zds_peers = PeerGuard(self.config.allow, "ZDS")
        #: Who of the connections that said hello is served next, at the accept rate.
        self.admission = Admission(AcceptLimiter(self.config.accepts_per_second), self.tasks)
        #: Silent connections dropped for newer ones: a flood is a line every 10 s, not one each.
        self._crowded = Tally(10.0, log)
        self._over_limit = Tally(10.0, log)
        self._connection_tasks: dict[ZtunnelConnection, asyncio.Task[None]] = {}
        #: Pod sources that can be up or down (the container engine): name -> (up, detail).
        self.sources: dict[str, tuple[bool, str]] = {}
        #: Faults on demand (zds fault, --faults).
        self.fault_book = FaultBook(self.registry, self.pods, self.events, self.telemetry)
        self.fault_book.on_delivery = self.enrollment.bend_delivery
        self.telemetry.observe(
            connected=lambda: len(self.registry),
            pods_by_state=self.pods.by_state,
            watchers=lambda: self.events.watchers,
        )

    def use_store(self, store: PodStore) -> None:
        """Keep pods in ``store`` from now on (set once at start-up, before recovery)."""
        self.enrollment.use_store(store)

    @property
    def connections(self) -> list[ZtunnelConnection]:
        """Connections that said hello, oldest first; the last is the newest."""
        return self.registry.ready()

    # -- pods --------------------------------------------------------------------
    async def load(self, spec: PodSpec) -> Pod:
        """Cache a pod without delivering it (start-up ``--pods``)."""
        return await self.enrollment.load(spec)

    async def add_pod(self, spec: PodSpec, *, expect: Pod | Expect | None = ANY_POD) -> Enrolled:
        """Enroll a pod and wait for ztunnel's ack (see ``Enrollment.add``)."""
        return await self.enrollment.add(spec, expect=expect)

    def start_add(self, spec: PodSpec) -> asyncio.Task[Enrolled]:
        """Begin enrolling a pod; the enrollment's own task (``add_pod`` without the wait)."""
        return self.enrollment.start(spec)

    async def remove_pod(self, uid: str, *, expect: Pod | Expect = ANY_POD) -> tuple[Pod, list[DeleteResult]]:
        """Remove a pod: rules out, DelWorkload to every connection (see ``Enrollment.remove``)."""
        return await self.enrollment.remove(uid, expect=expect)

    async def release_unknown(self, uid: str) -> list[DeleteResult]:
        """DelWorkload to every connection for a uid no pod has (``Enrollment.release_unknown``)."""
        return await self.enrollment.release_unknown(uid)

    def inject_fault(self, spec: FaultSpec) -> Fault:
        """Arm a fault (``FaultError`` when it makes no sense); see ``zds.server.faults``."""
        return self.fault_book.inject(spec)

    # -- snapshot source ---------------------------------------------------------
    def snapshot_uids(self) -> list[str]:
        return self.pods.uids()

    def snapshot_item(self, uid: str) -> SnapshotItem | None:
        """Add + a dup of the netns fd, or Keep for a pod known without a usable netns
        (Istio's rule); None for a pod removed while the snapshot was under way."""
        pod = self.pods.get(uid)
        if pod is None:
            return None
        if pod.netns is None or pod.netns.closed:
            return SnapshotItem(request=KeepWorkload(uid=uid), fd=None)
        spec = pod.spec
        return SnapshotItem(request=spec.add_workload, fd=pod.netns.dup(), payload=spec.add_workload_bytes)

    # -- watching ------------------------------------------------------------------
    def connection_infos(self) -> list[ConnectionInfo]:
        """Every live connection as it is now, in accept order."""
        newest = self.registry.newest()
        return [conn.info(newest=conn is newest) for conn in self.registry.live()]

    def current_state(self) -> list[AgentEvent]:
        """What a new watcher sees first: every pod, every connection that said hello."""
        newest = self.registry.newest()
        events = [
            AgentEvent(
                kind=EventKind.POD_ENROLLED,
                time=pod.enrolled_at,
                current_state=True,
                uid=pod.uid,
                pod_name=pod.spec.name,
                pod_namespace=pod.spec.namespace,
                pod=_copy_pod(pod),
            )
            for pod in sorted(self.pods, key=lambda p: p.enrolled_at)
        ]
        events += [
            AgentEvent(
                kind=EventKind.ZTUNNEL_CONNECTED,
                time=conn.connected_at,
                current_state=True,
                connection_id=conn.id,
                connection=conn.info(newest=conn is newest),
            )
            for conn in self.registry.ready()
        ]
        events += [
            AgentEvent(
                kind=EventKind.POD_SOURCE_UP if up else EventKind.POD_SOURCE_DOWN,
                time=time.time(),
                current_state=True,
                pod_source=name,
                error=detail,
            )
            for name, (up, detail) in self.sources.items()
        ]
        return events

    def watch(self, kinds: frozenset[EventKind] | None = None, uid: str = "") -> Watcher:
        """A watcher that gets the current state, a marker, then every live event."""
        # One synchronous step: no event can fall between the state and the subscription.
        # Watchers that come while nothing happened share one current state (its events are
        # never changed): a watcher then holds references, not a copy of every pod.
        sequence = self.events.sequence
        if self._current is None or self._current[0] != sequence:
            self._current = (sequence, self.current_state())
        return self.events.subscribe(self._current[1], kinds=kinds, uid=uid)

    # -- connections -------------------------------------------------------------
    async def serve_zds(self, listener: socket.socket) -> None:
        """Accept ztunnel connections until cancelled.

        Accepting is never held back, so a flood of connections that never say hello
        cannot make a real ztunnel wait (they are bounded, the oldest dropped, and closed
        at the hello timeout); the accept rate limit (Istio's 5 a second) and
        ``--max-connections`` apply once a connection says hello.
        """
        try:
            while True:
                try:
                    sock = await accept(listener)
                except OSError as exc:
                    # e.g. EMFILE: keep serving the connections we have, retry shortly.
                    log.error("failed to accept a ztunnel connection: %s", exc)
                    await asyncio.sleep(0.2)
                    continue
                self._admit(
                    ZtunnelConnection(
                        sock,
                        observer=self.observer,
                        hello_timeout=self.config.hello_timeout,
                        ack_timeout=self.config.ack_timeout,
                        keepalive_interval=self.config.keepalive_interval,
                        busy_poll=self.config.busy_poll,
                        tracer=self.tracer,
                    )
                )
        finally:
            await self.close_connections("node agent shutting down")

    def _admit(self, conn: ZtunnelConnection) -> None:
        if not self.zds_peers.check(conn.peer):
            self.telemetry.connection_refused("not_allowed")
            conn.close("permission denied")
            return
        log.debug("ztunnel connection accepted from %s", _peer(conn), extra=conn.log_extra)
        evicted = self.registry.admit(conn)
        self.fault_book.admitted(conn, hello=False)
        self._connection_tasks[conn] = self.tasks.spawn(self._run_connection(conn), name=f"ztunnel-{conn.id}")
        if evicted is not None:
            self._crowded.add(
                "dropped %d connection(s) waiting for their hello or their turn: more than %d were waiting"
                " (the latest from %s)",
                self.registry.max_waiting,
                _peer(evicted),
            )
            self.telemetry.connection_refused("crowded")
            reason = "dropped: too many connections waiting for their hello"
            evicted.protocol.close(reason)
            task = self._connection_tasks.pop(evicted, None)
            if task is not None:
                # Closed once its task has let go of the socket (or at once, if it never ran).
                task.add_done_callback(lambda _: evicted.close(reason))
                task.cancel()

    async def _on_hello(self, conn: ZtunnelConnection) -> str:
        """A connection said hello: '' if it is served now, else why it is refused. One whose
        peer is gone takes no slot of the rate limit and is not announced (a flood of hellos
        that closed at once held a real ztunnel back a fifth of a second each, and each was
        "connected", then a broken pipe). One over ``--max-connections`` is refused at once,
        without a slot (each had waited for one, and a real ztunnel behind them as long)."""
        if self.registry.full():
            return GONE_AFTER_HELLO if peer_gone(conn.sock.socket) else self._over_the_limit(conn)
        if not await self.admission.turn(conn.sock.socket):
            return GONE_AFTER_HELLO
        if self.registry.full():  # (filled while it waited for its turn)
            return self._over_the_limit(conn)
        self.registry.hello(conn)
        self.fault_book.admitted(conn, hello=True)
        log.info(
            "ztunnel connected from %s, total connected: %d",
            _peer(conn),
            len(self.registry),
            extra=conn.log_extra,
        )
        self.events.publish(EventKind.ZTUNNEL_CONNECTED, connection=conn.info(newest=True))
        return ""

    def _over_the_limit(self, conn: ZtunnelConnection) -> str:
        # (in a line every 10 s: refused at once, a flood of them had been a line each)
        self._over_limit.add(
            "refused %d ztunnel connection(s): already %d connected (--max-connections; the latest from %s)",
            len(self.registry),
            _peer(conn),
        )
        self.telemetry.connection_refused("limit")
        return "connection limit reached"

    async def _run_connection(self, conn: ZtunnelConnection) -> None:
        reason = "closed"
        try:
            reason = await conn.serve(self, lambda: self._on_hello(conn))
        finally:
            self._connection_tasks.pop(conn, None)
            self.fault_book.connection_closed(conn.id, conn.protocol.close_reason or reason)
            if served := self.registry.remove(conn):
                self.events.publish(
                    EventKind.ZTUNNEL_DISCONNECTED,
                    connection=conn.info(),
                    error=conn.protocol.close_reason or reason,
                )
        if conn.protocol.peer_error:
            log.warning(
                "closed the connection from %s: %s",
                _peer(conn),
                conn.protocol.close_reason,
                extra=conn.log_extra,
            )
        if served:
            log.info(
                "ztunnel disconnected: %s; total connected: %d",
                reason,
                len(self.registry),
                extra=conn.log_extra,
            )
        elif not conn.protocol.peer_error:  # (never a ztunnel; a peer's error said above, once)
            log.info(
                "connection from %s closed before it was served: %s",
                _peer(conn),
                reason,
                extra=conn.log_extra,
            )

    async def close_connections(self, reason: str) -> None:
        for conn in self.registry.live():
            conn.protocol.close(reason)  # the reason logs and watchers get
        # Cancel first: each connection task unregisters its socket from the loop, then closes it.
        await self.tasks.cancel_all()
        for conn in self.registry.live():
            conn.close(reason)

    def close(self) -> None:
        """Close every netns fd in the cache (shutdown); say what the tally of dropped
        connections holds."""
        self.pods.close()
        self._crowded.flush()
        self._over_limit.flush()


def _copy_pod(pod: Pod) -> Pod:
    return Pod(
        spec=pod.spec,
        netns=pod.netns,
        state=pod.state,
        last_error=pod.last_error,
        enrolled_at=pod.enrolled_at,
        rules_installed=pod.rules_installed,
    )


def _peer(conn: ZtunnelConnection) -> str:
    peer = conn.peer
    return f"pid {peer.pid} uid {peer.uid}" if peer is not None else "an unknown peer"
