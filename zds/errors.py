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

from collections.abc import Iterable


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


#: What a text cut by ``cut_to_bytes`` ends with.
CUT_MARK = "..."


def cut_to_bytes(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` bytes of UTF-8, ``CUT_MARK`` after them when cut (a
    character is never split): what another program takes by its bytes (gRPC's status
    details, a record's room)."""
    if len(text) <= limit // 4:  # (no character is more than 4 bytes)
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore") + CUT_MARK


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as its escape (``\\x1b``,
    ``\\n``): what a peer said, safe to put on a terminal or in a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def as_bytes_read(text: str) -> str:
    """``text`` as its bytes read: those that are not UTF-8 (taken in with surrogateescape, as
    Python takes arguments and paths) as ``\\xNN``, other characters that are not printable
    escaped too."""
    return printable(text.encode(errors="surrogateescape").decode(errors="backslashreplace"))


def not_utf8(texts: Iterable[str]) -> str | None:
    """The first of ``texts`` that is not UTF-8 text (bytes taken in with surrogateescape),
    escaped (``as_bytes_read``), if any."""
    for text in texts:
        try:
            text.encode()
        except UnicodeEncodeError:
            return as_bytes_read(text)
    return None


def resolvable_name(host: str) -> bool:
    """Whether ``host`` can be asked of the resolver at all (an address, or a name IDNA can
    encode: ``a..b`` or a label over 63 characters made getaddrinfo raise UnicodeError)."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True
