"""``zds check node-agent|ztunnel``: the flags (light: nothing heavy is imported until a check runs).

Both print a human summary, write ``--json FILE`` and ``--junit FILE`` when asked,
and exit 0 only when every check that ran held (1 otherwise, 2 when the check
cannot start).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from zds import cliflags, defaults


def register(sub: argparse._SubParsersAction[Any]) -> None:
    check = sub.add_parser(
        "check",
        help="check a node agent or a ztunnel against the protocol, strictly",
        description="Test another implementation of either end of ZDS: zds plays the strict other end, "
        "reports every departure from what Istio's node agent and ztunnel do, with the bytes and the "
        "upstream source line behind each rule.",
    )
    roles = check.add_subparsers(dest="check_role", metavar="ROLE", required=True)

    agent = roles.add_parser(
        "node-agent",
        help="zds plays a strict ztunnel against a node agent",
        description="Connect to a node agent's ZDS socket as a strict ztunnel, make pods come and go "
        "(through zds's control API, or command templates), and check every record and scenario. "
        "Templates are run with /bin/sh -c once per pod, placeholders {uid} {name} {namespace} "
        "{service_account} {netns} shell-quoted; their exit status is ignored (the outcome is judged on "
        "the wire). Needs root (it makes the pods' network namespaces, and deletes them).",
    )
    agent.add_argument(
        "--zds-socket",
        type=cliflags.unix_socket,
        default=defaults.ZDS_SOCKET,
        metavar="PATH",
        help="the node agent's ZDS socket (default: %(default)s)",
    )
    agent.add_argument(
        "--control-socket",
        type=cliflags.unix_socket,
        default=defaults.CONTROL_SOCKET,
        metavar="PATH",
        help="zds's control API, used to add and remove pods unless --add-cmd/--remove-cmd are given "
        "(default: %(default)s)",
    )
    agent.add_argument(
        "--add-cmd",
        metavar="TEMPLATE",
        help="command that adds a pod to the node agent under test, returning once the agent has it, "
        "or see --settle (default: none: the control API)",
    )
    agent.add_argument(
        "--settle",
        type=cliflags.seconds_or_none,
        default=0.0,
        metavar="SECONDS",
        help="after the snapshot scenario's add commands return, wait this long before connecting: for "
        "a node agent that takes a pod some time after its add command returns (an informer, a queue) "
        "(default: 0, none)",
    )
    agent.add_argument(
        "--remove-cmd",
        metavar="TEMPLATE",
        help="command that removes a pod, same placeholders (default: none: the control API)",
    )
    agent.add_argument(
        "--agent-pid",
        type=cliflags.positive_int,
        metavar="PID",
        help="the node agent's process, for fd-hygiene (default: SO_PEERCRED of the ZDS socket)",
    )
    agent.add_argument(
        "--ack-deadline",
        type=cliflags.seconds,
        default=defaults.ACK_TIMEOUT,
        metavar="SECONDS",
        help="the node agent's ack deadline, Istio's readWriteDeadline (default: %(default)s)",
    )
    agent.add_argument(
        "--cycles",
        type=cliflags.positive_int,
        default=20,
        metavar="N",
        help="connect/add/remove/disconnect cycles for fd-hygiene (default: %(default)s)",
    )
    _timing_flags(agent)
    agent.add_argument(
        "--hello-wait",
        type=cliflags.seconds,
        default=1.0,
        metavar="SECONDS",
        help="wait this long before the hello; anything arriving meanwhile is a finding (default: %(default)s)",
    )
    _report_flags(agent)
    agent.set_defaults(func=_node_agent)

    zt = roles.add_parser(
        "ztunnel",
        help="zds plays a strict node agent against a ztunnel",
        description="Listen on a ZDS socket as a strict node agent and send a ztunnel DESIGN.md section 1's table of "
        "edge and bad messages: nack prefixes, which errors drop the connection and which stop it for "
        "good, pending retry, reconcile across reconnects, re-adds, listeners in the pod and none on the "
        "host, readiness. With --cmd zds starts the ztunnel (and restarts it after a check that stops it "
        "for good); templates may use {socket}, {admin_port}, {readiness_port}, {metrics_port} (free ports "
        "zds picks). Needs root (it makes the pods' network namespaces, and deletes them).",
    )
    where = zt.add_mutually_exclusive_group(required=False)
    where.add_argument(
        "--cmd",
        metavar="TEMPLATE",
        help="the ztunnel to start, e.g. 'my-ztunnel --uds {socket}' (default: none)",
    )
    where.add_argument(
        "--zds-socket",
        type=cliflags.unix_socket,
        metavar="PATH",
        help="listen here and wait for a ztunnel that connects by itself, restarted by someone else (default: none)",
    )
    zt.add_argument(
        "--ready-url",
        metavar="URL",
        help="ztunnel's readiness probe, e.g. http://127.0.0.1:{readiness_port}/healthz/ready (default: none)",
    )
    zt.add_argument(
        "--config-dump-url",
        metavar="URL",
        help="ztunnel's admin config_dump, e.g. http://127.0.0.1:{admin_port}/config_dump, to see its "
        "workloads without listeners (default: none)",
    )
    zt.add_argument(
        "--protocol-only",
        action="store_true",
        help="the ztunnel opens no listeners (zds ztunnel --no-listeners): the listener checks are skipped",
    )
    zt.add_argument(
        "--retry-interval",
        type=cliflags.seconds,
        default=defaults.PENDING_RETRY_INTERVAL,
        metavar="SECONDS",
        help="the ztunnel's pending retry interval, ztunnel's RETRY_DURATION (default: %(default)s)",
    )
    zt.add_argument(
        "--connect-timeout",
        type=cliflags.seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the ztunnel to connect, at first and after a restart (default: %(default)s)",
    )
    _timing_flags(zt)
    _report_flags(zt)
    zt.set_defaults(func=_ztunnel)


def _timing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=cliflags.seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for each message the other end should send (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=cliflags.seconds,
        default=2.0,
        metavar="SECONDS",
        help="slack the other end gets past a deadline, and how long to watch for what must not come "
        "(default: %(default)s)",
    )


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML (default: none)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (default: none)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME[,NAME...]",
        help="run only these checks, see --list (repeatable) (default: all)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME[,NAME...]",
        help="leave these checks out (repeatable) (default: none)",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the checks with their descriptions, and exit"
    )


def select(names: Sequence[str], only: list[str], skip: list[str]) -> list[str]:
    """The checks to run, in catalogue order; ValueError names an unknown one, a flag that
    names none (``--only ,`` ran them all), or a choice that leaves none to run (it passed)."""
    for flag, args in (("--only", only), ("--skip", skip)):
        for arg in args:
            if not arg.replace(",", "").strip():
                raise ValueError(f"{flag} {arg!r} names no check; see --list")
    wanted = [n.strip() for arg in only for n in arg.split(",") if n.strip()]
    unwanted = [n.strip() for arg in skip for n in arg.split(",") if n.strip()]
    for name in wanted + unwanted:
        if name not in names:
            raise ValueError(f"unknown check {name!r}; see --list")
    chosen = [n for n in names if (not wanted or n in wanted) and n not in unwanted]
    if not chosen:
        raise ValueError("--only/--skip leave no check to run; see --list")
    return chosen


def _node_agent(args: argparse.Namespace) -> int:
    from zds.check.agentchecks import CHECKS
    from zds.check.run import list_checks, run_checks

    if args.list:
        return list_checks(CHECKS)
    if (args.add_cmd is None) != (args.remove_cmd is None):
        return _usage("check node-agent", "--add-cmd and --remove-cmd go together")
    try:
        selected = select([c.name for c in CHECKS], args.only, args.skip)
    except ValueError as exc:
        return _usage("check node-agent", str(exc))
    return run_checks("node-agent", args, selected)


def _ztunnel(args: argparse.Namespace) -> int:
    from zds.check.run import list_checks, run_checks
    from zds.check.ztchecks import CHECKS

    if args.list:
        return list_checks(CHECKS)
    if args.cmd is None and args.zds_socket is None:
        return _usage("check ztunnel", "give --cmd TEMPLATE (zds starts the ztunnel) or --zds-socket PATH")
    try:
        selected = select([c.name for c in CHECKS], args.only, args.skip)
    except ValueError as exc:
        return _usage("check ztunnel", str(exc))
    return run_checks("ztunnel", args, selected)


def _usage(command: str, message: str) -> int:
    print(f"zds {command}: {message}", file=sys.stderr)
    return 2
