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
from dataclasses import dataclass

from zds import defaults
from zds.netns import NetnsError, open_netns_ref
from zds.protocol.messages import Ack, AddWorkload, DelWorkload, KeepWorkload, Request, request_kind
from zds.protocol.nodeagent import AcceptLimiter
from zds.server.connection import (
    ConnectionLost,
    ConnectionObserver,
    SnapshotItem,
    ZtunnelConnection,
    cancel_and_wait,
)
from zds.server.pods import Pod, PodSpec, PodSpecError, PodState
from zds.server.redirect import RedirectError, Redirector
from zds.transport import accept

log = logging.getLogger("zds.server")


class EnrollmentError(Exception):
    """Enrollment failed; ``kind`` says how (the control API maps it to a gRPC status)."""

    INVALID = "invalid"  # bad uid, bad netns, too large: nothing was cached
    NO_CONNECTION = "no-connection"  # cached, delivered in the next snapshot
    NACKED = "nacked"  # ztunnel answered with an error; cached
    LOST = "lost"  # the connection closed before the ack; cached
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


class NodeAgent(ConnectionObserver):
    """Owns the pod cache (and every netns fd in it) and the ztunnel connections."""

    def __init__(self, config: AgentConfig | None = None, redirector: Redirector | None = None) -> None:
        self.config = config or AgentConfig()
        #: Installs the in-pod rules; None with --no-redirect.
        self.redirector = redirector
        self.pods: dict[str, Pod] = {}
        #: Connections that said hello, oldest first; the last is the newest.
        self.connections: list[ZtunnelConnection] = []
        #: Every live connection, with or without a hello yet (for the limit).
        self._live: set[ZtunnelConnection] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    # -- pods --------------------------------------------------------------------
    async def load(self, spec: PodSpec) -> Pod:
        """Cache a pod without delivering it (start-up ``--pods``).

        A pod whose netns cannot be opened stays known without one and goes out
        as KeepWorkload, as after a node-agent restart in Istio.
        """
        spec.validate()
        try:
            netns = open_netns_ref(spec.netns)
        except NetnsError as exc:
            log.warning(
                "netns unavailable; the pod stays known and is sent as KeepWorkload: %s",
                exc,
                extra=_pod_extra(spec),
            )
            return self._cache(Pod(spec=spec, netns=None))
        pod = Pod(spec=spec, netns=netns)
        await self._install_rules(pod)
        return self._cache(pod)

    async def add_pod(self, spec: PodSpec) -> Enrolled:
        """Enroll a pod: open its netns, install the redirection rules, cache it,
        deliver AddWorkload + fd to the newest ztunnel and wait for the ack."""
        try:
            spec.validate()
            netns = open_netns_ref(spec.netns)
        except (PodSpecError, NetnsError) as exc:
            raise EnrollmentError(EnrollmentError.INVALID, str(exc)) from exc
        pod = Pod(spec=spec, netns=netns)
        await self._install_rules(pod)
        self._cache(pod)
        log.info("pod enrolled (netns %s)", netns.identity, extra=_pod_extra(spec))
        conn = self.newest_connection()
        if conn is None:
            pod.last_error = "no ztunnel connection"
            raise EnrollmentError(
                EnrollmentError.NO_CONNECTION,
                "no ztunnel connection (the pod stays cached and goes out in the next snapshot)",
            )
        try:
            ack = await conn.deliver(AddWorkload(uid=spec.uid, info=spec.info), netns.dup())
        except ConnectionLost as lost:
            if self.pods.get(spec.uid) is pod:
                pod.last_error = str(lost)
            raise EnrollmentError(EnrollmentError.LOST, str(lost)) from lost
        if ack.error:
            raise EnrollmentError(EnrollmentError.NACKED, ack.error)
        return Enrolled(pod=pod, conn_id=conn.id)

    async def _install_rules(self, pod: Pod) -> None:
        """Install the in-pod rules; on failure close the netns and refuse the enrollment (nothing is sent)."""
        if self.redirector is None or pod.netns is None:
            return
        try:
            families = await self.redirector.install(pod.netns)
        except (RedirectError, NetnsError, OSError) as exc:
            pod.close()
            raise EnrollmentError(
                EnrollmentError.RULES, f"cannot install in-pod redirection rules for pod {pod.uid}: {exc}"
            ) from exc
        pod.rules_installed = True
        log.info(
            "in-pod redirection rules installed (IPv%s)",
            "+IPv".join(map(str, families)),
            extra=_pod_extra(pod.spec),
        )

    async def _remove_rules(self, pod: Pod) -> None:
        if self.redirector is None or pod.netns is None or not pod.rules_installed:
            return
        try:
            await self.redirector.remove(pod.netns)
            pod.rules_installed = False
        except (RedirectError, NetnsError, OSError) as exc:
            log.warning("cannot remove in-pod redirection rules: %s", exc, extra=_pod_extra(pod.spec))

    async def remove_pod(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        """Forget a pod, send DelWorkload to every connection, remove its rules, close its netns fd.

        Done whatever ztunnel answers, even with no ztunnel connected (Istio's rule).
        Raises KeyError for an unknown uid.
        """
        pod = self.pods.pop(uid)
        log.info("pod removed", extra=_pod_extra(pod.spec))
        try:
            conns = list(self.connections)
            answers = await asyncio.gather(
                *(c.deliver(DelWorkload(uid=uid)) for c in conns), return_exceptions=True
            )
            await self._remove_rules(pod)
        finally:
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
                task = asyncio.ensure_future(self._remove_rules_and_close(old))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                old.close()  # replaced: its fd goes now (queued sends hold their own dups)
        self.pods[pod.uid] = pod
        return pod

    async def _remove_rules_and_close(self, pod: Pod) -> None:
        try:
            await self._remove_rules(pod)
        finally:
            pod.close()

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
                self._live.add(conn)
                task = asyncio.create_task(self._run_connection(conn), name=f"ztunnel-{conn.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            await self.close_connections("node agent shutting down")

    async def _run_connection(self, conn: ZtunnelConnection) -> None:
        def ready() -> None:
            self.connections.append(conn)
            log.info("ztunnel connected, total connected: %d", len(self.connections), extra=conn.log_extra)

        try:
            reason = await conn.serve(self, ready)
        finally:
            self._live.discard(conn)
            if conn in self.connections:
                self.connections.remove(conn)
        log.info(
            "ztunnel disconnected: %s; total connected: %d",
            reason,
            len(self.connections),
            extra=conn.log_extra,
        )

    async def close_connections(self, reason: str) -> None:
        for conn in list(self._live):
            conn.close(reason)
        for task in list(self._tasks):
            await cancel_and_wait(task)

    def close(self) -> None:
        """Close every netns fd in the cache (shutdown)."""
        for pod in self.pods.values():
            pod.close()
        self.pods.clear()

    # -- ConnectionObserver --------------------------------------------------------
    def hello(self, conn: ZtunnelConnection, version: int) -> None:
        log.info("received hello from ztunnel (version %d)", version, extra=conn.log_extra)

    def sent(self, conn: ZtunnelConnection, request: Request) -> None:
        log.debug("sent %s %s", request_kind(request), getattr(request, "uid", ""), extra=conn.log_extra)

    def acked(self, conn: ZtunnelConnection, request: Request, ack: Ack, latency: float) -> None:
        uid = getattr(request, "uid", "")
        pod = self.pods.get(uid) if isinstance(request, AddWorkload) else None
        extra = {**conn.log_extra, **(_pod_extra(pod.spec) if pod else {"uid": uid})}
        if ack.ok:
            log.info("ztunnel acked %s in %.1f ms", request_kind(request), latency * 1000, extra=extra)
        else:
            log.error("ztunnel nacked %s: %s", request_kind(request), ack.error, extra=extra)
        if pod is not None:
            pod.state = PodState.ACKED if ack.ok else PodState.FAILED
            pod.last_error = ack.error

    def snapshot_complete(self, conn: ZtunnelConnection) -> None:
        log.info("snapshot sent to ztunnel (%d pods)", len(self.pods), extra=conn.log_extra)


def _pod_extra(spec: PodSpec) -> dict[str, str]:
    return {"uid": spec.uid, "pod": spec.name, "namespace": spec.namespace}
