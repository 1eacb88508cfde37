"""``zds pod add|remove|list``, ``zds connections``, ``zds watch``: the commands that talk
to the node agent through its control API (the flags; ``podctl`` and ``inspectctl`` run them).

Building these parsers imports nothing heavy: gRPC is loaded only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from zds import cliflags, defaults
from zds.server.eventkinds import WATCHABLE

if TYPE_CHECKING:
    from zds.netns import NetnsRef


def register(sub: argparse._SubParsersAction[Any]) -> None:
    pod = sub.add_parser(
        "pod",
        help="enroll, remove and list pods (client of the control API)",
        description="Enroll, remove and list the node agent's pods through its control API.",
    )
    pod_sub = pod.add_subparsers(dest="pod_command", metavar="ACTION", required=True)

    add = pod_sub.add_parser(
        "add",
        help="enroll a pod; prints the ack; exit 0 only on a clean ack",
        description="Enroll a pod through the node agent. Exit 0 on a clean ack from ztunnel; "
        "otherwise print the error and exit 1 (a pod that reached the cache stays there and "
        "goes out in the next ztunnel's snapshot).",
    )
    add.add_argument("--uid", type=_uid, help="the pod's uid (required unless --from-file)")
    add.add_argument("--name", default="", help="the pod's name (default: the uid)")
    add.add_argument(
        "--namespace", default="", help=f"the pod's namespace (default: {defaults.POD_NAMESPACE})"
    )
    add.add_argument(
        "--service-account",
        default="",
        help=f"the pod's service account (default: {defaults.SERVICE_ACCOUNT})",
    )
    where = add.add_mutually_exclusive_group()
    where.add_argument(
        "--netns",
        type=_netns,
        metavar="PATH",
        help="the pod's netns file, e.g. /var/run/netns/pod-a (or a bare name; or pid:N, as in a pods file)",
    )
    where.add_argument(
        "--netns-pid", type=cliflags.positive_int, metavar="PID", help="a process in the pod's netns"
    )
    add.add_argument(
        "--ip",
        dest="ips",
        action="append",
        default=[],
        type=cliflags.ip_address,
        metavar="ADDR",
        help="one of the pod's addresses, recorded (pod list --json; repeat for more)",
    )
    add.add_argument(
        "--from-file",
        metavar="FILE",
        help="enroll every pod of a pods file (JSON lines, a JSON array or YAML) over one connection",
    )
    add.add_argument("--json", action="store_true", help="print the answers as JSON")
    control_flags(add)
    # Its start-up ends when its first request goes; it prints, and configures logging only
    # when it loads gRPC (not over the bulk lane).
    add.set_defaults(func=_pod_add, starts_itself=True, logs_later=True)

    remove = pod_sub.add_parser(
        "remove",
        help="remove a pod (DelWorkload to every ztunnel)",
        description="Remove a pod: the node agent takes its rules out, forgets it, closes its netns "
        "and sends DelWorkload to every connected ztunnel. Done whatever ztunnel answers (each "
        "answer is printed); exit 1 only when the node agent does not know the pod or cannot be reached.",
    )
    remove.add_argument("--uid", type=_uid, required=True, help="the pod's uid")
    control_flags(remove)
    remove.set_defaults(func=_pod_remove)

    lst = pod_sub.add_parser(
        "list",
        help="list enrolled pods",
        description="List the node agent's pods: uid, name, namespace, service account, delivery "
        "state (pending, acked, failed), netns identity and path, rules, how it came back at the "
        "last start (recovery), where it came from (source), last error.",
    )
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    control_flags(lst)
    lst.set_defaults(func=_pod_list)

    conns = sub.add_parser(
        "connections",
        help="list the node agent's ztunnel connections",
        description="List the ztunnel connections of the node agent: peer credentials, hello version, "
        "snapshot state, messages sent/acked/nacked; the newest gets new pods.",
    )
    conns.add_argument("--json", action="store_true", help="JSON instead of a table")
    control_flags(conns)
    conns.set_defaults(func=_connections)

    watch = sub.add_parser(
        "watch",
        help="print the node agent's events as they happen",
        description="Print what the node agent does, one line per event: first the current state "
        "(every pod, every ztunnel connection), then live events until Ctrl-C. Exit 1 when the node "
        "agent goes away or ends the watch.",
    )
    watch.add_argument("--json", action="store_true", help="one JSON object per line (the API's Event)")
    watch.add_argument(
        "--kind",
        action="append",
        type=_event_kinds,
        metavar="KIND[,KIND...]",
        help="only these kinds (repeatable): " + ", ".join(WATCHABLE),
    )
    watch.add_argument("--uid", default="", help="only events about this pod uid")
    control_flags(watch, timeout="for the node agent's first event (the watch itself has none)")
    watch.set_defaults(func=_watch)


def _uid(text: str) -> str:
    """``--uid``: a pod's uid, which is never empty (nor only spaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give the pod's uid (an empty one names no pod)")
    return text


def _netns(text: str) -> NetnsRef:
    """``zds pod add --netns``: a path, a bare name or ``pid:N``, as a pods file writes it."""
    from zds.netns import NetnsRef, NetnsRefError  # (light: no namespace code)

    try:
        return NetnsRef.parse(text)
    except NetnsRefError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _event_kinds(text: str) -> list[str]:
    """``zds watch --kind``: EventKind values, also with dashes, upper case or EVENT_KIND_."""
    kinds = []
    for part in text.split(","):
        name = part.strip().lower().removeprefix("event_kind_").replace("-", "_")
        if name not in WATCHABLE:
            raise argparse.ArgumentTypeError(
                f"unknown event kind {part.strip()!r}; choose from {', '.join(WATCHABLE)}"
            )
        kinds.append(name)
    return kinds


def control_flags(parser: argparse.ArgumentParser, *, timeout: str | None = "per call") -> None:
    """The flags that say where the control API is; ``timeout``: what --timeout bounds (None:
    no such flag)."""
    parser.add_argument(
        "--control-socket",
        type=cliflags.unix_socket,
        default=defaults.CONTROL_SOCKET,
        metavar="PATH",
        help="node agent control socket (default: %(default)s)",
    )
    parser.add_argument(
        "--grpc-address",
        metavar="HOST:PORT",
        help="reach the control API over TCP instead (zds server --grpc-listen), with TLS (default: off)",
    )
    parser.add_argument("--tls-ca", metavar="FILE", help="CA that signed the node agent's certificate (PEM)")
    parser.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    parser.add_argument(
        "--grpc-insecure",
        action="store_true",
        help="plaintext on --grpc-address (zds server --grpc-insecure)",
    )
    if timeout is not None:
        parser.add_argument(
            "--timeout",
            type=cliflags.seconds,
            default=30.0,
            metavar="SECONDS",
            help=f"{timeout} (default: %(default)s)",
        )


def _pod_add(args: argparse.Namespace) -> int:
    from zds.server import podadd

    return podadd.add(args)


def _pod_remove(args: argparse.Namespace) -> int:
    from zds.server import podctl

    return podctl.remove(args)


def _pod_list(args: argparse.Namespace) -> int:
    from zds.server import podctl

    return podctl.list_pods(args)


def _connections(args: argparse.Namespace) -> int:
    from zds.server import inspectctl

    return inspectctl.connections(args)


def _watch(args: argparse.Namespace) -> int:
    from zds.server import inspectctl

    return inspectctl.watch(args)
