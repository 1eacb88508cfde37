"""The bulk lane: ``zds pod add --from-file`` on the unix control socket without gRPC.

Importing grpc costs a client ~45 ms (its C core alone ~16), more than enrolling a
thousand pods; the bulk path is on the critical path of a pod start. So on the unix
control socket a connection may, instead of HTTP/2, open with :data:`MAGIC`; the node
agent answers with the same bytes, and from then on the connection carries the control
API's own ``zds.v1.AddPodsRequest`` messages to the node agent and ``zds.v1.AddPodsReply``
messages back, each framed as gRPC frames a message (a flag byte 0, a 4-byte big-endian
length, the message). The client half-closes after its last request; the node agent
closes after the last answer. Behind the same peer check as gRPC, served by the same code
as ``AddPods`` (``bulkadd.bulk_add``), answered the same.

A node agent from before the lane passes the opening on to gRPC, which answers in HTTP/2
and closes, having taken nothing; one with BULK_LANES_MAX lanes open answers :data:`BUSY`
and closes: the client sees either (:class:`LaneUnsupported`) and can send the pods over
``AddPods`` instead.

The lane has a second form, :data:`MAGIC_JSON`: the same frames, each holding JSON instead
(requests: an array of pods, each an object of ``AddPodRequest``'s fields by their proto
names; answers: an array of :func:`brief_answers`' objects). It is ``zds pod add``'s when it
prints no ``--json`` (which shows each pod's whole answer): protobuf's import alone is ~13 ms
of the client's start (a third of it), on the critical path of a pod start as grpc's was. A
node agent from before it closes at that opening without a byte: the client goes over the
first form then.

This module is the wire and the client, and imports neither grpc, nor asyncio, nor protobuf
(but for the first form's messages, when it is used); the node agent's end is ``bulklane.py``.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from zds import defaults
from zds.errors import ZdsError

if TYPE_CHECKING:
    from zds.gen import nodeagent_pb2

#: The lane's first bytes, each way (an HTTP/2 connection opens with ``PRI * HTTP/2.0``).
MAGIC = b"ZDS-BULK/1\n"
#: The same for its JSON form (as long: either end reads an opening of that many bytes).
MAGIC_JSON = b"ZDS-BULK/2\n"
#: The node agent's answer to the opening when it has lanes enough open (then it closes).
BUSY = b"ZDS-BULK-BUSY\n"
#: A message's frame header: flag (0: not compressed), length.
HEADER = struct.Struct(">BI")
#: The largest message either end takes, as gRPC's default.
MAX_MESSAGE = 4 * 1024 * 1024
_CHUNK = 256 * 1024


class LaneError(ZdsError):
    """The lane broke; the message is one line for the user."""


class LaneUnsupported(LaneError):
    """The node agent answered the opening with something else (one from before the lane):
    nothing was taken."""


def too_many_pods(pods: int, message: str = "an AddPodsRequest") -> str | None:
    """Why a request of ``pods`` pods is refused, if it has more than ``BULK_REQUEST_PODS``
    (counted before one of them is looked at: each taken makes a Python object, and decoded
    they are ~60 times their bytes); None if it is not. ``message`` names what held them."""
    if pods <= defaults.BULK_REQUEST_PODS:
        return None
    return f"{message} of {pods} pods (at most {defaults.BULK_REQUEST_PODS} a message)"


def frame(message: bytes) -> bytes:
    return HEADER.pack(0, len(message)) + message


class Opening:
    """One of ``accepted`` (:data:`MAGIC`, :data:`MAGIC_JSON`) as the other end's first bytes
    come in (either end reads it so): :attr:`magic` once it is whole."""

    def __init__(self, *accepted: bytes) -> None:
        self.accepted = accepted or (MAGIC,)
        self.seen = bytearray()
        self.magic = b""

    @property
    def complete(self) -> bool:
        return bool(self.magic)

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` comes after the opening; ValueError if the opening is none of ``accepted``."""
        if self.magic:
            return data
        take = len(MAGIC) - len(self.seen)
        self.seen += data[:take]
        if not any(magic.startswith(self.seen) for magic in self.accepted):
            wanted = " or ".join(repr(magic) for magic in self.accepted)
            raise ValueError(f"it opened with {bytes(self.seen)!r}, not {wanted}")
        if len(self.seen) == len(MAGIC):
            self.magic = bytes(self.seen)
        return data[take:]


class Deframer:
    """Messages out of a byte stream: :meth:`feed` bytes, get whole messages; ValueError
    (one line) on a frame no zds end sends."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        messages = []
        while len(self._buf) >= HEADER.size:
            flag, length = HEADER.unpack_from(self._buf)
            if flag != 0:
                raise ValueError(f"a frame with flag {flag} (compression is not supported)")
            if length > self._limit:
                raise ValueError(f"a {length}-byte message (the limit is {self._limit})")
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


def connect(path: str, timeout: float) -> socket.socket:
    """A connection to the control socket at ``path``; OSError (TimeoutError if the node
    agent did not accept it within ``timeout`` seconds: its backlog is full)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(
    sock: socket.socket, batches: Iterable[nodeagent_pb2.AddPodsRequest], timeout: float
) -> Iterator[nodeagent_pb2.AddPodsReply]:
    """Every batch over the lane on ``sock`` (from :func:`connect`; closed at the end), its
    answers as they come, until the node agent closes. LaneError if the lane breaks or the
    stream has not ended within ``timeout`` seconds; LaneUnsupported before any answer if the
    node agent does not speak the lane."""
    from google.protobuf.message import DecodeError

    from zds.gen import nodeagent_pb2

    for message in _exchange(sock, MAGIC, (batch.SerializeToString() for batch in batches), timeout):
        try:
            reply = nodeagent_pb2.AddPodsReply.FromString(message)
        except DecodeError:
            raise LaneError("the node agent sent an answer that is not an AddPodsReply") from None
        yield reply


