"""CLI of the node agent side: ``zds server``, ``zds pod add|remove|list``,
``zds connections`` and ``zds watch``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from zds import defaults, runtime
from zds.server.eventkinds import WATCHABLE


def register(sub: argparse._SubParsersAction[Any]) -> None:
    server = sub.add_parser(
        "server",
        help="run the node agent (the ZDS server ztunnel connects to)",
        description="Run the node agent: listen on the ZDS socket, deliver pods to ztunnel, "
        "serve the control API (gRPC), the CNI plugin endpoint and health checks.",
    )
    server.add_argument("--zds-socket", default=defaults.ZDS_SOCKET, help="ZDS socket (%(default)s)")
    server.add_argument(
        "--control-socket", default=defaults.CONTROL_SOCKET, help="gRPC control socket (%(default)s)"
    )
    server.add_argument("--grpc-listen", metavar="HOST:PORT", help="also serve the control API on TCP (off)")
    server.add_argument(
        "--cni-socket",
        default=defaults.CNI_SOCKET,
        help="CNI plugin event socket, POST /cmdadd (%(default)s; 'off' disables)",
    )
    server.add_argument(
        "--http-listen",
        default=defaults.NODE_AGENT_HTTP,
        help="/healthz, /readyz and /metrics (%(default)s; 'off' disables)",
    )
    server.add_argument(
        "--max-connections",
        type=_positive_int,
        default=defaults.MAX_CONNECTIONS,
        help="concurrent ztunnel connections (%(default)s)",
    )
    server.add_argument(
        "--ack-timeout",
        type=_positive_float,
        default=defaults.ACK_TIMEOUT,
        metavar="SECONDS",
        help="ack deadline; a connection that misses it is closed (%(default)s)",
    )
    server.add_argument(
        "--hello-timeout",
        type=_positive_float,
        default=defaults.HELLO_TIMEOUT,
        metavar="SECONDS",
        help="how long a new connection may take to say hello (%(default)s)",
    )
    server.add_argument(
        "--keepalive-interval",
        type=_positive_float,
        default=defaults.KEEPALIVE_INTERVAL,
        metavar="SECONDS",
        help="probe an idle connection this often (%(default)s)",
    )
    server.add_argument("--pods", metavar="FILE", help="pods to enroll at start-up (JSON lines or YAML)")
    server.add_argument("--no-redirect", action="store_true", help="do not install in-pod redirection rules")
    server.add_argument(
        "--no-dns-capture",
        action="store_true",
        help="install the rules without DNS capture (UDP/TCP 53 -> 15053 is left out)",
    )
    server.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    server.add_argument(
        "--watch-queue",
        type=_positive_int,
        default=defaults.WATCH_QUEUE,
        metavar="EVENTS",
        help="events a Watch stream may have waiting before it is ended with RESOURCE_EXHAUSTED (%(default)s)",
    )
    _log_flags(server)
    server.set_defaults(func=_run_server)

    pod = sub.add_parser("pod", help="enroll, remove and list pods (client of the control API)")
    pod_sub = pod.add_subparsers(dest="pod_command", metavar="ACTION", required=True)

    add = pod_sub.add_parser(
        "add",
        help="enroll a pod; prints the ack; exit 0 only on a clean ack",
        description="Enroll a pod through the node agent. Exit 0 on a clean ack from ztunnel; "
        "otherwise print the error and exit 1 (a pod that reached the cache stays there and "
        "goes out in the next ztunnel's snapshot).",
    )
    add.add_argument("--uid")
    add.add_argument("--name", default="")
    add.add_argument("--namespace", default="default")
    add.add_argument("--service-account", default="default")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--netns", metavar="PATH", help="netns file, e.g. /var/run/netns/pod-a")
    where.add_argument("--netns-pid", type=_positive_int, metavar="PID", help="a process in the pod's netns")
    add.add_argument(
        "--from-file", metavar="FILE", help="enroll every pod of a pods file over one connection"
    )
    add.add_argument("--json", action="store_true", help="print the answers as JSON")
    _control_flags(add)
    add.set_defaults(func=_pod_add)

    remove = pod_sub.add_parser("remove", help="remove a pod (DelWorkload to every ztunnel)")
    remove.add_argument("--uid", required=True)
    _control_flags(remove)
    remove.set_defaults(func=_pod_remove)

    lst = pod_sub.add_parser("list", help="list enrolled pods")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    _control_flags(lst)
    lst.set_defaults(func=_pod_list)

    conns = sub.add_parser(
        "connections",
        help="list the node agent's ztunnel connections",
        description="List the ztunnel connections of the node agent: peer credentials, hello version, "
        "snapshot state, messages sent/acked/nacked; the newest gets new pods.",
    )
    conns.add_argument("--json", action="store_true", help="JSON instead of a table")
    _control_flags(conns)
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
        help="only these kinds (repeatable): " + ", ".join(WATCHABLE_KINDS),
    )
    watch.add_argument("--uid", default="", help="only events about this pod uid")
    watch.add_argument(
        "--control-socket", default=defaults.CONTROL_SOCKET, help="node agent control socket (%(default)s)"
    )
    watch.set_defaults(func=_watch)


#: What ``zds watch --kind`` accepts (EventKind values, also with dashes or upper case).
WATCHABLE_KINDS = list(WATCHABLE)


def _event_kinds(text: str) -> list[str]:
    kinds = []
    for part in text.split(","):
        name = part.strip().lower().removeprefix("event_kind_").replace("-", "_")
        if name not in WATCHABLE_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown event kind {part.strip()!r}; choose from {', '.join(WATCHABLE_KINDS)}"
            )
        kinds.append(name)
    return kinds


def _log_flags(parser: argparse.ArgumentParser) -> None:
    """--log-level/--log-format after the subcommand too (they override the global ones)."""
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"], help="(info)"
    )
    parser.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"], help="(text)")


def _control_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket", default=defaults.CONTROL_SOCKET, help="node agent control socket (%(default)s)"
    )
    parser.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="SECONDS", help="per call (%(default)s)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _off(value: str | None) -> str | None:
    return None if value in (None, "", "off") else value


def _run_server(args: argparse.Namespace) -> int:
    error = runtime.privilege_error("server")
    if error:
        print(error, file=sys.stderr)
        return 1
    from zds.server.agent import AgentConfig
    from zds.server.main import ServerOptions, run_server
    from zds.server.redirect import RedirectConfig

    options = ServerOptions(
        zds_socket=args.zds_socket,
        control_socket=args.control_socket,
        grpc_listen=args.grpc_listen,
        cni_socket=_off(args.cni_socket),
        http_listen=_off(args.http_listen),
        pods_file=args.pods,
        redirect=not args.no_redirect,
        redirect_config=RedirectConfig(dns_capture=not args.no_dns_capture),
        agent=AgentConfig(
            max_connections=args.max_connections,
            ack_timeout=args.ack_timeout,
            hello_timeout=args.hello_timeout,
            keepalive_interval=args.keepalive_interval,
            watch_queue=args.watch_queue,
        ),
    )
    return runtime.run(run_server(options), use_uvloop=not args.no_uvloop)


def _pod_add(args: argparse.Namespace) -> int:
    from zds.server import podctl

    return podctl.add(args)


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


def dump(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))
