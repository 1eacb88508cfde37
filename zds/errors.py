"""The family every error zds raises on purpose belongs to.

Like h11's ``ProtocolError`` (with ``LocalProtocolError`` and
``RemoteProtocolError`` under it) and ztunnel's one ``Error`` enum: callers
branch on the type (or on an enum the error carries), never on message text.
Each part defines its own errors next to the code that raises them, all
under ``ZdsError``; the protocol's shared ones live here.

    ZdsError
    ├── ProtocolError                 the ZDS protocol, either role
    │   ├── ProtocolUsageError        the caller broke the calling convention (a bug here)
    │   └── CodecError                bytes that are not a valid ZDS message
    │       └── NoPayload             a WorkloadRequest/Response with its oneof unset
    ├── NetnsError, RedirectError, PodSpecError, EnrollmentError, ...   (their own modules)
"""

from __future__ import annotations


class ZdsError(Exception):
    """Base of every error zds raises on purpose; the message is ready for a user."""


class ProtocolError(ZdsError):
    """Something about the ZDS protocol went wrong (either role)."""


class ProtocolUsageError(ProtocolError, RuntimeError):
    """The caller asked a protocol object for something the protocol forbids
    (a bug in the caller, not in the peer)."""


class CodecError(ProtocolError, ValueError):
    """A record that is not a valid ZDS message."""


class NoPayload(CodecError):
    """A well-formed ``WorkloadRequest``/``WorkloadResponse`` whose ``payload`` oneof is unset."""


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as its escape (``\\x1b``,
    ``\\n``): what a peer said, safe to put on a terminal or in a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
