"""``zds pod remove|list``: clients of the node agent's control API, and how their answers
are shown (``zds pod add``: podadd.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zds.errors import printable
from zds.gen import nodeagent_pb2
from zds.server.controlclient import ControlError, call

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
