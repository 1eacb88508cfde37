"""zds's objects as zds.v1 messages, and zds.v1 requests as zds's objects.

The control API's service (control.py) speaks in these; nothing here touches
the node agent itself.
"""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from zds.gen import nodeagent_pb2
from zds.netns import NetnsRef, NetnsRefError
from zds.protocol.nodeagent import ConnectionState
from zds.server.connrecords import ConnectionInfo
from zds.server.eventkinds import EventKind
from zds.server.events import AgentEvent, FaultView
from zds.server.faultkinds import FaultError, FaultKind, Refusal
from zds.server.faults import FaultSpec
from zds.server.outcomes import Enrolled
from zds.server.podcache import Pod
from zds.server.pods import PodSpec, PodSpecError, PodState, check_ips

_STATE = {
    PodState.PENDING: nodeagent_pb2.POD_STATE_PENDING,
    PodState.ACKED: nodeagent_pb2.POD_STATE_ACKED,
    PodState.FAILED: nodeagent_pb2.POD_STATE_FAILED,
}

_CONNECTION_STATE = {
    ConnectionState.AWAITING_HELLO: nodeagent_pb2.CONNECTION_STATE_AWAITING_HELLO,
    ConnectionState.SNAPSHOT: nodeagent_pb2.CONNECTION_STATE_SNAPSHOT,
    ConnectionState.READY: nodeagent_pb2.CONNECTION_STATE_READY,
    ConnectionState.CLOSED: nodeagent_pb2.CONNECTION_STATE_CLOSED,
}

#: EventKind <-> zds.v1.EventKind (EVENT_KIND_ + the upper-cased name).
EVENT_KIND_TO_PROTO: dict[EventKind, nodeagent_pb2.EventKind] = {
    kind: getattr(nodeagent_pb2, f"EVENT_KIND_{kind.name}") for kind in EventKind
}
EVENT_KIND_FROM_PROTO: dict[int, EventKind] = {int(v): k for k, v in EVENT_KIND_TO_PROTO.items()}


def _set_time(ts: Timestamp, seconds: float) -> None:
    """``ts`` (a message's field: set in place, present even at 0) to ``seconds``."""
    ts.FromNanoseconds(int(seconds * 1e9))


def pod_to_proto(pod: Pod) -> nodeagent_pb2.Pod:
    msg = nodeagent_pb2.Pod()
    fill_pod(msg, pod)
    return msg


def fill_pod(msg: nodeagent_pb2.Pod, pod: Pod) -> None:
    """Write ``pod`` into ``msg`` (empty; a field of the answer it goes in: the bulk path's
    answers are built in place, not built and then copied into it twice)."""
    spec = pod.spec
    msg.uid = spec.uid
    msg.name = spec.name
    msg.namespace = spec.namespace
    msg.service_account = spec.service_account
    msg.netns_path = pod.netns.path if pod.netns is not None else str(spec.netns)
    msg.state = _STATE[pod.state]
    msg.last_error = pod.last_error
    # (a pod recovered without its netns, which is nowhere, has none: they went with it;
    # one whose netns could not be opened may still have them where it lives)
    msg.rules_installed = pod.rules_installed and (pod.netns is not None or pod.unopened is not None)
    msg.ips.extend(spec.ips)
    msg.recovery = pod.recovery
    msg.source = spec.source.value
    if pod.netns is not None:
        msg.netns.dev = pod.netns.identity.dev
        msg.netns.ino = pod.netns.identity.ino
    _set_time(msg.enrolled_at, pod.enrolled_at)


def connection_to_proto(info: ConnectionInfo) -> nodeagent_pb2.Connection:
    msg = nodeagent_pb2.Connection(
        id=info.id,
        hello_version=info.hello_version,
        state=_CONNECTION_STATE[info.state],
        snapshot_complete=info.snapshot_complete,
        messages=nodeagent_pb2.MessageCounts(
            sent=info.sent,
            acked=info.acked,
            nacked=info.nacked,
            sent_add=info.sent_by_type.get("add", 0),
            sent_keep=info.sent_by_type.get("keep", 0),
            sent_del=info.sent_by_type.get("del", 0),
            sent_snapshot_sent=info.sent_by_type.get("snapshot_sent", 0),
        ),
        newest=info.newest,
    )
    if info.peer is not None:
        msg.peer.pid = info.peer.pid
        msg.peer.uid = info.peer.uid
        msg.peer.gid = info.peer.gid
    _set_time(msg.connected_at, info.connected_at)
    return msg


