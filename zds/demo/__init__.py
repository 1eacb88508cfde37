"""``zds demo``: the whole story on one machine, narrated.

Pods (network namespaces on a bridge), the node agent and the ztunnel side as
real processes, enrollment over the control API, the handshake as the node
agent logs it, the listeners inside each pod, the redirection rules, one
connection from a pod to another through both ztunnel listeners with the
counters, then removal. Everything it makes is removed at the end, also on
Ctrl-C or an error.

- ``story``: the steps, in order, and what owns what;
- ``supervision``: the two child processes and their logs;
- ``probes``: what the demo looks at (listening ports, rules, config_dump);
- ``narration``: numbered, readable output.

This module only registers the command: ``zds`` builds its parser without
importing the demo.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole story on this machine: pods, both ends, enrollment, traffic, cleanup",
        description="Make three pod namespaces on a bridge, start zds server and zds ztunnel, enroll the "
        "pods, show the handshake, the in-pod listeners and rules, send a connection from one pod to "
        "another through both ztunnel listeners, then remove everything (also on Ctrl-C).",
    )
    demo.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the two processes' logs and the node agent's state directory (path printed)",
    )
    demo.add_argument("--no-color", action="store_true", help="plain output")
    demo.add_argument(
        "--subnet4", default="10.177.77.0/24", help="the pods' IPv4 subnet (default: %(default)s)"
    )
    demo.add_argument(
        "--subnet6", default="fd00:177:77::/64", help="the pods' IPv6 subnet (default: %(default)s)"
    )
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from zds.demo.story import run_demo

    return run_demo(args)
