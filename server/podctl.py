"""``zds pod add|remove|list``: clients of the node agent's control API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from google.rpc import code_pb2

from zds import output, runtime
from zds.errors import printable
from zds.gen import nodeagent_pb2
from zds.netns import NetnsRef, NetnsRefError
from zds.server import bulkwire
from zds.server.controlclient import ControlError, ControlTarget, call, not_root_hint
from zds.server.pods import PodSpec, PodSpecError

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
    from google.protobuf.message import Message


def pod_dict(pod: nodeagent_pb2.Pod) -> dict[str, Any]:
    return message_dict(pod, every_field=True)


def message_dict(message: Message, *, every_field: bool = False) -> dict[str, Any]:
    """A node agent's answer as ``--json`` writes it (proto field names; ``every_field``: those
    at their default too); a time or duration JSON cannot hold (a newer or broken node
    agent's) is its seconds, as the tables write it: it was a traceback."""
    from google.protobuf import json_format  # --json only (~15 ms of imports)

    def as_dict(m: Message) -> dict[str, Any]:
        doc: dict[str, Any] = json_format.MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=every_field
        )
        return doc

    try:
        return as_dict(message)
    except (json_format.Error, ValueError):
        copy = type(message)()
        copy.CopyFrom(message)
        cut = _cut_bad_times(copy)
        doc = as_dict(copy)
        for path, seconds in cut:
            place: Any = doc
            for key in path[:-1]:
                place = place[key]
            place[path[-1]] = f"{seconds}s"
        return doc


_TIMES = ("google.protobuf.Timestamp", "google.protobuf.Duration")


def _cut_bad_times(
    message: Message, path: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], int]]:
    """Clear each time or duration in ``message`` that JSON cannot hold; where each was and its seconds."""
    from google.protobuf import json_format

    cut: list[tuple[tuple[str | int, ...], int]] = []
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        repeated = field.is_repeated
        for index, item in enumerate(value) if repeated else [(0, value)]:
            where = (*path, field.name, index) if repeated else (*path, field.name)
            if item.DESCRIPTOR.full_name not in _TIMES:
                cut += _cut_bad_times(item, where)
                continue
            try:
                json_format.MessageToDict(item)
            except (json_format.Error, ValueError):  # (ValueError from a Timestamp's own check)
                cut.append((where, item.seconds))
                if repeated:
                    item.Clear()
                else:
                    message.ClearField(field.name)
    return cut


def _state(pod: nodeagent_pb2.Pod) -> str:
    return enum_label(nodeagent_pb2.PodState, pod.state, "POD_STATE_")


def enum_label(enum: EnumTypeWrapper, value: int, prefix: str) -> str:
    """An enum value's name, less ``prefix``, lower-case; its number when this client does not
    know it (a newer node agent's: it was a traceback)."""
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return str(name).removeprefix(prefix).lower()


def _netns(pod: nodeagent_pb2.Pod) -> str:
    return f"{pod.netns.dev}:{pod.netns.ino}" if pod.HasField("netns") else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table; what is not printable in a cell (a node agent's text: a uid, an
    error) is written as its escape, never sent to the terminal as it is."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _add_request(spec: PodSpec) -> nodeagent_pb2.AddPodRequest:
    req = nodeagent_pb2.AddPodRequest(
        uid=spec.uid,
        name=spec.name,
        namespace=spec.namespace,
        service_account=spec.service_account,
        ips=list(spec.ips),
    )
    if spec.netns.pid is not None:
        req.netns_pid = spec.netns.pid
    else:
        req.netns_path = spec.netns.location
    return req


class _Usage(PodSpecError):
    """Flags missing or that do not go together: refused as argparse refuses one (exit 2)."""


