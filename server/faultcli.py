"""``zds fault KIND``: make the node agent misbehave on purpose, to test a ztunnel (a client of
the control API's ``InjectFault``; ``zds server --faults FILE`` arms the same at start-up)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from zds import cliflags, defaults
from zds.errors import printable
from zds.server.controlcli import control_flags
from zds.server.faultkinds import FaultKind


def _delay(text: str) -> float:
    """``--delay``: 0 to FAULT_DELAY_MAX seconds (1e300 was a traceback, 0 refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= defaults.FAULT_DELAY_MAX:  # (also NaN)
        raise argparse.ArgumentTypeError(
            f"{text} is not a number of seconds from 0 to {defaults.FAULT_DELAY_MAX:g}"
        )
    return value


def register(sub: argparse._SubParsersAction[Any]) -> None:
    width = max(len(k.label) for k in FaultKind)
    kinds = "\n".join(f"  {k.label:<{width}}  {k.category.value:<10}  {k.description}" for k in FaultKind)
    fault = sub.add_parser(
        "fault",
        help="make the node agent misbehave on purpose (to test a ztunnel)",
        description="Arm a fault in the node agent through its control API. A message fault acts on the "
        "next message(s) of a connection; a record fault writes a record of its own at the connection's "
        "next free moment (inside a snapshot too, unless --after-snapshot); a connection fault acts on a "
        "connection's hello or snapshot; a delivery fault on where Adds and Dels go. The target is the "
        "newest connection unless --connection or --next-connection. Each fault is logged, counted "
        "(zds_faults_total) and shown by zds watch; one that makes no sense now is refused in one line.",
        epilog="kinds:\n" + kinds,
        formatter_class=cliflags.RawDescriptionHelpFormatter,
    )
    fault.add_argument(
        "kind", choices=[k.label for k in FaultKind], metavar="KIND", help="the fault (see below)"
    )
    where = fault.add_mutually_exclusive_group()
    where.add_argument(
        "--connection",
        default="",
        metavar="ID",
        help="a connection id, see zds connections (default: the newest)",
    )
    where.add_argument(
        "--next-connection", action="store_true", help="arm it for the next connection the node agent accepts"
    )
    fault.add_argument(
        "--skip-connections",
        type=cliflags.non_negative_int,
        default=0,
        metavar="N",
        help="with --next-connection: let N connections be accepted first (default: %(default)s)",
    )
    fault.add_argument(
        "--count",
        type=cliflags.positive_int,
        default=1,
        metavar="N",
        help="messages, records or deliveries it applies to (default: %(default)s)",
    )
    fault.add_argument(
        "--delay", type=_delay, default=0.0, metavar="SECONDS", help="delay: how long (default: 0)"
    )
    fault.add_argument(
        "--uid",
        default="",
        help="omit-from-snapshot: the pod to leave out; add-with-two-fds, add-without-workload-info and "
        "duplicate-add: the pod whose netns they use (default: the last one enrolled); the others take none",
    )
    fault.add_argument(
        "--after-snapshot",
        action="store_true",
        help="record faults: wait until the connection's snapshot is complete; message faults: act on live "
        "updates only, not on the snapshot's messages",
    )
    fault.add_argument(
        "--wait", action="store_true", help="answer once the fault took effect, with what it did"
    )
    fault.add_argument("--json", action="store_true", help="print the fault as JSON")
    control_flags(fault, timeout=None)
    fault.add_argument(
        "--timeout",
        type=cliflags.seconds,
        default=90.0,
        metavar="SECONDS",
        help="per call (default: %(default)s)",
    )
    fault.set_defaults(func=inject)

    faults = sub.add_parser(
        "faults",
        help="the node agent's armed faults: list them, clear them",
        description="List the faults armed in the node agent (zds fault, --faults), or clear them: a "
        "cleared fault is dropped, never to take effect (a zds fault --wait waiting for it answers).",
    )
    what = faults.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = what.add_parser(
        "list",
        help="the armed faults, in the order they were armed",
        description="List the faults armed in the node agent now (ListFaults): id, kind, target, count, uid, "
        "what it did last.",
    )
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    control_flags(listing)
    listing.set_defaults(func=list_faults)
    clearing = what.add_parser(
        "clear",
        help="clear one armed fault, or every one",
        description="Clear the armed fault ID, or every armed fault (ClearFaults): each is dropped, never to "
        "take effect; a delay it was waiting out ends at once.",
    )
    clearing.add_argument(
        "id", nargs="?", default="", metavar="ID", help="the fault (f1, ...); none: every one"
    )
    control_flags(clearing)
    clearing.set_defaults(func=clear_faults)


def _kind(kind: int) -> str:
    """A fault kind as ``zds faults`` names it; its number when this client does not know it."""
    from zds.server.controlwire import FAULT_KIND_FROM_PROTO

    known = FAULT_KIND_FROM_PROTO.get(kind)
    return known.label if known is not None else str(kind)


def list_faults(args: argparse.Namespace) -> int:
    from zds.gen import nodeagent_pb2
    from zds.server.controlclient import ControlError, call
    from zds.server.podctl import message_dict, table

    try:
        armed = call(args, "ListFaults", nodeagent_pb2.ListFaultsRequest()).faults
    except ControlError as exc:
        print(f"zds faults list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([message_dict(f) for f in armed], indent=2))
        return 0
    rows = [[f.id, _kind(f.kind), f.target, str(f.count), f.uid or "-", f.detail or "-"] for f in armed]
    print(table(["ID", "KIND", "TARGET", "COUNT", "UID", "DETAIL"], rows))
    return 0


def clear_faults(args: argparse.Namespace) -> int:
    from zds.gen import nodeagent_pb2
    from zds.server.controlclient import ControlError, call

    try:
        cleared = call(args, "ClearFaults", nodeagent_pb2.ClearFaultsRequest(id=args.id)).cleared
    except ControlError as exc:
        print(f"zds faults clear: {exc}", file=sys.stderr)
        return 1
    for fault in cleared:
        print(printable(f"fault {fault.id} cleared ({_kind(fault.kind)} on {fault.target})"))
    if not cleared:
        print("no fault was armed")
    return 0


def inject(args: argparse.Namespace) -> int:
    from zds.gen import nodeagent_pb2
    from zds.server.controlclient import ControlError, call
    from zds.server.controlwire import FAULT_KIND_TO_PROTO
    from zds.server.podctl import message_dict

    request = nodeagent_pb2.InjectFaultRequest(
        kind=FAULT_KIND_TO_PROTO[FaultKind.named(args.kind)],  # type: ignore[arg-type]
        connection_id=args.connection,
        next_connection=args.next_connection,
        skip_connections=args.skip_connections,
        count=args.count,
        uid=args.uid,
        after_snapshot=args.after_snapshot,
        wait=args.wait,
    )
    if args.delay:
        request.delay.FromNanoseconds(int(args.delay * 1e9))
    try:
        fault = call(args, "InjectFault", request).fault
    except ControlError as exc:
        print(f"zds fault: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(message_dict(fault), indent=2))
    else:
        detail = f": {fault.detail}" if fault.state != "armed" and fault.detail else ""
        print(f"fault {fault.id} {fault.state} ({args.kind} on {fault.target}){detail}")
    return 1 if fault.state == "dropped" else 0
