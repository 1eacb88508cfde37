"""``zds connections`` and ``zds watch``: looking at the node agent through its control API."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from datetime import UTC
from typing import TYPE_CHECKING, Any, TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from zds.gen import nodeagent_pb2
from zds.server.controlclient import ControlError, ControlTarget, call
from zds.server.podctl import enum_label, message_dict, table

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

_VERSIONS = {1: "V1"}


def _when(ts: Timestamp) -> str:
    """UTC, to the millisecond, as in the logs (the seconds as they came, when no date holds
    them: a node agent's value out of range was a traceback)."""
    try:
        dt = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        return f"{ts.seconds}s"
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def _value(text: str) -> str:
    """``text`` as a word of a line: quoted (JSON) when empty, with spaces or quotes, or with
    what is not printable (written as its escape: never a terminal's control sequence)."""
    if not text or not text.isprintable() or any(c.isspace() or c == '"' for c in text):
        return json.dumps(text)
    return text


def _enum(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    return enum_label(enum, value, prefix).replace("_", "-")


# -- zds connections ------------------------------------------------------------------


def connection_dict(conn: nodeagent_pb2.Connection) -> dict[str, Any]:
    return message_dict(conn, every_field=True)


def connection_row(conn: nodeagent_pb2.Connection) -> list[str]:
    has_peer = conn.HasField("peer")
    state = _enum(nodeagent_pb2.ConnectionState, conn.state, "CONNECTION_STATE_")
    return [
        conn.id,
        str(conn.peer.pid) if has_peer else "-",
        str(conn.peer.uid) if has_peer else "-",
        str(conn.peer.gid) if has_peer else "-",
        _VERSIONS.get(conn.hello_version, str(conn.hello_version)) if conn.hello_version else "-",
        _when(conn.connected_at),
        state,
        "yes" if conn.snapshot_complete else "no",
        str(conn.messages.sent),
        str(conn.messages.acked),
        str(conn.messages.nacked),
        "yes" if conn.newest else "no",
    ]


CONNECTION_HEADERS = [
    "ID",
    "PID",
    "UID",
    "GID",
    "VERSION",
    "CONNECTED",
    "STATE",
    "SNAPSHOT",
    "SENT",
    "ACKED",
    "NACKED",
    "NEWEST",
]


def connections(args: argparse.Namespace) -> int:
    try:
        resp = call(args, "ListConnections", nodeagent_pb2.ListConnectionsRequest())
    except ControlError as exc:
        print(f"zds connections: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([connection_dict(c) for c in resp.connections], indent=2))
        return 0
    print(table(CONNECTION_HEADERS, [connection_row(c) for c in resp.connections]))
    return 0


# -- zds watch --------------------------------------------------------------------------


def kind_name(kind: int) -> str:
    """EVENT_KIND_POD_ENROLLED -> "pod enrolled"."""
    return enum_label(nodeagent_pb2.EventKind, kind, "EVENT_KIND_").replace("_", " ")


def _pod_ref(event: nodeagent_pb2.Event) -> list[str]:
    parts = [f"uid={_value(event.uid)}"] if event.uid else []
    if event.pod_name or event.pod_namespace:
        parts.append(f"pod={_value(f'{event.pod_namespace}/{event.pod_name}')}")
    return parts


def event_details(event: nodeagent_pb2.Event) -> str:
    """The part of a ``zds watch`` line after the time and the kind."""
    kind = event.kind
    parts: list[str] = []
    if kind in (nodeagent_pb2.EVENT_KIND_POD_ENROLLED, nodeagent_pb2.EVENT_KIND_POD_REMOVED):
        parts += _pod_ref(event)
        pod = event.pod
        if pod.service_account:
            parts.append(f"sa={_value(pod.service_account)}")
        if kind == nodeagent_pb2.EVENT_KIND_POD_ENROLLED:
            parts.append(f"netns={pod.netns.dev}:{pod.netns.ino}" if pod.HasField("netns") else "netns=-")
            parts.append(f"state={_enum(nodeagent_pb2.PodState, pod.state, 'POD_STATE_')}")
            parts.append(f"rules={'yes' if pod.rules_installed else 'no'}")
            if pod.last_error:
                parts.append(f"last_error={_value(pod.last_error)}")
    elif kind in (nodeagent_pb2.EVENT_KIND_ZTUNNEL_CONNECTED, nodeagent_pb2.EVENT_KIND_ZTUNNEL_DISCONNECTED):
        conn = event.connection
        parts.append(f"conn={_value(event.connection_id)}")
        if conn.HasField("peer"):
            parts.append(f"pid={conn.peer.pid} uid={conn.peer.uid} gid={conn.peer.gid}")
        if kind == nodeagent_pb2.EVENT_KIND_ZTUNNEL_CONNECTED:
            parts.append(f"version={_VERSIONS.get(conn.hello_version, str(conn.hello_version))}")
            parts.append(f"state={_enum(nodeagent_pb2.ConnectionState, conn.state, 'CONNECTION_STATE_')}")
            if conn.newest:
                parts.append("newest")
        else:
            parts.append(f"reason={_value(event.error)}")
            m = conn.messages
            parts.append(f"sent={m.sent} acked={m.acked} nacked={m.nacked}")
    elif kind in (
        nodeagent_pb2.EVENT_KIND_MESSAGE_SENT,
        nodeagent_pb2.EVENT_KIND_MESSAGE_ACKED,
        nodeagent_pb2.EVENT_KIND_MESSAGE_NACKED,
    ):
        parts.append(f"conn={_value(event.connection_id)}")
        parts.append(_value(event.message_type))
        parts += _pod_ref(event)
        if event.HasField("ack_latency"):
            parts.append(f"latency={event.ack_latency.ToNanoseconds() / 1e6:.2f}ms")
        if kind == nodeagent_pb2.EVENT_KIND_MESSAGE_NACKED:
            parts.append(f"error={_value(event.error)}")
    elif kind == nodeagent_pb2.EVENT_KIND_SNAPSHOT_COMPLETE:
        parts.append(f"conn={_value(event.connection_id)} pods={event.snapshot_pods}")
    elif kind in (nodeagent_pb2.EVENT_KIND_POD_SOURCE_UP, nodeagent_pb2.EVENT_KIND_POD_SOURCE_DOWN):
        parts.append(f"source={_value(event.pod_source)}")
        if event.error:
            parts.append(
                f"{'reason' if kind == nodeagent_pb2.EVENT_KIND_POD_SOURCE_DOWN else 'detail'}={_value(event.error)}"
            )
    elif kind in (nodeagent_pb2.EVENT_KIND_FAULT_INJECTED, nodeagent_pb2.EVENT_KIND_FAULT_APPLIED):
        fault = event.fault
        parts.append(f"{_value(fault.id)} {_enum(nodeagent_pb2.FaultKind, fault.kind, 'FAULT_KIND_')}")
        parts.append(f"target={_value(fault.target)} state={fault.state}")
        if kind == nodeagent_pb2.EVENT_KIND_FAULT_APPLIED:
            parts.append(f"detail={_value(event.error)}")
    if event.current_state:
        parts.append("(current state)")
    return " ".join(parts)


class EventPrinter:
    """Prints events as they come: one readable line each, or one JSON object per line."""

    def __init__(self, out: TextIO, *, as_json: bool, filtered: bool = False) -> None:
        self.out = out
        self.as_json = as_json
        #: --kind or --uid: the current state's counts are of what they let through.
        self.filtered = filtered
        self.received = 0
        self._pods = 0
        self._connections = 0

    def print(self, event: nodeagent_pb2.Event) -> None:
        self.received += 1
        if self.as_json:
            doc = message_dict(event)
            self.out.write(json.dumps(doc, separators=(",", ":")) + "\n")
        elif event.kind == nodeagent_pb2.EVENT_KIND_CURRENT_STATE_END:
            shown = " shown (--kind, --uid)" if self.filtered else ""
            self.out.write(
                f"{_when(event.time)}  --- current state: {self._pods} pod(s), "
                f"{self._connections} ztunnel connection(s){shown}; live events follow ---\n"
            )
        else:
            if event.current_state:
                if event.kind == nodeagent_pb2.EVENT_KIND_POD_ENROLLED:
                    self._pods += 1
                elif event.kind == nodeagent_pb2.EVENT_KIND_ZTUNNEL_CONNECTED:
                    self._connections += 1
            self.out.write(f"{_when(event.time)}  {kind_name(event.kind):<20}  {event_details(event)}\n")
        self.out.flush()


def watch_request(args: argparse.Namespace) -> nodeagent_pb2.WatchRequest:
    kinds = [k for group in args.kind or [] for k in group]
    return nodeagent_pb2.WatchRequest(
        kinds=[getattr(nodeagent_pb2, f"EVENT_KIND_{k.upper()}") for k in dict.fromkeys(kinds)],
        uid=args.uid,
    )


def watch(args: argparse.Namespace) -> int:
    """Print events until Ctrl-C (exit 0) or until the node agent goes away (exit 1)."""
    printer = EventPrinter(sys.stdout, as_json=args.json, filtered=bool(args.kind or args.uid))
    try:
        target = ControlTarget.from_args(args)
        with target.stub() as stub:
            stream = stub.Watch(watch_request(args))
            # (a socket that accepts and never answers held the watch silently for good)
            timed_out, answered, decided = threading.Event(), threading.Event(), threading.Lock()

            def give_up() -> None:
                with decided:  # (not a stream whose first event came meanwhile)
                    if answered.is_set():
                        return
                    timed_out.set()
                stream.cancel()

            unanswered = threading.Timer(args.timeout, give_up)
            unanswered.start()
            try:
                for event in stream:
                    if not answered.is_set():
                        with decided:
                            answered.set()
                        unanswered.cancel()
                    printer.print(event)
            except KeyboardInterrupt:
                stream.cancel()
                return 0
            except grpc.RpcError as exc:
                said = _stream_error(exc, printer.received, target)
                if timed_out.is_set() and printer.received == 0:
                    said = f"no answer from the node agent at {target.where} within {args.timeout:g} s"
                print(f"zds watch: {said}", file=sys.stderr)
                return 1
            finally:
                unanswered.cancel()
    except ControlError as exc:
        print(f"zds watch: {exc}", file=sys.stderr)
        return 1
    print("zds watch: the node agent ended the watch", file=sys.stderr)
    return 1


def _stream_error(exc: grpc.RpcError, received: int, target: ControlTarget) -> str:
    code: grpc.StatusCode = exc.code()
    details = exc.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE and received == 0:
        return str(target.failure(exc))
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the node agent ended the watch: {details}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return f"the node agent went away ({details})"
    return f"{code.name}: {details}"
