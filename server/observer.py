"""What the node agent says about its ztunnel connections: log lines, Watch events,
metrics, and each pod's delivery state from its acks."""

from __future__ import annotations

import logging

from zds.protocol.messages import VERSION_V1, Ack, AddWorkload, DelWorkload, Request, request_kind
from zds.server.connection import ZtunnelConnection
from zds.server.connrecords import ConnectionObserver
from zds.server.eventkinds import EventKind
from zds.server.events import EventBus
from zds.server.faultkinds import MadeUpAdd
from zds.server.podcache import PodCache
from zds.server.pods import PodSpec, PodState
from zds.server.telemetry import Telemetry

log = logging.getLogger("zds.server")


class AgentObserver(ConnectionObserver):
    """Follows every connection for the node agent."""

    def __init__(self, cache: PodCache, events: EventBus, telemetry: Telemetry) -> None:
        self.cache = cache
        self.events = events
        self.telemetry = telemetry

    def _about(self, request: Request) -> tuple[str, PodSpec | None]:
        """The uid a request is about and, if known, the pod's spec (for logs and events)."""
        uid: str = getattr(request, "uid", "")
        if not uid:
            return "", None
        return uid, self.cache.spec(uid, removing=isinstance(request, DelWorkload))

    @staticmethod
    def _extra(conn: ZtunnelConnection, uid: str, spec: PodSpec | None) -> dict[str, str]:
        if spec is not None:
            return {**conn.log_extra, **spec.log_extra}
        return {**conn.log_extra, "uid": uid} if uid else conn.log_extra

    def hello(self, conn: ZtunnelConnection, version: int) -> None:
        log.info("received hello from ztunnel (version %d)", version, extra=conn.log_extra)
        if version != VERSION_V1:
            log.warning(
                "ztunnel's hello names version %d, not V1 (the only one there is): served as V1, "
                "as Istio's node agent serves any hello",
                version,
                extra=conn.log_extra,
            )

    def sent(self, conn: ZtunnelConnection, request: Request) -> None:
        kind = request_kind(request)
        uid, spec = self._about(request)
        if log.isEnabledFor(logging.DEBUG):  # (its fields only for a line that is written)
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
        if not ack.ok:
            log.error("ztunnel nacked %s: %s", kind, ack.error, extra=self._extra(conn, uid, spec))
        elif log.isEnabledFor(logging.DEBUG):  # (its fields only for a line that is written)
            # Per message: debug, as Istio's "ztunnel acked" (the pod's own lines are info).
            log.debug("ztunnel acked %s in %.1f ms", kind, latency * 1000, extra=self._extra(conn, uid, spec))
        # (not one a fault made up with the pod's uid: its answer is not the pod's)
        pod = (
            self.cache.get(uid)
            if isinstance(request, AddWorkload) and not isinstance(request, MadeUpAdd)
            else None
        )
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
        said = reason if reason.startswith(f"no ack for {kind} ") else f"no ack for {kind}: {reason}"
        log.warning("%s", said, extra=self._extra(conn, uid, spec))
        self.telemetry.message(kind, "unanswered")

    def snapshot_complete(self, conn: ZtunnelConnection, pods: int) -> None:
        log.info("snapshot sent to ztunnel (%d pods)", pods, extra=conn.log_extra)
        self.events.publish(EventKind.SNAPSHOT_COMPLETE, connection_id=conn.id, snapshot_pods=pods)
