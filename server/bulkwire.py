"""The bulk lane: ``zds pod add --from-file`` on the unix control socket without gRPC.

Importing grpc costs a client ~45 ms (its C core alone ~16), more than enrolling a
thousand pods; the bulk path is on the critical path of a pod start. So on the unix
control socket a connection may, instead of HTTP/2, open with :data:`MAGIC`; then it
carries the control API's own ``zds.v1.AddPodsRequest`` messages to the node agent and
``zds.v1.AddPodsReply`` messages back, each framed as gRPC frames a message (a flag
byte 0, a 4-byte big-endian length, the message). The client half-closes after its last
request; the node agent closes after the last answer. Behind the same peer check as
gRPC, served by the same code as ``AddPods`` (``control.bulk_add``), answered the same.

This module is the wire and the client, and imports neither grpc nor asyncio; the node
agent's end is ``bulklane.py``.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from zds.gen import nodeagent_pb2

#: The lane's first bytes (an HTTP/2 connection opens with ``PRI * HTTP/2.0``).
MAGIC = b"ZDS-BULK/1\n"
#: A message's frame header: flag (0: not compressed), length.
HEADER = struct.Struct(">BI")
#: The largest message either end takes, as gRPC's default.
MAX_MESSAGE = 4 * 1024 * 1024


class LaneError(Exception):
    """The lane broke; the message is one line for the user."""


def frame(message: bytes) -> bytes:
    return HEADER.pack(0, len(message)) + message


class Deframer:
    """Messages out of a byte stream: :meth:`feed` bytes, get whole messages; ValueError
    (one line) on a frame no zds end sends."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        messages = []
        while len(self._buf) >= HEADER.size:
            flag, length = HEADER.unpack_from(self._buf)
            if flag != 0:
                raise ValueError(f"a frame with flag {flag} (compression is not supported)")
            if length > MAX_MESSAGE:
                raise ValueError(f"a {length}-byte message (the limit is {MAX_MESSAGE})")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            messages.append(bytes(self._buf[HEADER.size : end]))
            del self._buf[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a message not yet whole."""
        return len(self._buf)


def add_pods(
    path: str, batches: Iterable[nodeagent_pb2.AddPodsRequest], timeout: float
) -> Iterator[nodeagent_pb2.AddPodsReply]:
    """Every batch to the node agent at ``path``, its answers as they come. OSError if it
    cannot be reached; LaneError if the lane breaks or ``timeout`` (seconds) runs out."""
    deadline = time.monotonic() + timeout
    out = bytearray(MAGIC)
    for batch in batches:
        out += frame(batch.SerializeToString())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.setblocking(False)
        poller = select.poll()
        deframer = Deframer()
        sent = 0
        while True:
            # Write while reading: the node agent answers before it has read everything.
            poller.register(sock, select.POLLIN | (select.POLLOUT if sent < len(out) else 0))
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1e3):
                raise LaneError(f"DEADLINE_EXCEEDED: no answer within {timeout:g} s")
            if sent < len(out):
                try:
                    sent += sock.send(out[sent : sent + 256 * 1024])
                except (BlockingIOError, InterruptedError):
                    pass
                except BrokenPipeError:
                    sent = len(out)  # it stopped reading: what it answers is below
                if sent == len(out):
                    sock.shutdown(socket.SHUT_WR)
            try:
                data = sock.recv(256 * 1024)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                if deframer.pending:
                    raise LaneError("the node agent closed the connection within a message")
                return
            try:
                messages = deframer.feed(data)
            except ValueError as exc:
                raise LaneError(f"the node agent sent {exc}") from None
            for message in messages:
                try:
                    reply = nodeagent_pb2.AddPodsReply.FromString(message)
                except DecodeError:
                    raise LaneError("the node agent sent an answer that is not an AddPodsReply") from None
                yield reply
