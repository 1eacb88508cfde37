"""``zds pod add``: a pod (its flags) over ``AddPod``, or a pods file's over the bulk path.

A pods file on the unix control socket goes over the bulk lane (bulkwire.py), in its JSON form
unless ``--json`` asks for each pod's whole answer: neither grpc nor protobuf is loaded then
(~45 and ~13 ms of the start, before the first request). A node agent from before the JSON form
gets the lane's first form, one from before the lane ``AddPods``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from zds import output, runtime
from zds.netns import NetnsRef
from zds.server import bulkwire
from zds.server.controlclient import ControlError, ControlTarget, not_root_hint
from zds.server.pods import PodSpec, PodSpecError

if TYPE_CHECKING:
    from zds.gen import nodeagent_pb2

#: Pods per message: the node agent starts on the first batch while the rest is sent.
BULK_BATCH = 64
#: The stream's deadline: --timeout, plus this much per pod (a bulk enrollment is not one call).
BULK_SECONDS_PER_POD = 0.05

#: What ``add`` notes of each pod: its answer (``--json`` prints them all at the end).
Answers = list[dict[str, Any] | None]
#: A pod's answer and, from a message that carries it, its pod (``--json`` shows it).
Result = tuple[bulkwire.Answer, "nodeagent_pb2.Pod | None"]


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
    if not args.netns and not args.netns_pid:
        raise _Usage("--netns PATH or --netns-pid PID is required")
    # (--uid, --netns and --netns-pid are checked as argparse reads them: usage errors, exit 2)
    netns: NetnsRef = NetnsRef.of_pid(args.netns_pid) if args.netns_pid else args.netns
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
        answers: Answers = [None] * len(specs)
        if args.from_file and target.address is None:
            _add_many_over_lane(target, specs, answers, args)
        else:
            with target.stub() as stub:
                if args.from_file:
                    _add_many(target, stub, specs, answers, args)
                else:
                    _add_one(target, stub, specs[0], answers, args)
        if args.json:
            _report(lambda: print(json.dumps(answers, indent=2)))
        return 1 if any(a is None or "error" in a for a in answers) else 0
    except _Usage as exc:
        args.command_parser.error(str(exc))  # (exits 2)
        raise
    except (ControlError, PodSpecError) as exc:
        print(f"zds pod add: {exc}", file=sys.stderr)
        return 1


def _pod_fields(spec: PodSpec) -> dict[str, Any]:
    """``spec`` as ``AddPodRequest``'s fields by their proto names: the lane's JSON form sends
    them so, and the message is made of them."""
    fields: dict[str, Any] = {
        "uid": spec.uid,
        "name": spec.name,
        "namespace": spec.namespace,
        "service_account": spec.service_account,
        "ips": list(spec.ips),
    }
    if spec.netns.pid is not None:
        fields["netns_pid"] = spec.netns.pid
    else:
        fields["netns_path"] = spec.netns.location
    return fields


def _add_one(
    target: ControlTarget, stub: Any, spec: PodSpec, answers: Answers, args: argparse.Namespace
) -> None:
    from zds.gen import nodeagent_pb2

    try:
        resp = target.call(stub.AddPod, nodeagent_pb2.AddPodRequest(**_pod_fields(spec)), args.timeout)
    except ControlError as exc:
        answers[0] = _failed(spec, str(exc), args)
    else:
        answers[0] = _enrolled(spec, resp.connection_id, resp.pod, args)


def _batches(specs: list[PodSpec]) -> Iterator[nodeagent_pb2.AddPodsRequest]:
    from zds.gen import nodeagent_pb2

    for batch in _pod_batches(specs):
        yield nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest(**pod) for pod in batch])


def _pod_batches(specs: list[PodSpec]) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(specs), BULK_BATCH):
        yield [_pod_fields(spec) for spec in specs[i : i + BULK_BATCH]]


def _add_many(
    target: ControlTarget, stub: Any, specs: list[PodSpec], answers: Answers, args: argparse.Namespace
) -> None:
    """Every pod over one AddPods stream (the bulk path), each printed as its answer comes."""
    import grpc

    try:
        for reply in stub.AddPods(_batches(specs), timeout=_deadline(specs, args)):
            _answered(_results(reply), specs, answers, args)
    except grpc.RpcError as exc:
        _unanswered(specs, answers, str(target.failure(exc)), args)
    _unanswered(specs, answers, "no answer", args)


def _add_many_over_lane(
    target: ControlTarget, specs: list[PodSpec], answers: Answers, args: argparse.Namespace
) -> None:
    """The same over the control socket's bulk lane (bulkwire.py; in which form:
    ``_lane_results``): no gRPC to load. A node agent from before the lane took nothing: the
    pods go over AddPods then."""
    try:
        for results in _lane_results(target, specs, args):
            _answered(results, specs, answers, args)
    except bulkwire.LaneUnsupported:
        with target.stub() as stub:
            _add_many(target, stub, specs, answers, args)
            return
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


def _lane_results(
    target: ControlTarget, specs: list[PodSpec], args: argparse.Namespace
) -> Iterator[list[Result]]:
    """Each message's answers over the lane: in its JSON form but with ``--json`` (which
    shows each pod's whole answer) or to a node agent from before that form (it took nothing
    then: it closed at the opening), else in its first form."""
    deadline = _deadline(specs, args)
    if not args.json:
        try:
            for answers in bulkwire.exchange_json(target.lane(args.timeout), _pod_batches(specs), deadline):
                yield [(answer, None) for answer in answers]
            return
        except bulkwire.LaneUnsupported:
            pass
    for reply in bulkwire.exchange(target.lane(args.timeout), _batches(specs), deadline):
        yield _results(reply)


def _results(reply: nodeagent_pb2.AddPodsReply) -> list[Result]:
    """``reply``'s answers, each with its pod."""
    return [
        (
            bulkwire.Answer(r.index, r.code, status_name(r.code), r.message, r.response.connection_id),
            r.response.pod,
        )
        for r in reply.results
    ]


