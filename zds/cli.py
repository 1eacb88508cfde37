"""The ``zds`` command: one entry point, subcommands registered by each part.

Command and flag names are a contract (DESIGN.md §8): scripts, compose files
and outside tests call them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence

from zds import __version__, cliflags, output, runtime
from zds.errors import not_utf8

#: The parts that register commands, in the order ``zds --help`` lists them, with the
#: commands each registers (a run builds only its command's part: every command's flags
#: cost a few ms of every start, ``zds ztunnel``'s and ``zds pod add``'s too).
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zds.server.cli", ("server",)),
    ("zds.server.controlcli", ("pod", "connections", "watch")),
    ("zds.server.faultcli", ("fault", "faults")),
    ("zds.client.cli", ("ztunnel",)),
    ("zds.netns.cli", ("netns",)),
    ("zds.cni.cli", ("cni",)),
    ("zds.check.cli", ("check",)),
    ("zds.demo", ("demo",)),
)
#: command -> the part that registers it.
PART_OF = {command: module for module, commands in PARTS for command in commands}
_TOP_FLAGS_WITH_VALUE = ("--log-level", "--log-format")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """``zds``'s parser: every command's, or (``command`` one of them) only the part that
    registers it; the top-level parser and that command's parsers are the same either way."""
    parser = cliflags.Parser(
        prog="zds",
        description="Both ends of Istio ambient mode's ZDS handshake: node agent and ztunnel side.",
    )
    parser.add_argument("--version", action="version", version=f"zds {__version__}")
    cliflags.add_log_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command is not None and command not in PART_OF:
        raise ValueError(f"no zds command {command!r}")
    for module, _ in PARTS:
        if command is None or PART_OF[command] == module:
            importlib.import_module(module).register(sub)
    for leaf in cliflags.leaf_parsers(parser):
        if leaf is not parser:
            cliflags.add_log_flags(leaf)
            leaf.set_defaults(command_parser=leaf)  # whose error an unknown argument is
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs when that is plain to see (the first word after the
    top-level log flags), else None: help, --version, a misspelt flag or command get the
    whole parser (and its message)."""
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            return arg if arg in PART_OF else None
        if arg in _TOP_FLAGS_WITH_VALUE:
            next(args, None)
        elif arg.partition("=")[0] not in _TOP_FLAGS_WITH_VALUE:
            return None
    return None


#: The commands whose arguments go into protobuf fields and gRPC targets (UTF-8 only; a
#: path elsewhere may be any bytes Linux takes).
UTF8_ONLY = frozenset({"pod", "watch", "connections", "fault", "faults", "netns"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: this program's arguments). Run as the program, it
    holds garbage collection for the start-up (``runtime.starting``); a command whose start-up
    goes on inside it (``starts_itself``) says when it is over, any other once it is parsed.
    Logging is configured before the command runs, or (``logs_later``: a command that logs
    nothing itself) when something that logs is loaded (``runtime.logs_needed``)."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    try:
        if as_program:  # (in the try: a Ctrl-C here was a traceback)
            runtime.ensure_std_fds()
            runtime.no_grpc_at_fork(quiet=command_of(argv) != "server")
            runtime.follow_parent()
            output.watch_stdout()
            runtime.starting()  # the process is this command's (a call from Python leaves it alone)
        try:
            parser = build_parser(command_of(argv))
            if command_of(argv) in UTF8_ONLY and (bad := not_utf8(argv)) is not None:
                # (protobuf fields, gRPC targets and log lines take UTF-8 only: it was a
                # UnicodeEncodeError traceback from wherever the argument went first)
                getattr(parser.parse_known_args(argv)[0], "command_parser", parser).error(
                    f"argument {bad} is not UTF-8 text"
                )
            args, unknown = parser.parse_known_args(argv)
            if unknown:  # the command's error (``zds pod add: ...``), not the top parser's
                getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
            runtime.configure_logs(args.log_level, args.log_format, later=getattr(args, "logs_later", False))
            if not getattr(args, "starts_itself", False):
                runtime.started()
            code: int = args.func(args)
        except SystemExit:  # (--help, --version: their output flushed here, as a command's)
            sys.stdout.flush()
            raise
        except BaseException:  # (what ended the command is what is said, not a flush after it)
            with contextlib.suppress(OSError):
                sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, so a reader that went away is found here
    except KeyboardInterrupt as exc:
        return runtime.interrupt_exit_code(exc)
    except RuntimeError as exc:
        # Python 3.11 wraps what is raised in a __set_name__ (a dataclass field's, as a module
        # is loaded) in a RuntimeError: an interrupt there was a traceback and exit 1.
        if not isinstance(exc.__cause__, KeyboardInterrupt):
            raise
        return runtime.interrupt_exit_code(exc.__cause__)
    except BrokenPipeError:
        if not output.stdout_reader_gone():
            raise
        # The reader of the output went away (``zds netns list | head -1``): not an error.
        output.discard_stdout()
        return 0
    except OSError as exc:
        # The output cannot be written (``> /dev/full``: ENOSPC, EIO): one line, not a
        # traceback; what the command did before, it did (a pod enrolled stays enrolled).
        if not output.output_failed():
            raise
        output.discard_stdout()
        with contextlib.suppress(OSError):  # (stderr as full as stdout: the exit code says it)
            print(f"zds: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        runtime.started()  # (a command that ended early, before it said so)
    return code


if __name__ == "__main__":
    sys.exit(main())
