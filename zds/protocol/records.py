"""One received ZDS record, the shape both protocol roles, the transport and the tests share."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field


@dataclass
class Record:
    """One packet as ``recvmsg`` gave it: its bytes, the fds that came with it, its flags.

    The fds belong to whoever holds the record: handing a record to a protocol
    object hands it the fds too (it closes every one it does not keep).
    """

    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: recvmsg flags; ``MSG_TRUNC``/``MSG_CTRUNC`` say the payload or the fds were cut.
    flags: int = 0

    @property
    def truncated(self) -> bool:
        """The payload or the fds did not fit the receive buffers (MSG_TRUNC/MSG_CTRUNC)."""
        return bool(self.flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))

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
