"""The ``zds`` command: one entry point, subcommands registered by each part.

Command and flag names are a contract (DESIGN.md §8): scripts, compose files
and outside tests call them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zds import __version__, cliflags, logs


def build_parser() -> argparse.ArgumentParser:
    from zds import demo
    from zds.check import cli as check_cli
    from zds.client import cli as client_cli
    from zds.cni import cli as cni_cli
    from zds.netns import cli as netns_cli
    from zds.server import cli as server_cli
    from zds.server import controlcli as control_cli
    from zds.server import faultcli as fault_cli

    parser = argparse.ArgumentParser(
        prog="zds",
        description="Both ends of Istio ambient mode's ZDS handshake: node agent and ztunnel side.",
    )
    parser.add_argument("--version", action="version", version=f"zds {__version__}")
    cliflags.add_log_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    server_cli.register(sub)
    control_cli.register(sub)
    fault_cli.register(sub)
    client_cli.register(sub)
    netns_cli.register(sub)
    cni_cli.register(sub)
    check_cli.register(sub)
    demo.register(sub)
    for leaf in cliflags.leaf_parsers(parser):
        if leaf is not parser:
            cliflags.add_log_flags(leaf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
