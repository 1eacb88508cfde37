"""Flag types and help conventions every ``zds`` command shares.

Help texts end with ``(default: X)`` when a flag has a default; a flag that
can be turned off says so (``'off' disables``). Errors from a flag's type are
one line, naming the value.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from typing import Any, NoReturn

from zds import defaults

LOG_LEVELS = ("debug", "info", "warning", "error")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, sized to the terminal when it formats help or an error, not before.

    argparse makes a formatter for every flag it adds (to check the flag's metavar) and
    each asked the terminal's size, importing ``shutil`` (with bz2 and lzma) for it: ~1.5 ms
    of every command's start (CPU time, A/B here), none of it needed to parse a command line.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, 80 if width is None else width)
        self._sized = width is not None
        self._asked_position = max_help_position

    def format_help(self) -> str:
        if not self._sized:  # argparse's own sizing, as HelpFormatter.__init__ does it
            import shutil

            self._sized = True
            self._width = shutil.get_terminal_size().columns - 2
            self._max_help_position = min(
                self._asked_position, max(self._width - 20, self._indent_increment * 2)
            )
        return super().format_help()


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``argparse.RawDescriptionHelpFormatter`` (descriptions and epilogs as written), sized late."""


class Parser(argparse.ArgumentParser):
    """``zds``'s parsers: ``HelpFormatter`` unless told otherwise, also for every subcommand's
    parser (``add_subparsers`` makes them of the parent's class)."""

    def __init__(
        self, *, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs: Any
    ) -> None:
        super().__init__(formatter_class=formatter_class, **kwargs)

    def error(self, message: str) -> NoReturn:
        """A usage error in one line, argparse's own (``zds pod add: error: argument --ip: ...``),
        exit 2; argparse printed the command's whole usage above it (``--help`` shows that)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_subparsers(self, **kwargs: Any) -> Any:
        """argparse's; its subcommands' ``prog`` is this parser's when no positional argument
        comes before them (argparse would format this parser's usage to find that out, and
        size a formatter to the terminal for it)."""
        if all(action.option_strings for action in self._actions):
            kwargs.setdefault("prog", self.prog)
        return super().add_subparsers(**kwargs)


LOG_FORMATS = ("text", "json")


#: The largest count, size or pid a flag takes (the control API's fields are 32-bit).
INT_MAX = defaults.INT32_MAX


def _whole_number(text: str, lowest: int, refusal: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not lowest <= value <= INT_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not {refusal}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, f"a positive integer (at most {INT_MAX})")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, f"a whole number from 0 to {INT_MAX}")


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address, as given, without a zone (as the node agent's ``is_address``)."""
    import ipaddress  # (here: only a command given an address needs it)

    try:
        if "%" in text:
            raise ValueError(text)
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None
    return text


#: The longest ``--busy-poll``: polling longer only burns CPU (an answer is microseconds away).
BUSY_POLL_MAX_USEC = 10_000


#: The longest time a flag in seconds takes: a day.
SECONDS_MAX = 86400.0


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:  # (also NaN: it was a timeout of 0, or a traceback)
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    if value > SECONDS_MAX:  # (1e308 was an OverflowError traceback, 1e10 a deadline past at once)
        raise argparse.ArgumentTypeError(f"{text} seconds is over a day ({SECONDS_MAX:g})")
    return value


def _zero_or_seconds(text: str, zero: str) -> float:
    """0 (``zero`` says what it means) or a number of seconds as ``seconds`` takes it."""
    try:
        value = float(text)
    except ValueError:
        return seconds(text)  # (which says why)
    if value == 0:
        return 0.0
    if not value > 0:  # (negative, or NaN)
        raise argparse.ArgumentTypeError(f"{text} is neither 0 ({zero}) nor a positive number of seconds")
    return seconds(text)


def seconds_or_none(text: str) -> float:
    """A number of seconds, or 0: no wait."""
    return _zero_or_seconds(text, "none")


def seconds_or_never(text: str) -> float:
    """A number of seconds, or 0: never."""
    value = _zero_or_seconds(text, "never")
    if 0 < value < 0.1:  # (back to back, a look would never end)
        raise argparse.ArgumentTypeError(f"{text} seconds is under 0.1 (0: never)")
    return value


def busy_poll(text: str) -> float:
    """``--busy-poll USEC``: microseconds on the command line, seconds in the program."""
    if not (text.isascii() and text.isdigit()) or int(text) > BUSY_POLL_MAX_USEC:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of microseconds from 0 (off) to {BUSY_POLL_MAX_USEC}"
        )
    return int(text) / 1e6


def add_busy_poll_flag(parser: argparse.ArgumentParser, waits_for: str) -> None:
    """The ``--busy-poll`` flag both ends take (``zds.transport.BusyPoll``)."""
    parser.add_argument(
        "--busy-poll",
        type=busy_poll,
        default=defaults.BUSY_POLL,
        metavar="USEC",
        help=f"poll the ZDS socket this long for {waits_for} before sleeping: no scheduler wake-up "
        f"on each message, at the cost of that much CPU at most (default: "
        f"{round(defaults.BUSY_POLL * 1e6)}; 0: never; off where only one CPU is usable, paused "
        "while other work keeps this process waiting for a CPU)",
    )


def port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def mark(text: str) -> int:
    """A socket mark (SO_MARK: 32 bits)."""
    if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a socket mark (0-4294967295)")
    return int(text)


def unix_socket(text: str) -> str:
    """A unix socket's path: not empty, and short enough to bind or connect to (a longer or
    empty one was only found out by retrying the connection for good)."""
    if not text:
        raise argparse.ArgumentTypeError("give a path (an empty one names no socket)")
    size = len(os.fsencode(text))
    if size > defaults.SUN_PATH_MAX:
        shown = repr(text) if len(text) <= 2 * defaults.SUN_PATH_MAX else f"{text[:64]!r}..."  # (not 4 KiB)
        raise argparse.ArgumentTypeError(
            f"{shown}: {size} bytes, longer than a unix socket path may be ({defaults.SUN_PATH_MAX})"
        )
    return text


def off(value: str | None) -> str | None:
    """None for a flag given as 'off' (or empty): that endpoint is disabled."""
    return None if value is None or value.strip().lower() in ("", "off", "none") else value


def add_log_flags(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """--log-level/--log-format: on ``zds`` itself with defaults, and after every
    subcommand too, where they override the global ones."""
    default_level: object = "info" if top else argparse.SUPPRESS
    default_format: object = "text" if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-level", default=default_level, choices=LOG_LEVELS, help="log verbosity (default: info)"
    )
    parser.add_argument(
        "--log-format", default=default_format, choices=LOG_FORMATS, help="log line format (default: text)"
    )


def leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser under ``parser`` that runs a command (has no subcommands of its own)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        yield parser
        return
    for action in subcommands:
        for child in action.choices.values():
            yield from leaf_parsers(child)