def _specs(args: argparse.Namespace) -> list[PodSpec]:
    """The pods to enroll: the flags' one, or a pods file's."""
    if args.from_file:
        if args.uid is not None or args.netns or args.netns_pid or args.ips:
            raise _Usage("--from-file cannot be combined with --uid/--netns/--netns-pid/--ip")
        from zds.server.podsfile import load_pods_file

        specs = load_pods_file(args.from_file)
        if not specs:  # exit 0 is for pods acked, and none was
            raise PodSpecError(f"{args.from_file}: no pods in it, nothing to enroll")
        return specs
    if args.uid is None:
        raise _Usage("--uid is required (or --from-file)")
    if not args.uid.strip():
        raise PodSpecError("--uid is empty")
    if not args.netns and not args.netns_pid:
        raise _Usage("--netns PATH or --netns-pid PID is required")
    try:
        netns = NetnsRef.of_pid(args.netns_pid) if args.netns_pid else NetnsRef.parse(args.netns)
    except NetnsRefError as exc:
        raise PodSpecError(str(exc)) from exc
    return [
        PodSpec.create(
            args.uid,
            netns,
            name=args.name,
            namespace=args.namespace,
            service_account=args.service_account,
            ips=tuple(args.ips),
        )
    ]


def add(args: argparse.Namespace) -> int:
    try:
        specs = _specs(args)
        target = ControlTarget.from_args(args)
        runtime.started()  # the pods are read: collection resumes (zds.cli held it for start-up)
        if args.from_file and target.address is None:
            answers = _add_many_over_lane(target, specs, args)
        else:
            with target.stub() as stub:
                answers = (
                    _add_many(target, stub, specs, args)
                    if args.from_file
                    else [_add_one(target, stub, specs[0], args)]
                )
        if args.json:
            _report(lambda: print(json.dumps(answers, indent=2)))
        return 1 if any("error" in a for a in answers) else 0
    except _Usage as exc:
        args.command_parser.error(str(exc))  # (exits 2)
        raise
    except (ControlError, PodSpecError) as exc:
        print(f"zds pod add: {exc}", file=sys.stderr)
        return 1


def _add_one(target: ControlTarget, stub: Any, spec: PodSpec, args: argparse.Namespace) -> dict[str, Any]:
    try:
        resp = target.call(stub.AddPod, _add_request(spec), args.timeout)
    except ControlError as exc:
        return _failed(spec, str(exc), args)
    return _enrolled(spec, resp, args)


def _batches(specs: list[PodSpec]) -> Iterator[nodeagent_pb2.AddPodsRequest]:
    for i in range(0, len(specs), BULK_BATCH):
        yield nodeagent_pb2.AddPodsRequest(pods=[_add_request(spec) for spec in specs[i : i + BULK_BATCH]])


def _add_many(
    target: ControlTarget, stub: Any, specs: list[PodSpec], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every pod over one AddPods stream (the bulk path), each printed as its answer comes."""
    import grpc

    answers: list[dict[str, Any] | None] = [None] * len(specs)
    try:
        for reply in stub.AddPods(_batches(specs), timeout=_deadline(specs, args)):
            _answered(reply, specs, answers, args)
    except grpc.RpcError as exc:
        _unanswered(specs, answers, str(target.failure(exc)), args)
    _unanswered(specs, answers, "no answer", args)
    return cast(list[dict[str, Any]], answers)


def _add_many_over_lane(
    target: ControlTarget, specs: list[PodSpec], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The same over the control socket's bulk lane (bulkwire.py): no gRPC to load. A node
    agent from before the lane took nothing: the pods go over AddPods then."""
    sock = target.lane(args.timeout)
    answers: list[dict[str, Any] | None] = [None] * len(specs)
    try:
        for reply in bulkwire.exchange(sock, _batches(specs), _deadline(specs, args)):
            _answered(reply, specs, answers, args)
    except bulkwire.LaneUnsupported:
        with target.stub() as stub:
            return _add_many(target, stub, specs, args)
    except bulkwire.LaneError as exc:
        _unanswered(specs, answers, str(exc), args)
    if all(answer is None for answer in answers):  # turned away, or it stopped: nothing came
        closed = f"the node agent at {target.socket} closed the connection without answering{not_root_hint()}"
    else:
        closed = (
            "no answer: the node agent closed the connection (its stop, if it was stopping); "
            "whether the pod was enrolled is not known (zds pod list, once it runs again)"
        )
    _unanswered(specs, answers, closed, args)
    return cast(list[dict[str, Any]], answers)


def _deadline(specs: list[PodSpec], args: argparse.Namespace) -> float:
    """A bulk enrollment's time limit: --timeout, plus some per pod (it is not one call)."""
    return float(args.timeout + len(specs) * BULK_SECONDS_PER_POD)


def _answered(
    reply: nodeagent_pb2.AddPodsReply,
    specs: list[PodSpec],
    answers: list[dict[str, Any] | None],
    args: argparse.Namespace,
) -> None:
    """Each answer of ``reply`` printed and noted in ``answers`` (by its position)."""
    for result in reply.results:
        if result.index >= len(specs) or answers[result.index] is not None:
            continue  # not one of ours, or answered already: nothing a node agent sends
        spec = specs[result.index]
        if result.code == 0:
            answers[result.index] = _enrolled(spec, result.response, args)
        else:
            answers[result.index] = _failed(spec, f"{status_name(result.code)}: {result.message}", args)
    _report(sys.stdout.flush)  # each batch of answers as it comes (not a write per line)


def _unanswered(
    specs: list[PodSpec], answers: list[dict[str, Any] | None], error: str, args: argparse.Namespace
) -> None:
    """``error`` for each pod not answered yet."""
    for i, spec in enumerate(specs):
        if answers[i] is None:
            answers[i] = _failed(spec, error, args)


def status_name(code: int) -> str:
    """A gRPC status code's name (AddPodsResult.code), as grpc.StatusCode names it."""
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)


