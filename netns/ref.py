"""``NetnsRef``: where a pod's network namespace is, checked once where it enters zds.

A pod names its netns either by a path (``/var/run/netns/pod-a``, a bare name
for a named namespace, ``/proc/PID/ns/net``) or by a process (``--netns-pid``,
``netns_pid`` in the API, ``pid:N`` in a pods file). Every way in builds a
``NetnsRef`` and every way on (the gRPC request, the node agent, the CLI's
table) reads it; nothing parses ``pid:N`` twice. Pure: no file is touched here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple, Self

from zds import defaults
from zds.errors import printable

from .errors import NetnsError

#: The largest process id a reference may name: the control API's field is an int32 (Linux's
#: own pid_max is at most 2**22).
PID_MAX = defaults.INT32_MAX


class NetnsRefError(NetnsError, ValueError):
    """A netns reference that names nothing usable (empty path, ``pid:x``, pid 0)."""


class _NetnsRefFields(NamedTuple):
    path: str | None
    pid: int | None


class NetnsRef(_NetnsRefFields):
    """A network namespace by path, or by a process in it (exactly one of the two), checked
    when it is made. (A NamedTuple, not a dataclass: ``zds pod add`` makes them, and
    ``dataclasses`` alone is ~5 ms of its start-up.)"""

    __slots__ = ()

    def __new__(cls, path: str | None = None, pid: int | None = None) -> Self:
        if (path is None) == (pid is None):
            raise NetnsRefError("a netns reference is a path or a pid, exactly one of them")
        if pid is not None and (isinstance(pid, bool) or not 0 < pid <= PID_MAX):
            raise NetnsRefError(f"bad process id {pid!r}: expected a positive integer (at most {PID_MAX})")
        if path is not None and not path.strip():
            raise NetnsRefError('empty netns path: expected a path, a name or "pid:N"')
        if path is not None and not path.replace("\0", "").isprintable():  # (NUL: refused at the open)
            # A newline or an escape went into log lines and answers as it was (a forged line).
            raise NetnsRefError(f"netns path {printable(path[:256])} has a character that is not printable")
        return super().__new__(cls, path, pid)

    @classmethod
    def _make(cls, iterable: Iterable[Any]) -> Self:  # type: ignore[override]  # (typeshed: generic _cls)
        """Checked as every other way of making one (``_replace`` goes through here)."""
        return cls(*iterable)

    @classmethod
    def of_pid(cls, pid: int) -> NetnsRef:
        """The netns of process ``pid`` (``/proc/PID/ns/net``)."""
        return cls(pid=pid)

    @classmethod
    def of_path(cls, path: str) -> NetnsRef:
        """A netns file; a bare name (no ``/``) is a named netns, ``/var/run/netns/NAME``."""
        path = path.strip()
        if path and "/" not in path:
            path = os.path.join(defaults.NETNS_RUN_DIR, path)
        return cls(path=path)

    @classmethod
    def parse(cls, text: str) -> NetnsRef:
        """``pid:N``, a path, or a bare name, as a pods file writes it."""
        text = text.strip()
        if text.startswith("pid:"):
            number = text[4:].strip()
            if not (
                number.isascii() and number.isdigit() and len(number) <= 10 and 0 < int(number) <= PID_MAX
            ):
                raise NetnsRefError(
                    f'bad netns reference "{text[:64]}": expected "pid:N" with N a process id '
                    f"(at most {PID_MAX}), or a path"
                )
            return cls.of_pid(int(number))
        if not text:
            raise NetnsRefError('empty netns reference: expected "pid:N" or a path')
        return cls.of_path(text)

    @property
    def location(self) -> str:
        """The file to open: the path, or ``/proc/PID/ns/net``."""
        if self.pid is not None:
            return f"/proc/{self.pid}/ns/net"
        assert self.path is not None
        return self.path

    def __str__(self) -> str:
        """How a pods file writes it: ``pid:N`` or the path."""
        return f"pid:{self.pid}" if self.pid is not None else self.location