def _deadline(specs: list[PodSpec], args: argparse.Namespace) -> float:
    """A bulk enrollment's time limit: --timeout, plus some per pod (it is not one call)."""
    return float(args.timeout + len(specs) * BULK_SECONDS_PER_POD)


def _answered(
    results: Iterable[Result], specs: list[PodSpec], answers: Answers, args: argparse.Namespace
) -> None:
    """Each of ``results`` printed and noted in ``answers`` (by its position)."""
    for answer, pod in results:
        if answer.index >= len(specs) or answers[answer.index] is not None:
            continue  # not one of ours, or answered already: nothing a node agent sends
        spec = specs[answer.index]
        if answer.code == 0:
            answers[answer.index] = _enrolled(spec, answer.connection_id, pod, args)
        else:
            status = answer.status or str(answer.code)
            answers[answer.index] = _failed(spec, f"{status}: {answer.message}", args)
    _report(sys.stdout.flush)  # each batch of answers as it comes (not a write per line)


def _unanswered(specs: list[PodSpec], answers: Answers, error: str, args: argparse.Namespace) -> None:
    """``error`` for each pod not answered yet."""
    for i, spec in enumerate(specs):
        if answers[i] is None:
            answers[i] = _failed(spec, error, args)


def status_name(code: int) -> str:
    """A gRPC status code's name (AddPodsResult.code), as grpc.StatusCode names it."""
    from google.rpc import code_pb2

    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)


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


def _enrolled(
    spec: PodSpec, connection_id: str, pod: nodeagent_pb2.Pod | None, args: argparse.Namespace
) -> dict[str, Any]:
    if not args.json:
        line = f"pod {spec.uid} ({spec.namespace}/{spec.name}) enrolled: acked by ztunnel connection {connection_id}"
        _report(lambda: print(line))
        return {"uid": spec.uid}
    from zds.server.podctl import pod_dict

    assert pod is not None, "--json takes the forms whose answers carry the pod"
    return {"uid": spec.uid, "connection_id": connection_id, "pod": pod_dict(pod)}


def _failed(spec: PodSpec, error: str, args: argparse.Namespace) -> dict[str, Any]:
    if not args.json:
        print(f"zds pod add: {spec.uid}: {error}", file=sys.stderr)
    return {"uid": spec.uid, "error": error}