def exchange_json(
    sock: socket.socket, batches: Iterable[list[dict[str, Any]]], timeout: float
) -> Iterator[list[Answer]]:
    """The same over the lane's JSON form: each batch a list of pods (``AddPodRequest``'s
    fields by their proto names), each message's answers as it comes. LaneUnsupported also when the
    node agent closes before its opening (one from before this form, or that did not let this
    client in: the first form tells which)."""
    messages = (json.dumps(batch).encode() for batch in batches)
    for message in _exchange(sock, MAGIC_JSON, messages, timeout, unopened_unsupported=True):
        try:
            answers = json.loads(message)
            if not isinstance(answers, list):
                raise ValueError
            got = [Answer.of(answer) for answer in answers]
        except (ValueError, RecursionError):
            raise LaneError("the node agent sent an answer that is not a JSON array of answers") from None
        yield got


class Answer:
    """One pod's answer over the JSON form: its position in the stream, the gRPC status code
    AddPod would have returned (``status``: its name) and message, and (code 0) the ztunnel
    connection that acked it."""

    __slots__ = ("code", "connection_id", "index", "message", "status")

    def __init__(self, index: int, code: int, status: str, message: str, connection_id: str) -> None:
        self.index, self.code, self.status = index, code, status
        self.message, self.connection_id = message, connection_id

    @classmethod
    def of(cls, doc: Any) -> Answer:
        """ValueError unless ``doc`` is an object of :func:`brief_answers`' fields, each of its type."""
        if not isinstance(doc, dict):
            raise ValueError
        index, code = doc.get("index"), doc.get("code")
        texts = [doc.get(key, "") for key in ("status", "message", "connection_id")]
        if (
            type(index) is not int
            or type(code) is not int
            or index < 0
            or not all(type(t) is str for t in texts)
        ):
            raise ValueError
        return cls(index, code, *texts)


def brief_answers(reply: nodeagent_pb2.AddPodsReply, status_names: dict[int, str]) -> bytes:
    """``reply`` as the JSON form's answer message: each result its index, code, status name
    (``status_names``: code -> name) and message, or (code 0) the connection that acked it."""
    return json.dumps(
        [
            {"index": r.index, "code": 0, "connection_id": r.response.connection_id}
            if r.code == 0
            else {
                "index": r.index,
                "code": r.code,
                "status": status_names.get(r.code, str(r.code)),
                "message": r.message,
            }
            for r in reply.results
        ]
    ).encode()


def _exchange(
    sock: socket.socket,
    magic: bytes,
    messages: Iterable[bytes],
    timeout: float,
    *,
    unopened_unsupported: bool = False,
) -> Iterator[bytes]:
    """``messages`` framed after ``magic`` on ``sock`` (closed at the end); the node agent's
    messages as they come, until it closes. LaneUnsupported if it answers the opening with
    something else, or (``unopened_unsupported``) closes before it answered."""
    deadline = time.monotonic() + timeout
    out = bytearray(magic)
    for message in messages:
        out += frame(message)
    with sock:
        opening = Opening(magic)  # the node agent's answer to ours
        deframer = Deframer()
        poller = select.poll()
        sent = 0
        while True:
            # Write while reading: the node agent answers before it has read everything, and
            # stops reading while its answers are not read.
            poller.register(sock, select.POLLIN | (select.POLLOUT if sent < len(out) else 0))
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1e3):
                raise LaneError(f"DEADLINE_EXCEEDED: the stream did not end within {timeout:g} s")
            try:
                if sent < len(out):
                    sent = _send(sock, out, sent)
                data = sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data = b""  # it closed with some of ours unread: what it answered came first
            except OSError as exc:
                raise LaneError(f"the connection to the node agent failed: {exc.strerror or exc}") from None
            if not data:
                if not opening.complete and (opening.seen or unopened_unsupported):
                    raise LaneUnsupported(_UNSUPPORTED)
                if deframer.pending:
                    raise LaneError("the node agent closed the connection within a message")
                return
            try:
                data = opening.feed(data)
            except ValueError:
                raise LaneUnsupported(_UNSUPPORTED) from None
            try:
                yield from deframer.feed(data)
            except ValueError as exc:
                raise LaneError(f"the node agent sent {exc}") from None


_UNSUPPORTED = "the node agent does not take the bulk lane (a zds from before it, or lanes enough open)"


def _send(sock: socket.socket, out: bytearray, sent: int) -> int:
    """The next chunk of ``out`` from ``sent``; how much is sent now. Half-closes after the last."""
    try:
        sent += sock.send(memoryview(out)[sent : sent + _CHUNK])
    except (BlockingIOError, InterruptedError):
        return sent
    except BrokenPipeError:
        return len(out)  # it stopped reading (and closes): what it answered is still to read
    if sent == len(out):
        sock.shutdown(socket.SHUT_WR)
    return sent