#: FaultKind <-> zds.v1.FaultKind (FAULT_KIND_ + the label in upper case, - as _).
FAULT_KIND_TO_PROTO: dict[FaultKind, int] = {
    kind: getattr(nodeagent_pb2, "FAULT_KIND_" + kind.label.upper().replace("-", "_")) for kind in FaultKind
}
FAULT_KIND_FROM_PROTO: dict[int, FaultKind] = {v: k for k, v in FAULT_KIND_TO_PROTO.items()}


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def fault_to_proto(fault: FaultView) -> nodeagent_pb2.Fault:
    msg = nodeagent_pb2.Fault(
        id=fault.id,
        kind=FAULT_KIND_TO_PROTO[FaultKind.named(fault.kind)],  # type: ignore[arg-type]
        target=fault.target,
        count=fault.count,
        uid=fault.uid,
        after_snapshot=fault.after_snapshot,
        state=fault.state,
        detail=fault.detail,
    )
    if fault.delay:
        msg.delay.CopyFrom(_duration(fault.delay))
    return msg


def fault_spec(request: nodeagent_pb2.InjectFaultRequest) -> FaultSpec:
    """What an InjectFault asks for (FaultError INVALID for an unknown or missing kind)."""
    kind = FAULT_KIND_FROM_PROTO.get(request.kind)
    if kind is None and request.kind == nodeagent_pb2.FAULT_KIND_UNSPECIFIED:
        raise FaultError(Refusal.INVALID, "kind is required: one of " + ", ".join(k.label for k in FaultKind))
    if kind is None:  # a number no zds.v1.FaultKind has (its enum is open: any int32 decodes)
        known = ", ".join(f"{number} ({k.label})" for number, k in sorted(FAULT_KIND_FROM_PROTO.items()))
        raise FaultError(Refusal.INVALID, f"unknown fault kind {request.kind} (known: {known})")
    return FaultSpec(
        kind=kind,
        count=request.count or 1,
        delay=request.delay.ToNanoseconds() / 1e9 if request.HasField("delay") else 0.0,
        uid=request.uid,
        after_snapshot=request.after_snapshot,
        connection_id=request.connection_id,
        next_connection=request.next_connection,
        skip_connections=request.skip_connections,
    )


def event_to_proto(event: AgentEvent) -> nodeagent_pb2.Event:
    msg = nodeagent_pb2.Event(
        kind=EVENT_KIND_TO_PROTO[event.kind],
        sequence=event.sequence,
        current_state=event.current_state,
        uid=event.uid,
        pod_name=event.pod_name,
        pod_namespace=event.pod_namespace,
        connection_id=event.connection_id,
        message_type=event.message_type,
        error=event.error,
        snapshot_pods=event.snapshot_pods,
        pod_source=event.pod_source,
    )
    _set_time(msg.time, event.time)
    if event.ack_latency is not None:
        msg.ack_latency.CopyFrom(_duration(event.ack_latency))
    if event.pod is not None:
        msg.pod.CopyFrom(pod_to_proto(event.pod))
    if event.connection is not None:
        msg.connection.CopyFrom(connection_to_proto(event.connection))
    if event.fault is not None:
        msg.fault.CopyFrom(fault_to_proto(event.fault))
    return msg


def pod_spec(request: nodeagent_pb2.AddPodRequest) -> PodSpec | tuple[grpc.StatusCode, str]:
    """The pod an AddPod asks for, or the status it is refused with."""
    which = request.WhichOneof("netns")
    if which is None:
        return grpc.StatusCode.INVALID_ARGUMENT, "netns_path or netns_pid is required"
    try:
        netns = (
            NetnsRef.of_path(request.netns_path)
            if which == "netns_path"
            else NetnsRef.of_pid(request.netns_pid)
        )
        ips = check_ips(request.ips)
    except (NetnsRefError, PodSpecError) as exc:
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return PodSpec.create(
        request.uid,
        netns,
        name=request.name,
        namespace=request.namespace,
        service_account=request.service_account,
        ips=ips,
    )


def add_pod_response(enrolled: Enrolled) -> nodeagent_pb2.AddPodResponse:
    msg = nodeagent_pb2.AddPodResponse()
    fill_add_pod_response(msg, enrolled)
    return msg


def fill_add_pod_response(msg: nodeagent_pb2.AddPodResponse, enrolled: Enrolled) -> None:
    """Write ``enrolled``'s answer into ``msg`` (empty), as ``fill_pod``."""
    fill_pod(msg.pod, enrolled.pod)
    msg.connection_id = enrolled.conn_id
