"""The node agent's end of the bulk lane (the wire and the client: bulkwire.py).

The control socket's door (peergate.py) hands a connection here, after the peer check,
when its first byte is the lane's; from then on it is :class:`BulkLane`'s: the opening
checked and answered, each framed ``AddPodsRequest`` decoded and passed on as ``AddPods``
would get it, each ``AddPodsReply`` framed back, the connection closed after the last.
The lane's JSON form (``MAGIC_JSON``) is served the same: each message's pods made the
``AddPodsRequest`` they stand for (``json_request``), each reply sent as its brief answers.
Whatever breaks the wire (a wrong opening, a compressed, oversized or undecodable frame,
an end within a frame) is logged in one line and drops the connection; the enrollments
already started run on, as when a gRPC client goes away.

What a client can make the node agent hold is bounded as gRPC's flow control bounds it:
reading stops while :data:`READ_AHEAD` bytes of requests wait to be taken (each counted at
least :data:`REQUEST_COST`), and
``bulk_add`` stops taking them while ``BULK_UNSENT`` answers wait to be sent (and sending
waits while the transport's buffer is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, cast

import grpc
from google.protobuf.message import DecodeError

from zds import defaults
from zds.errors import cut_to_bytes, printable
from zds.gen import nodeagent_pb2
from zds.server.bulkwire import MAGIC, MAGIC_JSON, Deframer, Opening, brief_answers, frame, too_many_pods

log = logging.getLogger("zds.server.control")


class BulkServe(Protocol):
    """What serves a lane: ``bulkadd.bulk_add`` bound to the node agent (``brief``: each
    answer without its pod, all the JSON form sends)."""

    def __call__(
        self, requests: AsyncIterator[nodeagent_pb2.AddPodsRequest], *, brief: bool = False
    ) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]: ...


#: How much of why a JSON pod was refused its log line says (protobuf's reason quotes an
#: unknown field's name, or a number, whole: a 1 MiB key had made a 1 MiB line).
REASON_MAX = 256
#: A gRPC status code's name by its number (the JSON form's answers carry it).
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
#: Bytes of requests decoded but not yet taken before the lane stops reading.
READ_AHEAD = 1024 * 1024
#: At the node agent's stop, how long a lane has to send the answers of what it took.
LANE_STOP_GRACE = 1.0
#: What a request waiting to be taken counts beyond its bytes (its decoded message, its place
#: in the queue): an empty frame is not free, and a client sending empty ones must be stopped too.
REQUEST_COST = 256
#: What a pod of a request counts besides its bytes (what it takes decoded beyond them).
POD_COST = 128
#: How long a lane past its opening may send nothing while it is owed no answer (s): a client
#: that opened lanes and went silent held them (at most ``BULK_LANES_MAX``), and with them the
#: bulk path, shut for as long as it liked.
LANE_IDLE = defaults.CONTROL_OPENING_TIMEOUT


class BulkLane(asyncio.Protocol):
    """One bulk-lane connection, served by ``serve``."""

    def __init__(self, serve: BulkServe) -> None:
        self._serve = serve
        self._transport: asyncio.Transport | None = None
        self._opening = Opening(MAGIC, MAGIC_JSON)
        self._deframer = Deframer(defaults.CONTROL_MAX_REQUEST)
        self._requests: asyncio.Queue[tuple[nodeagent_pb2.AddPodsRequest, int] | None] = asyncio.Queue()
        self._queued = 0  # what the requests in _requests count (their bytes, and REQUEST_COST each)
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._broken = False
        #: ``stop`` began: nothing more is read, the answers of what was taken still go out.
        self._stopping = False
        #: The client ended its requests (reading is never resumed after it: uvloop would
        #: deliver the EOF again).
        self._eof = False
        self._opening_deadline: asyncio.TimerHandle | None = None
        self._lost = asyncio.Event()
        #: When its last bytes came (the loop's time), and its pods taken and answered so far:
        #: a lane silent for LANE_IDLE with every pod answered is closed (``_idle_check``).
        self._heard = 0.0
        self._pods_taken = 0
        self._pods_answered = 0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._opening_deadline = loop.call_later(defaults.CONTROL_OPENING_TIMEOUT, self._opening_late)

    def _opening_late(self) -> None:
        if not self._opening.complete and not self._broken:
            self._break(f"it did not finish its opening within {defaults.CONTROL_OPENING_TIMEOUT:g}s")

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        opened = self._opening.complete
        try:
            data = self._opening.feed(data)
        except ValueError as exc:
            self._break(str(exc))
            return
        if self._opening.complete:
            loop = asyncio.get_running_loop()
            self._heard = loop.time()
            if not opened and self._transport is not None:
                self._transport.write(self._opening.magic)  # this node agent speaks the lane
                if self._opening_deadline is not None:
                    self._opening_deadline.cancel()
                self._idle = loop.call_later(LANE_IDLE, self._idle_check)
        try:
            messages = self._deframer.feed(data)
        except ValueError as exc:
            self._break(f"it sent {exc}")
            return
        for message in messages:
            try:
                request = self._request(message)
            except ValueError as exc:
                self._break(f"it sent {exc}")
                return
            self._pods_taken += len(request.pods)
            cost = len(message) + REQUEST_COST + POD_COST * len(request.pods)
            self._requests.put_nowait((request, cost))
            self._queued += cost
        if self._queued >= READ_AHEAD and self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def _request(self, message: bytes) -> nodeagent_pb2.AddPodsRequest:
        """``message`` decoded (as the lane's form has it); ValueError (one line) if it cannot be."""
        if self._opening.magic == MAGIC_JSON:
            return json_request(message)
        try:
            request = nodeagent_pb2.AddPodsRequest.FromString(message)
        except DecodeError:
            raise ValueError("a message that is not an AddPodsRequest") from None
        if (refused := too_many_pods(len(request.pods))) is not None:
            raise ValueError(refused)
        return request

    def eof_received(self) -> bool:
        if self._stopping:
            return True  # (kept open for the stop's answers: closing it dropped every one)
        self._eof = True
        if self._broken:
            return False
        if not self._opening.complete or self._deframer.pending:
            self._break("it ended within a frame")
            return False
        self._requests.put_nowait(None)  # the last request: answers still go out
        return True

    def _idle_check(self) -> None:
        self._idle = None
        if self._broken or self._eof or self._stopping:
            return  # (its requests ended: it closes after its last answer)
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._heard
        if quiet >= LANE_IDLE and self._pods_answered >= self._pods_taken:
            self._break(f"it sent nothing for {LANE_IDLE:g}s and was owed no answer")
            return
        self._idle = loop.call_later(LANE_IDLE - quiet if quiet < LANE_IDLE else LANE_IDLE, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._opening_deadline is not None:
            self._opening_deadline.cancel()
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()
        self._writable.set()
        self._lost.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _break(self, reason: str) -> None:
        self._broken = True
        log.warning("control socket: a bulk-lane connection closed: %s", reason)
        if self._transport is not None:
            self._transport.abort()  # nothing more is sent: answers not yet read are dropped

    async def stop(self) -> None:
        """End its stream (the node agent stops): no request is taken any more, the answers to
        those taken go out (its stop cancelled their enrollments first: each says whether its
        pod was stored), for at most ``LANE_STOP_GRACE``; then the connection is dropped."""
        self._stopping = self._broken = True  # (nothing more is read)
        while not self._requests.empty():
            self._requests.get_nowait()
        self._requests.put_nowait(None)
        loop = asyncio.get_running_loop()
        until = loop.time() + LANE_STOP_GRACE
        if self._task is not None:
            # (asyncio.wait, not the task itself: a lane cut off before the stop has a
            # cancelled task, whose CancelledError would have ended the node agent's stop)
            await asyncio.wait({self._task}, timeout=LANE_STOP_GRACE)
            self._task.cancel()
            await asyncio.wait({self._task})
        if self._transport is not None:
            # What the transport still holds goes out as its close flushes it, in what is
            # left of the grace (aborted at once, the last answers written were dropped).
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait({lost}, timeout=max(0.0, until - loop.time()))
            finally:
                lost.cancel()
                self._transport.abort()

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def _incoming(self) -> AsyncIterator[nodeagent_pb2.AddPodsRequest]:
        while (item := await self._requests.get()) is not None:
            request, cost = item
            self._queued -= cost
            if (
                self._queued < READ_AHEAD
                and not self._eof
                and self._transport is not None
                and not self._transport.is_reading()
            ):
                self._transport.resume_reading()
            yield request

    async def _run(self) -> None:
        assert self._transport is not None
        brief = self._opening.magic == MAGIC_JSON
        try:
            async with contextlib.aclosing(self._serve(self._incoming(), brief=brief)) as replies:
                async for reply in replies:
                    await self._writable.wait()
                    if self._transport.is_closing():
                        return
                    message = brief_answers(reply, STATUS_NAMES) if brief else reply.SerializeToString()
                    self._transport.write(frame(message))
                    self._pods_answered += len(reply.results)
        except Exception as exc:  # a bug: the client sees the connection close
            log.error("control socket: the bulk lane failed: %r", exc)
        finally:
            self._transport.close()


def json_request(message: bytes) -> nodeagent_pb2.AddPodsRequest:
    """A message of the lane's JSON form (a JSON array of pods, each an object of
    ``AddPodRequest``'s fields by their proto names) as the ``AddPodsRequest`` it stands for;
    ValueError (one line) for one no zds client sends. Protobuf checks each field's type
    (``null`` is a field not set; an unknown field refused: a field a later client adds needs
    an opening of its own); what it would take otherwise is refused here: ``ips`` not a list
    (a text was taken letter by letter, an object by its keys), both members of the netns
    oneof (the last set had won)."""
    try:
        pods = json.loads(message)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise ValueError("a message that is not JSON") from None
    if not isinstance(pods, list):
        raise ValueError("a message that is not a JSON array of pods")
    if (refused := too_many_pods(len(pods), "a JSON array")) is not None:
        raise ValueError(refused)
    request = nodeagent_pb2.AddPodsRequest()
    for n, pod in enumerate(pods):
        try:
            if not isinstance(pod, dict):
                raise TypeError(f"a JSON {type(pod).__name__}, not an object")
            if (ips := pod.get("ips")) is not None and not isinstance(ips, list):
                raise TypeError(f"ips is a JSON {type(ips).__name__}, not a list")
            if pod.get("netns_path") is not None and pod.get("netns_pid") is not None:
                raise ValueError("both netns_path and netns_pid")
            request.pods.add(**pod)
        except (TypeError, ValueError) as exc:  # (UnicodeEncodeError, a lone surrogate, is a ValueError)
            reason = cut_to_bytes(printable(str(exc)), REASON_MAX)
            raise ValueError(
                f"a pod (the {n + 1}. of a message) that is not an AddPodRequest: {reason}"
            ) from None
    return request
