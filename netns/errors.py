"""``NetnsError``, on its own: what refers to a namespace (``ref``) needs it without the
kernel calls (ctypes) that ``kernel`` loads."""

from __future__ import annotations

from zds.errors import ZdsError


class NetnsError(ZdsError):
    """A network-namespace operation failed; the message says what, on what, and what to do."""


class OutOfFds(NetnsError):
    """The process has no fd to spare (EMFILE, ENFILE): nothing is wrong with the namespace."""
