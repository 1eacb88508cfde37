"""One ztunnel connection, seen from the node agent.

All writes to a connection go through its one task (``serve``): ZDS acks
correlate by order only, so two writers would mix up whose ack is whose.
Other tasks hand requests to it with ``deliver`` and wait for the ack.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from zds import defaults
from zds.errors import printable
from zds.protocol.messages import Ack, Request, SnapshotSent, request_kind
from zds.protocol.nodeagent import (
    AckReceived,
    ConnectionClosed,
    ConnectionState,
    Event,
    HelloAccepted,
    NodeAgentProtocol,
    SnapshotComplete,
)
from zds.seqpacket import sent_empty
from zds.server import spans
from zds.server.connrecords import (
    ConnectionInfo,
    ConnectionObserver,
    ConnectionStats,
    Delivery,
    SnapshotSource,
)
from zds.server.link import ConnectionLost
from zds.server.tasks import retrieve_exception
from zds.transport import BusyPoll, PeerCredentials, SeqpacketConnection

if TYPE_CHECKING:
    from zds.protocol.records import Record
    from zds.server.faultplay import ConnectionFaults

log = logging.getLogger("zds.server")


class ZtunnelConnection:
    """The node agent's end of one ztunnel connection."""

    def __init__(
        self,
        sock: SeqpacketConnection,
        *,
        observer: ConnectionObserver,
        hello_timeout: float = defaults.HELLO_TIMEOUT,
        ack_timeout: float = defaults.ACK_TIMEOUT,
        keepalive_interval: float = defaults.KEEPALIVE_INTERVAL,
        busy_poll: float = defaults.BUSY_POLL,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.sock = sock
        self.connected_at = time.time()
        self.stats = ConnectionStats()
        self._loop = asyncio.get_running_loop()
        self._observer = observer
        self._tracer = tracer or trace.NoOpTracer()
        self._snapshot_entries = 0
        self._keepalive_interval = keepalive_interval
        #: Polls for each ack a moment before sleeping (``zds.transport.BusyPoll``).
        self._busy = BusyPoll(busy_poll)
        self.protocol = NodeAgentProtocol(
            now=_now(),
            hello_timeout=hello_timeout,
            ack_timeout=ack_timeout,
            keepalive_interval=keepalive_interval,
        )
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        #: Faults armed on this connection (zds fault); None almost always.
        self.faults: ConnectionFaults | None = None
        #: Protocol events not reported yet, each with the delivery its ack answers (``_catch_up``).
        self._later: list[tuple[Event, Delivery | None]] = []
        self.peer: PeerCredentials | None = sock.peer_credentials()

    @property
    def snapshot_complete(self) -> bool:
        return self.protocol.state is ConnectionState.READY

    @property
    def closed(self) -> bool:
        return self.protocol.state is ConnectionState.CLOSED

    @property
    def log_extra(self) -> dict[str, str]:
        return {"conn": self.id}

    def info(self, *, newest: bool = False) -> ConnectionInfo:
        """A copy of what this connection looks like now."""
        return ConnectionInfo(
            id=self.id,
            peer=self.peer,
            hello_version=self.protocol.hello_version or 0,
            connected_at=self.connected_at,
            state=self.protocol.state,
            snapshot_complete=self.snapshot_complete,
            sent=self.stats.sent,
            acked=self.stats.acked,
            nacked=self.stats.nacked,
            sent_by_type=dict(self.stats.by_kind),
            newest=newest,
        )

    # -- used by other tasks ---------------------------------------------------
    async def deliver(
        self,
        request: Request,
        fd: int | None = None,
        *,
        payload: bytes | None = None,
        trace_context: otel_context.Context | None = None,
    ) -> Ack:
        """Queue ``request`` (``fd``: an owned dup, closed once sent) and wait for its ack.

        ``payload``: ``request`` already encoded. ``trace_context``: the trace the send
        and the wait for the ack belong to. Raises ConnectionLost when the connection
        closes first.
        """
        delivery = Delivery(
            request=request,
            fd=fd,
            result=self._loop.create_future(),
            trace_context=trace_context,
            payload=payload,
        )
        if self.closed:
            delivery.drop(ConnectionLost(self.id, self.protocol.close_reason or "closed"))
        else:
            self._queue.put_nowait(delivery)
        return await delivery.result

    # -- the connection's own task ---------------------------------------------
    async def serve(self, source: SnapshotSource, on_hello: Callable[[], Awaitable[str]]) -> str:
        """Hello, snapshot, then updates until the connection ends; returns why it ended.

        ``on_hello`` is the node agent's say once the hello came: '' to go on (it may take
        its time: the accept rate limit), or why this connection is refused.
        """
        try:
            if self.faults is not None:
                await self.faults.before_hello(self)
            await self._await_hello()
            self._catch_up()
            refusal = await on_hello()
            if refusal:
                self.protocol.close(refusal)
                return refusal
            await self._send_snapshot(source)
            while True:
                delivery = await self._next_delivery()
                await self._exchange(delivery)
        except ConnectionLost as lost:
            return lost.reason
        except Exception as exc:
            # e.g. EMFILE while duplicating a netns fd for the snapshot: this connection
            # cannot go on; ztunnel reconnects and gets a fresh snapshot.
            log.exception("ztunnel connection failed", extra=self.log_extra)
            self.protocol.close(f"internal error: {exc}")
            return f"internal error: {exc}"
        finally:
            self._catch_up()
            self._shutdown()

    def close(self, reason: str) -> None:
        """Close from outside (node agent shutdown, connection limit)."""
        self.protocol.close(reason)
        self._shutdown()

    def _shutdown(self) -> None:
        reason = self.protocol.close_reason or "closed"
        lost = ConnectionLost(self.id, reason)
        while not self._queue.empty():
            self._queue.get_nowait().drop(lost)
        self.sock.close()

    def _handle(self, events: list[Event]) -> list[Event]:
        """Take in the protocol's events: a close raises ConnectionLost at once; the rest
        (observer calls) wait in ``_later`` until ``_catch_up``. A protocol closed from outside
        (the stop) gives no event: that ends it too (else an ack's waiter read EOF forever)."""
        for i, event in enumerate(events):
            match event:
                case AckReceived(ack=Ack(error=error)) if error and not error.isprintable():
                    # What ztunnel said goes to logs, terminals (zds pod add, pod list, watch)
                    # and the control API: its escape sequences and newlines as escapes.
                    events[i] = event = dataclasses.replace(event, ack=Ack(error=printable(error)))
                    self._later.append((event, None))
                case HelloAccepted() | AckReceived() | SnapshotComplete():
                    self._later.append((event, None))
                case ConnectionClosed(reason=reason, ack_timeout=ack_timeout):
                    self._catch_up()
                    raise ConnectionLost(self.id, reason, ack_timeout=ack_timeout)
        if self.protocol.state is ConnectionState.CLOSED:
            self._catch_up()
            raise ConnectionLost(self.id, self.protocol.close_reason or "closed")
        return events

    def _catch_up(self) -> None:
        """Tell the observer (logs, pod states, metrics, Watch) and the waiting callers what
        happened, in order. Called once the next request is on its way, so this bookkeeping
        runs while ztunnel works on that request instead of between an ack and the next send."""
        later, self._later = self._later, []
        for event, delivery in later:
            match event:
                case HelloAccepted(version=version):
                    self._observer.hello(self, version)
                case AckReceived(request=request, ack=ack, latency=latency):
                    if ack.ok:
                        self.stats.acked += 1
                    else:
                        self.stats.nacked += 1
                    with spans.within(delivery.trace_context if delivery is not None else None):
                        self._observer.acked(self, request, ack, latency)  # (a nack's line: its trace)
                    if delivery is not None and not delivery.result.done():
                        delivery.result.set_result(ack)
                case SnapshotComplete():
                    self._observer.snapshot_complete(self, self._snapshot_entries)

    async def _receive(self, *, due: bool = False) -> list[Event]:
        """Wait for the next record or the protocol's deadline, whichever comes first.
        ``due``: an answer is due any moment (an ack): poll for it a moment before sleeping."""
        while True:
            try:
                record = self.sock.try_recv()
                if record is None and due:
                    record = await self._busy.poll(self.sock)
                if record is None:
                    deadline = self.protocol.next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - _now())
                    readable = await self.sock.wait_readable(timeout)
            except OSError as exc:
                return self._handle(self.protocol.close(f"read failed: {exc}"))
            if record is not None:
                return self._take(record)
            if not readable:
                return self._handle(self.protocol.handle_timeout(_now()))

    def _take(self, record: Record) -> list[Event]:
        """``record`` to the protocol; a 0-byte one is asked about first: ztunnel gone, or an
        empty record it sent (its end still open)."""
        peer_open = sent_empty(self.sock.socket, record)
        return self._handle(self.protocol.receive(record, _now(), peer_open=peer_open))

    async def _await_hello(self) -> None:
        while self.protocol.state is ConnectionState.AWAITING_HELLO:
            await self._receive()

    async def _exchange(self, delivery: Delivery) -> Ack:
        """Send one request (+fd) and wait for its ack; the only place that writes.

        The ack of the previous request is reported (``_catch_up``) only once this one is
        written: the node agent's bookkeeping overlaps ztunnel's work instead of adding to it."""
        if self.faults is not None:  # zds fault: the one check a message pays for faults
            return await self.faults.exchange(self, delivery)
        if delivery.trace_context is not None:
            return await self._exchange_traced(delivery)
        payload = self._encode(delivery)
        await self._write(delivery, payload)
        return await self._await_ack(delivery)

    def _encode(self, delivery: Delivery) -> bytes:
        """The request's record; a connection closed meanwhile (the node agent stopping, a
        peer gone) is that connection's end, not a failure with a traceback."""
        try:
            return self.protocol.send(delivery.request, _now(), payload=delivery.payload)
        except Exception as exc:
            if self.protocol.state is not ConnectionState.CLOSED:
                delivery.drop(exc)
                raise
            lost = ConnectionLost(self.id, self.protocol.close_reason or "closed")
            delivery.drop(lost)
            raise lost from None

    async def _exchange_traced(self, delivery: Delivery) -> Ack:
        """``_exchange`` with a ``zds.send`` and a ``zds.wait_ack`` span in the delivery's trace."""
        kind = request_kind(delivery.request)
        attributes = {spans.CONNECTION_ID: self.id, spans.MESSAGE_TYPE: kind}
        uid = getattr(delivery.request, "uid", "")
        if uid:
            attributes[spans.POD_UID] = uid
        with spans.child_span(self._tracer, spans.SEND, delivery.trace_context, attributes) as send_span:
            payload = self._encode(delivery)
            try:
                await self._write(delivery, payload)
            except ConnectionLost as lost:
                send_span.set_status(Status(StatusCode.ERROR, lost.reason))
                raise
        with spans.child_span(self._tracer, spans.WAIT_ACK, delivery.trace_context, attributes) as ack_span:
            try:
                ack = await self._await_ack(delivery)
            except ConnectionLost as lost:
                ack_span.set_status(Status(StatusCode.ERROR, f"no ack: {lost.reason}"))
                raise
            ack_span.set_attribute(spans.ACK_ERROR, ack.error)
            if ack.error:
                ack_span.set_status(Status(StatusCode.ERROR, ack.error))
            return ack

    async def _write(self, delivery: Delivery, payload: bytes) -> None:
        try:
            await self.sock.send(
                payload, [delivery.fd] if delivery.fd is not None else [], within=self.protocol.ack_timeout
            )
        except TimeoutError:
            # ztunnel is not reading (yet it answered: the queue filled up): as an ack timeout,
            # else this connection's task, and every enrollment and removal waiting on it, waited
            # for good (Istio's node agent: a 5 s write deadline on each send).
            kind = request_kind(delivery.request)
            reason = f"no room to write {kind} for {self.protocol.ack_timeout:g}s: ztunnel is not reading"
            delivery.drop(ConnectionLost(self.id, reason, ack_timeout=True))
            self._handle(self.protocol.close(reason))  # raises ConnectionLost
        except OSError as exc:
            delivery.drop(ConnectionLost(self.id, f"write failed: {exc}"))
            self._handle(self.protocol.close(f"write failed: {exc}"))  # raises ConnectionLost
        finally:
            delivery.close_fd()  # the kernel made the receiver its own copy
        kind = request_kind(delivery.request)
        self.stats.sent += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self._catch_up()  # the previous ack, now that this request is on its way
        self._observer.sent(self, delivery.request)

    async def _await_ack(self, delivery: Delivery) -> Ack:
        try:
            while True:
                for event in await self._receive(due=True):
                    if isinstance(event, AckReceived):
                        self._answering(event, delivery)
                        return event.ack
        except ConnectionLost as lost:
            self._observer.unanswered(self, delivery.request, lost.reason)
            delivery.drop(lost)
            raise

    def _answering(self, ack: AckReceived, delivery: Delivery) -> None:
        """``ack``, waiting in ``_later``, answers ``delivery``: resolved when it is reported."""
        for i in range(len(self._later) - 1, -1, -1):
            if self._later[i][0] is ack:
                self._later[i] = (ack, delivery)
                return
        if not delivery.result.done():  # reported already (a close came with it)
            delivery.result.set_result(ack.ack)

    async def _send_snapshot(self, source: SnapshotSource) -> None:
        """Every known pod (Add + fd, or Keep), each acked before the next, then SnapshotSent.

        Each entry is read from the cache when its turn comes, so a pod removed
        meanwhile is skipped and only one fd is duplicated at a time. The whole
        snapshot is one trace (when tracing is on), each message a child of it.
        """
        uids = source.snapshot_uids()
        with self._tracer.start_as_current_span(
            spans.SNAPSHOT,
            context=otel_context.Context(),  # a trace of its own
            attributes={spans.CONNECTION_ID: self.id},
        ) as root:
            ctx = otel_context.get_current() if root.is_recording() else None
            for uid in uids:
                item = source.snapshot_item(uid)
                if item is not None:
                    self._snapshot_entries += 1
                    await self._exchange(
                        Delivery(
                            request=item.request,
                            fd=item.fd,
                            result=self._unawaited(),
                            trace_context=ctx,
                            payload=item.payload,
                        )
                    )
            root.set_attribute(spans.SNAPSHOT_PODS, self._snapshot_entries)
            await self._exchange(
                Delivery(request=SnapshotSent(), fd=None, result=self._unawaited(), trace_context=ctx)
            )

    def _unawaited(self) -> asyncio.Future[Ack]:
        """The answer of a snapshot entry, which only this connection reads: a connection lost
        mid-snapshot sets its error, which must not be logged as never retrieved."""
        result: asyncio.Future[Ack] = self._loop.create_future()
        result.add_done_callback(retrieve_exception)
        return result

    async def _next_delivery(self) -> Delivery:
        """The next queued request. While idle, watch the socket: ztunnel never speaks
        unprompted, so a readable socket means it is gone (EOF, seen at once, not at the next
        probe) or broke the protocol; and probe it every keepalive interval, as Istio does."""
        while True:
            if not self._queue.empty():
                return self._queue.get_nowait()
            self._catch_up()  # idle: report the last ack now
            get = asyncio.ensure_future(self._queue.get())
            readable = asyncio.ensure_future(self.sock.wait_readable())
            try:
                done, _ = await asyncio.wait(
                    {get, readable}, timeout=self._keepalive_interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in (get, readable):
                    waiter.cancel()
                # Let both finish unwinding (the reader is unregistered) before going on.
                await asyncio.wait({get, readable})
            if get in done and not get.cancelled():
                return get.result()
            now = _now()
            if readable in done:
                record = self.sock.try_recv()
                if record is not None:
                    self._take(record)  # EOF: raises ConnectionLost
                continue
            if not self.protocol.keepalive_due(now):
                continue
            # The probe: nothing to read means alive, EOF means gone (Istio's reads for 10 ms;
            # an EOF is there at once).
            record = self.sock.try_recv()
            if record is None:
                self.protocol.keepalive_probed(now)
                continue
            self._take(record)


def _now() -> float:
    """The connection's clock: monotonic and fine-grained (uvloop's loop.time() moves in
    whole milliseconds, too coarse for ack latencies); only differences of it are used."""
    return time.monotonic()
