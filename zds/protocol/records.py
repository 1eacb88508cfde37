"""One received ZDS record, the shape both protocol roles, the transport and the tests share."""

from __future__ import annotations

import contextlib
import os
import socket

#: recvmsg's "cut" flags as a plain int: or-ing socket's IntFlag members costs ~1.4 us, on every record.
CUT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
#: Each of them: the bytes cut (``TRUNCATED``), the fds (``FDS_CUT``: more than there was room
#: for, or none free to take them).
TRUNCATED = int(socket.MSG_TRUNC)
FDS_CUT = int(socket.MSG_CTRUNC)


class Record:
    """One packet as ``recvmsg`` gave it: its bytes, the fds that came with it, its flags.

    The fds belong to whoever holds the record: handing a record to a protocol
    object hands it the fds too (it closes every one it does not keep).
    """

    __slots__ = ("fds", "flags", "payload")

    def __init__(self, payload: bytes, fds: list[int] | None = None, flags: int = 0) -> None:
        self.payload = payload
        self.fds = [] if fds is None else fds
        #: recvmsg flags; ``MSG_TRUNC``/``MSG_CTRUNC`` say the payload or the fds were cut.
        self.flags = flags

    def __repr__(self) -> str:
        return f"Record(payload={self.payload!r}, fds={self.fds!r}, flags={self.flags!r})"

    @property
    def truncated(self) -> bool:
        """The payload or the fds did not fit the receive buffers (MSG_TRUNC/MSG_CTRUNC)."""
        return bool(self.flags & CUT)

    @property
    def is_eof(self) -> bool:
        """A 0-byte record with nothing else: the peer closed (ztunnel reads a real
        empty record as EOF too)."""
        return not self.payload and not self.fds and not self.truncated

    def take_fds(self) -> list[int]:
        """The fds, now the caller's: the record no longer holds them."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        """Close every fd the record still holds (each has exactly one owner)."""
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())
