"""How ztunnel reads a record, and the words it nacks with (``workloadmanager.rs``,
``protocol.rs``): a record is checked before anything else, in ztunnel's order,
and every fd that came with a refused record is closed."""

from __future__ import annotations

import contextlib
import os

from zds.errors import CodecError, NoPayload, ProtocolError
from zds.protocol.messages import AddWorkload, Request, decode_request
from zds.protocol.records import CUT, FDS_CUT

#: Nack prefixes, as ztunnel writes them (workloadmanager.rs), so logs read alike.
READ_FAILURE = "failure to read message : "
PROCESS_FAILURE = "failure to process message : "
START_FAILURE = "failure to start proxy : "


class ReadError(ProtocolError):
    """A record ztunnel refuses to read (``failure to read message``)."""


class ProtocolViolation(ProtocolError):
    """A well-formed request that breaks the protocol (ztunnel's ``ProtocolError``)."""


def read_record(payload: bytes, fds: list[int], flags: int) -> tuple[Request, int | None]:
    """Check a non-empty record as ztunnel's ``read_message`` does; return the request
    and its fd. On any error every fd is closed and ReadError says why."""
    try:
        # MSG_CTRUNC first: ztunnel's nix (>= 0.29) refuses to walk a cut control buffer
        # (RecvMsg::cmsgs() is Err(ENOBUFS)) before counting fds: more than its room for two,
        # or none installable (EMFILE). (ztunnel leaks the fds that came; they are closed here.)
        if flags & FDS_CUT:
            raise ReadError("ENOBUFS: No buffer space available")
        # Count the fds first, so that whatever else is wrong none of them leaks.
        if len(fds) > 1:
            raise ReadError(f"Expected 1 FD, got {len(fds)}")
        if flags & CUT:
            raise ReadError("received truncated message")
        try:
            request = decode_request(payload)
        except NoPayload as exc:
            raise ReadError("no payload") from exc
        except CodecError as exc:
            raise ReadError(f"failed to decode Protobuf message: {exc}") from exc
        fd = fds[0] if fds else None
        if isinstance(request, AddWorkload) and fd is None:
            raise ReadError("No control message")
        if not isinstance(request, AddWorkload) and fd is not None:
            raise ReadError("Unexpected control message")
    except ReadError:
        close_all(fds)
        raise
    return request, fd


def close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
