"""The node agent: pod cache, ztunnel connections, enrollment and removal.

Mirrors Istio's ztunnelserver.go: adds go to the newest connection, deletes to
every connection (so an old ztunnel that is draining releases the pod too), a
pod that could not be delivered stays cached and goes out in the next snapshot.
Unlike Istio, the netns fd of a pod is closed the moment the pod is removed or
replaced, not whenever a garbage collector gets to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from zds import defaults
from zds.netns import NetnsError, NetnsHandle, NetnsIdentity, open_netns_ref
from zds.protocol.messages import Ack, AddWorkload, DelWorkload, KeepWorkload, Request, request_kind
from zds.protocol.nodeagent import AcceptLimiter
from zds.server import spans
from zds.server.connection import (
    ConnectionInfo,
    ConnectionLost,
    ConnectionObserver,
    SnapshotItem,
    ZtunnelConnection,
    cancel_and_wait,
)
from zds.server.events import DEFAULT_WATCH_QUEUE, AgentEvent, EventBus, EventKind, Watcher
from zds.server.pods import Pod, PodSpec, PodSpecError, PodState
from zds.server.redirect import RedirectError, Redirector
from zds.server.telemetry import Telemetry
from zds.transport import accept

log = logging.getLogger("zds.server")

T = TypeVar("T")


def _retrieve_exception(task: asyncio.Future[Any]) -> None:
    """An owned task whose caller gave up still has its outcome read (no 'never retrieved')."""
    if not task.cancelled():
        task.exception()


class EnrollmentError(Exception):
    """Enrollment failed; ``kind`` says how (the control API maps it to a gRPC status)."""

    INVALID = "invalid"  # bad uid, bad netns, too large: nothing was cached
    NO_CONNECTION = "no-connection"  # cached, delivered in the next snapshot
    NACKED = "nacked"  # ztunnel answered with an error; cached
    LOST = "lost"  # the connection closed before the ack; cached
    TIMEOUT = "timeout"  # no ack within the ack timeout: the connection was closed; cached
    RULES = "rules"  # the redirection rules could not be installed: nothing cached, nothing sent

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Enrolled:
    pod: Pod
    conn_id: str


@dataclass
class DeleteResult:
    conn_id: str
    error: str


@dataclass
class AgentConfig:
    max_connections: int = defaults.MAX_CONNECTIONS
    hello_timeout: float = defaults.HELLO_TIMEOUT
    ack_timeout: float = defaults.ACK_TIMEOUT
    keepalive_interval: float = defaults.KEEPALIVE_INTERVAL
    accepts_per_second: float = defaults.ACCEPTS_PER_SECOND
    #: Events a Watch stream may have queued before it is ended (RESOURCE_EXHAUSTED).
    watch_queue: int = DEFAULT_WATCH_QUEUE


class NodeAgent(ConnectionObserver):
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
    ) -> None:
        self.config = config or AgentConfig()
        #: Installs the in-pod rules; None with --no-redirect.
        self.redirector = redirector
        self.pods: dict[str, Pod] = {}
        #: Connections that said hello, oldest first; the last is the newest.
        self.connections: list[ZtunnelConnection] = []
        #: Every live connection, with or without a hello yet (for the limit), in accept order.
        self._live: dict[ZtunnelConnection, None] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._netns_locks: dict[NetnsIdentity, asyncio.Lock] = {}
        #: Pods being removed: their DelWorkload acks still get logged with the pod's name.
        self._removing: dict[str, PodSpec] = {}
        self.events = EventBus(self.config.watch_queue)
        self.telemetry = telemetry or Telemetry()
        self.tracer = self.telemetry.tracer
        self.telemetry.observe(
            connected=lambda: len(self.connections),
            pods_by_state=self._pods_by_state,
            watchers=lambda: self.events.watchers,
        )

    def _pods_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for pod in list(self.pods.values()):  # list(): a metrics thread may read this
            counts[pod.state.value] = counts.get(pod.state.value, 0) + 1
        return counts

    # -- pods --------------------------------------------------------------------
    async def load(self, spec: PodSpec) -> Pod:
        """Cache a pod without delivering it (start-up ``--pods``).

        A pod whose netns cannot be opened stays known without one and goes out
        as KeepWorkload, as after a node-agent restart in Istio.
        """
        spec.validate()
        with self._span(spans.ENROLL_POD, _pod_attributes(spec)) as span:
            try:
                netns = self._open_netns(spec)
            except NetnsError as exc:
                log.warning(
                    "netns unavailable; the pod stays known and is sent as KeepWorkload: %s",
                    exc,
                    extra=_pod_extra(spec),
                )
                span.set_attribute(spans.OUTCOME, "loaded_without_netns")
                return self._enrolled(Pod(spec=spec, netns=None))
            pod = Pod(spec=spec, netns=netns)
            try:
                await self._install_rules(pod)
            except EnrollmentError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            span.set_attribute(spans.OUTCOME, "loaded")
            return self._enrolled(pod)

    async def add_pod(self, spec: PodSpec) -> Enrolled:
        """Enroll a pod: open its netns, install the redirection rules, cache it,
        deliver AddWorkload + fd to the newest ztunnel and wait for the ack.

        One trace (``zds.enroll_pod``) with a span for each step. The enrollment is the
        agent's own task: a caller that gives up (a gRPC deadline, a cancelled client)
        stops waiting, but the enrollment still completes, so the pod's rules and the
        cache never disagree.
        """
        return await self._owned(self._add_pod(spec))

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """A task the agent owns: kept until done, cancelled at shutdown, its outcome always read."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve_exception)
        return task

    async def _owned(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.shield(self._spawn(coro))

    async def _add_pod(self, spec: PodSpec) -> Enrolled:
        with self._span(spans.ENROLL_POD, _pod_attributes(spec)) as span:
            try:
                enrolled = await self._enroll(spec, span)
            except EnrollmentError as exc:
                outcome = exc.kind.replace("-", "_")
                span.set_attribute(spans.OUTCOME, outcome)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.telemetry.enrollment(outcome)
                raise
            span.set_attribute(spans.OUTCOME, "acked")
            self.telemetry.enrollment("acked")
            return enrolled

    async def _enroll(self, spec: PodSpec, span: trace.Span) -> Enrolled:
        try:
            spec.validate()
            netns = self._open_netns(spec)
        except (PodSpecError, NetnsError) as exc:
            raise EnrollmentError(EnrollmentError.INVALID, str(exc)) from exc
        pod = Pod(spec=spec, netns=netns)
        await self._install_rules(pod)
        self._enrolled(pod)
        log.info("pod enrolled (netns %s)", netns.identity, extra=_pod_extra(spec))
        conn = self.newest_connection()
        if conn is None:
            pod.last_error = "no ztunnel connection"
            raise EnrollmentError(
                EnrollmentError.NO_CONNECTION,
                "no ztunnel connection (the pod stays cached and goes out in the next snapshot)",
            )
        span.set_attribute(spans.CONNECTION_ID, conn.id)
        try:
            ack = await conn.deliver(
                AddWorkload(uid=spec.uid, info=spec.info),
                netns.dup(),
                trace_context=self._trace_context(span),
            )
        except ConnectionLost as lost:
            if self.pods.get(spec.uid) is pod:
                pod.last_error = str(lost)
            kind = EnrollmentError.TIMEOUT if lost.ack_timeout else EnrollmentError.LOST
            raise EnrollmentError(kind, str(lost)) from lost
        span.set_attribute(spans.ACK_ERROR, ack.error)
        if ack.error:
            raise EnrollmentError(EnrollmentError.NACKED, ack.error)
        return Enrolled(pod=pod, conn_id=conn.id)

    def _open_netns(self, spec: PodSpec) -> NetnsHandle:
        with self._span(spans.OPEN_NETNS, {spans.NETNS_PATH: spec.netns}) as span:
            try:
                netns = open_netns_ref(spec.netns)
            except NetnsError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            span.set_attribute(spans.NETNS_INODE, netns.identity.ino)
            return netns

    def _enrolled(self, pod: Pod) -> Pod:
        """Cache the pod and tell the watchers."""
        self._cache(pod)
        self.events.publish(EventKind.POD_ENROLLED, pod=pod)
        return pod

    async def _install_rules(self, pod: Pod) -> None:
        """Install the in-pod rules; on failure close the netns and refuse the enrollment (nothing is sent)."""
        if self.redirector is None or pod.netns is None:
            return
        with self._span(spans.INSTALL_RULES, {spans.POD_UID: pod.uid}) as span:
            try:
                async with self._rules_lock(pod.netns.identity):
                    families = await self.redirector.install(pod.netns)
            except asyncio.CancelledError:
                pod.close()
                raise
            except (RedirectError, NetnsError, OSError) as exc:
                pod.close()
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise EnrollmentError(
                    EnrollmentError.RULES, f"cannot install in-pod redirection rules for pod {pod.uid}: {exc}"
                ) from exc
        pod.rules_installed = True
        log.info(
            "in-pod redirection rules installed (IPv%s)",
            "+IPv".join(map(str, families)),
            extra=_pod_extra(pod.spec),
        )

    def _rules_lock(self, identity: NetnsIdentity) -> asyncio.Lock:
        """One lock per network namespace: installs and removals there never interleave."""
        lock = self._netns_locks.get(identity)
        if lock is None:
            lock = self._netns_locks[identity] = asyncio.Lock()
        return lock

    async def _remove_rules(self, pod: Pod) -> None:
        if self.redirector is None or pod.netns is None or not pod.rules_installed:
            return
        identity = pod.netns.identity
        with self._span(spans.REMOVE_RULES, {spans.POD_UID: pod.uid}) as span:
            try:
                async with self._rules_lock(identity):
                    # A pod enrolled meanwhile in the same netns (re-added, or another uid) keeps them.
                    if any(p.netns is not None and p.netns.identity == identity for p in self.pods.values()):
                        log.info(
                            "rules kept: another enrolled pod uses this netns", extra=_pod_extra(pod.spec)
                        )
                        pod.rules_installed = False
                        return
                    await self.redirector.remove(pod.netns)
                pod.rules_installed = False
            except (RedirectError, NetnsError, OSError) as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log.warning("cannot remove in-pod redirection rules: %s", exc, extra=_pod_extra(pod.spec))

    async def remove_pod(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        """Forget a pod, remove its rules, send DelWorkload to every connection, close its netns fd.

        Rules first, as Istio's RemovePodFromMesh does: new connections of the pod go direct
        before ztunnel lets go of it. Done whatever ztunnel answers, even with no ztunnel
        connected (Istio's rule). Raises KeyError for an unknown uid. Like enrollment, the
        removal is the agent's own task and completes even if the caller gives up.
        """
        if uid not in self.pods:
            raise KeyError(uid)
        return await self._owned(self._remove_pod(uid))

    async def _remove_pod(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        pod = self.pods.pop(uid)
        log.info("pod removed", extra=_pod_extra(pod.spec))
        self.events.publish(EventKind.POD_REMOVED, pod=pod)
        self._removing[uid] = pod.spec
        try:
            with self._span(spans.REMOVE_POD, _pod_attributes(pod.spec)) as span:
                await self._remove_rules(pod)
                conns = list(self.connections)
                ctx = self._trace_context(span)
                answers = await asyncio.gather(
                    *(c.deliver(DelWorkload(uid=uid), trace_context=ctx) for c in conns),
                    return_exceptions=True,
                )
        finally:
            self._removing.pop(uid, None)
            pod.close()
        results = []
        for conn, answer in zip(conns, answers, strict=True):
            if isinstance(answer, Ack):
                results.append(DeleteResult(conn.id, answer.error))
            else:
                results.append(DeleteResult(conn.id, str(answer)))
        return pod, results

    def _cache(self, pod: Pod) -> Pod:
        old = self.pods.get(pod.uid)
        if old is not None:
            if (
                old.rules_installed
                and old.netns is not None
                and pod.netns is not None
                and old.netns.identity != pod.netns.identity
            ):
                # Replaced by a pod in another netns: take our rules out of the old one too.
                self._spawn(self._remove_rules_and_close(old))
            else:
                old.close()  # replaced: its fd goes now (queued sends hold their own dups)
        self.pods[pod.uid] = pod
        return pod

    async def _remove_rules_and_close(self, pod: Pod) -> None:
        try:
            await self._remove_rules(pod)
        finally:
            pod.close()

    # -- tracing -------------------------------------------------------------------
    @contextmanager
    def _span(self, name: str, attributes: dict[str, str]) -> Iterator[trace.Span]:
        """A span named ``name``; the caller sets its status (exceptions are not recorded twice)."""
        with self.tracer.start_as_current_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            yield span

    @staticmethod
    def _trace_context(span: trace.Span) -> otel_context.Context | None:
        """The current trace context, for a connection's task to continue the trace (None: not traced)."""
        return otel_context.get_current() if span.is_recording() else None

    # -- watching ------------------------------------------------------------------
    def connection_infos(self) -> list[ConnectionInfo]:
        """Every live connection as it is now, in accept order."""
        newest = self.newest_connection()
        return [conn.info(newest=conn is newest) for conn in self._live]

    def current_state(self) -> list[AgentEvent]:
        """What a new watcher sees first: every pod, every connection that said hello."""
        newest = self.newest_connection()
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
            for pod in sorted(self.pods.values(), key=lambda p: p.enrolled_at)
        ]
        events += [
            AgentEvent(
                kind=EventKind.ZTUNNEL_CONNECTED,
                time=conn.connected_at,
                current_state=True,
                connection_id=conn.id,
                connection=conn.info(newest=conn is newest),
            )
            for conn in self.connections
        ]
        return events

    def watch(self, kinds: frozenset[EventKind] | None = None, uid: str = "") -> Watcher:
        """A watcher that gets the current state, a marker, then every live event."""
        # One synchronous step: no event can fall between the state and the subscription.
        return self.events.subscribe(self.current_state(), kinds=kinds, uid=uid)

    # -- snapshot source ---------------------------------------------------------
    def snapshot_uids(self) -> list[str]:
        return list(self.pods)

    def snapshot_item(self, uid: str) -> SnapshotItem | None:
        pod = self.pods.get(uid)
        if pod is None:
            return None  # removed while the snapshot was under way
        if pod.netns is None or pod.netns.closed:
            return SnapshotItem(request=KeepWorkload(uid=uid), fd=None)
        return SnapshotItem(request=AddWorkload(uid=uid, info=pod.spec.info), fd=pod.netns.dup())

    # -- connections -------------------------------------------------------------
    def newest_connection(self) -> ZtunnelConnection | None:
        return self.connections[-1] if self.connections else None

    async def serve_zds(self, listener: socket.socket) -> None:
        """Accept ztunnel connections (rate-limited, bounded) until cancelled."""
        loop = asyncio.get_running_loop()
        limiter = AcceptLimiter(self.config.accepts_per_second)
        try:
            while True:
                delay = limiter.delay(loop.time())
                while delay > 0:
                    await asyncio.sleep(delay)
                    delay = limiter.delay(loop.time())
                try:
                    sock = await accept(listener)
                except OSError as exc:
                    # e.g. EMFILE: keep serving the connections we have, retry shortly.
                    log.error("failed to accept a ztunnel connection: %s", exc)
                    await asyncio.sleep(0.2)
                    continue
                conn = ZtunnelConnection(
                    sock,
                    observer=self,
                    hello_timeout=self.config.hello_timeout,
                    ack_timeout=self.config.ack_timeout,
                    keepalive_interval=self.config.keepalive_interval,
                    tracer=self.tracer,
                )
                peer = f"pid {conn.peer.pid} uid {conn.peer.uid}" if conn.peer else "unknown peer"
                if len(self._live) >= self.config.max_connections:
                    log.warning(
                        "refusing ztunnel connection from %s: already %d connected (--max-connections)",
                        peer,
                        len(self._live),
                        extra=conn.log_extra,
                    )
                    conn.close("connection limit reached")
                    continue
                log.info("ztunnel connection accepted from %s", peer, extra=conn.log_extra)
                self._live[conn] = None
                self._spawn(self._run_connection(conn), name=f"ztunnel-{conn.id}")
        finally:
            await self.close_connections("node agent shutting down")

    async def _run_connection(self, conn: ZtunnelConnection) -> None:
        def ready() -> None:
            self.connections.append(conn)
            log.info("ztunnel connected, total connected: %d", len(self.connections), extra=conn.log_extra)
            self.events.publish(EventKind.ZTUNNEL_CONNECTED, connection=conn.info(newest=True))

        reason = "closed"
        try:
            reason = await conn.serve(self, ready)
        finally:
            self._live.pop(conn, None)
            if conn in self.connections:
                self.connections.remove(conn)
                self.events.publish(
                    EventKind.ZTUNNEL_DISCONNECTED,
                    connection=conn.info(),
                    error=conn.protocol.close_reason or reason,
                )
        log.info(
            "ztunnel disconnected: %s; total connected: %d",
            reason,
            len(self.connections),
            extra=conn.log_extra,
        )

    async def close_connections(self, reason: str) -> None:
        for conn in list(self._live):
            conn.protocol.close(reason)  # the reason logs and watchers get
        # Cancel first: each connection task unregisters its socket from the loop, then closes it.
        for task in list(self._tasks):
            await cancel_and_wait(task)
        for conn in list(self._live):
            conn.close(reason)

    def close(self) -> None:
        """Close every netns fd in the cache (shutdown)."""
        for pod in self.pods.values():
            pod.close()
        self.pods.clear()

    # -- ConnectionObserver --------------------------------------------------------
    def _about(self, request: Request) -> tuple[str, PodSpec | None]:
        """The uid a request is about and, if known, the pod's spec (for logs and events)."""
        uid: str = getattr(request, "uid", "")
        if not uid:
            return "", None
        if isinstance(request, DelWorkload):
            return uid, self._removing.get(uid)
        pod = self.pods.get(uid)
        return uid, pod.spec if pod is not None else None

    def _extra(self, conn: ZtunnelConnection, uid: str, spec: PodSpec | None) -> dict[str, str]:
        if spec is not None:
            return {**conn.log_extra, **_pod_extra(spec)}
        return {**conn.log_extra, "uid": uid} if uid else conn.log_extra

    def hello(self, conn: ZtunnelConnection, version: int) -> None:
        log.info("received hello from ztunnel (version %d)", version, extra=conn.log_extra)

    def sent(self, conn: ZtunnelConnection, request: Request) -> None:
        kind = request_kind(request)
        uid, spec = self._about(request)
        log.debug("sent %s", kind, extra=self._extra(conn, uid, spec))
        self.events.publish(
            EventKind.MESSAGE_SENT,
            connection_id=conn.id,
            message_type=kind,
            uid=uid,
            pod_name=spec.name if spec else "",
            pod_namespace=spec.namespace if spec else "",
        )

    def acked(self, conn: ZtunnelConnection, request: Request, ack: Ack, latency: float) -> None:
        kind = request_kind(request)
        uid, spec = self._about(request)
        extra = self._extra(conn, uid, spec)
        if ack.ok:
            log.info("ztunnel acked %s in %.1f ms", kind, latency * 1000, extra=extra)
        else:
            log.error("ztunnel nacked %s: %s", kind, ack.error, extra=extra)
        pod = self.pods.get(uid) if isinstance(request, AddWorkload) else None
        if pod is not None:
            pod.state = PodState.ACKED if ack.ok else PodState.FAILED
            pod.last_error = ack.error
        self.telemetry.message(kind, "acked" if ack.ok else "nacked", latency)
        self.events.publish(
            EventKind.MESSAGE_ACKED if ack.ok else EventKind.MESSAGE_NACKED,
            connection_id=conn.id,
            message_type=kind,
            uid=uid,
            pod_name=spec.name if spec else "",
            pod_namespace=spec.namespace if spec else "",
            error=ack.error,
            ack_latency=latency,
        )

    def unanswered(self, conn: ZtunnelConnection, request: Request, reason: str) -> None:
        kind = request_kind(request)
        uid, spec = self._about(request)
        log.warning("no ack for %s: %s", kind, reason, extra=self._extra(conn, uid, spec))
        self.telemetry.message(kind, "unanswered")

    def snapshot_complete(self, conn: ZtunnelConnection, pods: int) -> None:
        log.info("snapshot sent to ztunnel (%d pods)", pods, extra=conn.log_extra)
        self.events.publish(EventKind.SNAPSHOT_COMPLETE, connection_id=conn.id, snapshot_pods=pods)


def _pod_attributes(spec: PodSpec) -> dict[str, str]:
    return {spans.POD_UID: spec.uid, spans.POD_NAME: spec.name, spans.POD_NAMESPACE: spec.namespace}


def _copy_pod(pod: Pod) -> Pod:
    return Pod(
        spec=pod.spec,
        netns=pod.netns,
        state=pod.state,
        last_error=pod.last_error,
        enrolled_at=pod.enrolled_at,
        rules_installed=pod.rules_installed,
    )


def _pod_extra(spec: PodSpec) -> dict[str, str]:
    return {"uid": spec.uid, "pod": spec.name, "namespace": spec.namespace}