#: Pods per AddPods message: the node agent starts on the first batch while the rest is sent.
BULK_BATCH = 64
#: The stream's deadline: --timeout, plus this much per pod (a bulk enrollment is not one call).
BULK_SECONDS_PER_POD = 0.05


def _report(write: Callable[[], object]) -> None:
    """Write to stdout; once its reader is gone (``zds pod add --from-file ... | head -1``) the
    rest of the report goes nowhere and the enrollment goes on, the exit code saying how it
    went (stopping there left the pods after it unenrolled, and exited 0)."""
    try:
        write()
    except BrokenPipeError:
        if not output.stdout_reader_gone():
            raise
        output.discard_stdout()


def _enrolled(spec: PodSpec, resp: nodeagent_pb2.AddPodResponse, args: argparse.Namespace) -> dict[str, Any]:
    if not args.json:
        line = f"pod {spec.uid} ({spec.namespace}/{spec.name}) enrolled: acked by ztunnel connection {resp.connection_id}"
        _report(lambda: print(line))
        return {"uid": spec.uid}
    return {"uid": spec.uid, "connection_id": resp.connection_id, "pod": pod_dict(resp.pod)}


def _failed(spec: PodSpec, error: str, args: argparse.Namespace) -> dict[str, Any]:
    if not args.json:
        print(f"zds pod add: {spec.uid}: {error}", file=sys.stderr)
    return {"uid": spec.uid, "error": error}


def remove(args: argparse.Namespace) -> int:
    try:
        resp = call(args, "RemovePod", nodeagent_pb2.RemovePodRequest(uid=args.uid))
    except ControlError as exc:
        print(f"zds pod remove: {exc}", file=sys.stderr)
        return 1
    if not resp.deliveries:
        print(f"pod {args.uid} removed (no ztunnel connected)")
    for d in resp.deliveries:
        answer = f"error: {d.error}" if d.error else "acked"
        print(f"pod {args.uid} removed: DelWorkload to ztunnel connection {d.connection_id}: {answer}")
    if resp.pod.rules_installed:  # (a removal they did not come out of: taken out later)
        print(
            f"zds pod remove: {args.uid}: its in-pod rules are still in its netns: they did not come out "
            "with it (the node agent's log says why, and when they go: retried, or at a start that can "
            "open its netns)",
            file=sys.stderr,
        )
    return 0


def list_pods(args: argparse.Namespace) -> int:
    try:
        resp = call(args, "ListPods", nodeagent_pb2.ListPodsRequest())
    except ControlError as exc:
        print(f"zds pod list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([pod_dict(p) for p in resp.pods], indent=2))
        return 0
    rows = [
        [
            p.uid,
            p.name,
            p.namespace,
            p.service_account,
            _state(p),
            _netns(p),
            p.netns_path,
            "yes" if p.rules_installed else "no",
            p.recovery or "-",
            p.source or "-",
            p.last_error or "-",
        ]
        for p in resp.pods
    ]
    headers = [
        "UID",
        "NAME",
        "NAMESPACE",
        "SERVICE-ACCOUNT",
        "STATE",
        "NETNS",
        "PATH",
        "RULES",
        "RECOVERY",
        "SOURCE",
        "LAST-ERROR",
    ]
    print(table(headers, rows))
    return 0
