"""A command's stdout: whether its reader went away, whether writing it failed, and sending
what is left to /dev/null (a ``zds ... | head`` ends quietly, a ``> /dev/full`` says so)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO, cast


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket nobody reads any more (poll: POLLERR/POLLHUP), as
    opposed to a broken pipe of some other file (a socket of the command's own)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


class _WatchedOutput:
    """``sys.stdout``, noting whether writing it failed: an OSError escaping a command then
    came from its output (``> /dev/full``), not from something else it did."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.failed = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self.failed = True
            raise

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self.failed = True
            raise

    # (what else a caller asks of stdout is the stream's own; ``buffer`` writes are not watched,
    # nor is it a TextIOBase: nothing in zds asks either)
    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def watch_stdout() -> None:
    """From now on, note whether writing stdout fails (``output_failed``)."""
    if not isinstance(sys.stdout, _WatchedOutput):
        sys.stdout = cast(TextIO, _WatchedOutput(sys.stdout))


def output_failed() -> bool:
    return isinstance(sys.stdout, _WatchedOutput) and sys.stdout.failed


def discard_stdout() -> None:
    """From now on what is written to stdout goes to /dev/null (its reader went away), so
    neither a later write nor Python's flush at exit has anything to complain of."""
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
