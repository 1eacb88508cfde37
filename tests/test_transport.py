"""The SOCK_SEQPACKET transport: whole records, fds with close-on-exec, EOF."""

from __future__ import annotations

import fcntl
import os
import socket

from zds.transport import SeqpacketConnection


async def test_records_keep_their_boundaries_and_fds_arrive_close_on_exec() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqpacketConnection(ours)
    r, w = os.pipe()
    try:
        socket.send_fds(theirs, [b"\x08\x01"], [r])
        theirs.send(b"\x1a\x00")
        first = await conn.recv()
        second = await conn.recv()
        assert first.payload == b"\x08\x01" and len(first.fds) == 1
        assert fcntl.fcntl(first.fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(first.fds[0]).st_ino == os.fstat(r).st_ino
        assert second.payload == b"\x1a\x00" and second.fds == []
        first.close_fds()
        assert first.fds == []
        theirs.close()
        assert (await conn.recv()).is_eof
    finally:
        conn.close()
        theirs.close()
        os.close(r)
        os.close(w)


async def test_an_oversized_record_is_flagged_truncated() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = SeqpacketConnection(ours)
    try:
        theirs.send(b"x" * 2000)
        record = await conn.recv()
        assert record.truncated and len(record.payload) == 1024 and not record.is_eof
    finally:
        conn.close()
        theirs.close()
