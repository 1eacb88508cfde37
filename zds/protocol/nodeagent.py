"""The node agent's side of one ztunnel connection, sans-I/O.

One object per connection. The caller feeds it what arrived (``receive``),
asks it for the bytes of the next request (``send``) and tells it the time;
it answers with events. It knows the rules Istio's node agent follows:

- the first record must be a ``ZdsHello`` that decodes, within the hello timeout (any
  version, as Istio's node agent takes it; the observer warns when it is not V1);
- then the snapshot (Add/Keep for every known pod, then SnapshotSent);
- exactly one request in flight: acks correlate by order only, so a second
  request before the ack would make the next ack ambiguous;
- an ack that does not come within the ack timeout makes the connection
  untrustworthy (a late ack would be taken for the next request's): close it;
- ztunnel never speaks unprompted, so any record while nothing is in flight
  (seen by the idle keepalive probe) is a protocol error, and EOF means gone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from zds import defaults
from zds.errors import CodecError, ProtocolUsageError
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    decode_ack,
    decode_hello,
    encode_request,
    request_kind,
)
from zds.protocol.records import FDS_CUT, TRUNCATED, Record


class ConnectionState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    SNAPSHOT = "snapshot"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class HelloAccepted:
    """ztunnel said hello (with any version); the snapshot may start."""

    version: int


@dataclass(frozen=True)
class AckReceived:
    """The in-flight request was answered. ``ack.error`` non-empty is a nack."""

    request: Request
    ack: Ack
    latency: float


@dataclass(frozen=True)
class SnapshotComplete:
    """ztunnel acked SnapshotSent: it now holds exactly the snapshot."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection must be closed now; ``reason`` says why (for the log).

    ``request`` is the request that was in flight, if any: it was not acked.
    """

    reason: str
    request: Request | None = None
    peer_gone: bool = False
    #: The peer sent something the protocol does not allow (garbage, a bad hello, an unasked record).
    peer_error: bool = False
    #: The in-flight request's ack deadline passed.
    ack_timeout: bool = False


Event = HelloAccepted | AckReceived | SnapshotComplete | ConnectionClosed


class NodeAgentProtocol:
    """State of one ztunnel connection as the node agent sees it."""

    def __init__(
        self,
        *,
        now: float,
        hello_timeout: float = defaults.HELLO_TIMEOUT,
        ack_timeout: float = defaults.ACK_TIMEOUT,
        keepalive_interval: float = defaults.KEEPALIVE_INTERVAL,
    ) -> None:
        self.state = ConnectionState.AWAITING_HELLO
        self.hello_version: int | None = None
        self.in_flight: Request | None = None
        self.close_reason: str | None = None
        #: Closed because the peer broke the protocol (logged as a warning, with its pid).
        self.peer_error = False
        self._hello_timeout = hello_timeout
        #: How long an ack may take (and a write may wait for room in ztunnel's queue).
        self.ack_timeout = ack_timeout
        self._keepalive_interval = keepalive_interval
        self._hello_deadline = now + hello_timeout
        self._sent_at = 0.0
        self._last_activity = now

    # -- incoming ------------------------------------------------------------
    def receive(self, record: Record, now: float, *, peer_open: bool = False) -> list[Event]:
        """Feed one record that arrived from ztunnel; its fds are closed here
        (ztunnel never sends any, so none is kept). ``peer_open``: a 0-byte record came while
        ztunnel's end is still open (the I/O layer asked the socket): an empty record it sent,
        which ends the connection all the same (ztunnel reads one as EOF), said as such."""
        eof = record.is_eof
        fd_count = len(record.fds)
        record.close_fds()
        if self.state is ConnectionState.CLOSED:
            return []
        self._last_activity = now
        if eof and peer_open:
            return self._close(
                "ztunnel sent an empty record (0 bytes: read as the connection's end, as ztunnel reads one)",
                peer_error=True,
            )
        if eof:
            return self._close("ztunnel closed the connection", peer_gone=True)
        if record.flags & TRUNCATED:
            return self._close(
                f"record from ztunnel exceeds {defaults.MAX_MESSAGE_SIZE} bytes", peer_error=True
            )
        if fd_count or record.flags & FDS_CUT:  # (those that came are closed above)
            said = (
                "file descriptors (more than one, or none free here to take them)"
                if record.flags & FDS_CUT
                else f"{fd_count} file descriptor(s)"
            )
            return self._close(f"ztunnel sent {said}; it never should", peer_error=True)
        if self.state is ConnectionState.AWAITING_HELLO:
            return self._receive_hello(record.payload)
        if self.in_flight is None:
            return self._close("unexpected message from ztunnel while nothing was in flight", peer_error=True)
        return self._receive_ack(record.payload, now)

    def _receive_hello(self, payload: bytes) -> list[Event]:
        try:
            hello = decode_hello(payload)
        except CodecError as exc:
            return self._close(f"bad hello: {exc}", peer_error=True)
        # Any version is taken, as Istio's node agent takes it (ztunnelserver.go handleConn
        # logs it and sends the snapshot); the observer says when it is not V1.
        self.hello_version = hello.version
        self.state = ConnectionState.SNAPSHOT
        return [HelloAccepted(version=hello.version)]

    def _receive_ack(self, payload: bytes, now: float) -> list[Event]:
        request = self.in_flight
        assert request is not None
        try:
            ack = decode_ack(payload)
        except CodecError as exc:
            return self._close(f"bad ack for {request_kind(request)}: {exc}", peer_error=True)
        self.in_flight = None
        events: list[Event] = [AckReceived(request=request, ack=ack, latency=now - self._sent_at)]
        if isinstance(request, SnapshotSent):
            self.state = ConnectionState.READY
            events.append(SnapshotComplete())
        return events

    # -- outgoing ------------------------------------------------------------
    def send(self, request: Request, now: float, *, payload: bytes | None = None) -> bytes:
        """The bytes of ``request``, which is now in flight until its ack arrives.

        ``payload``: ``request`` already encoded (a pod's AddWorkload is encoded
        once, when it is enrolled, not again for every delivery).
        """
        if self.state in (ConnectionState.AWAITING_HELLO, ConnectionState.CLOSED):
            raise ProtocolUsageError(f"cannot send {request_kind(request)} in state {self.state.value}")
        if self.in_flight is not None:
            raise ProtocolUsageError(
                f"cannot send {request_kind(request)}: "
                f"{request_kind(self.in_flight)} is still awaiting its ack"
            )
        if isinstance(request, KeepWorkload | SnapshotSent) and self.state is not ConnectionState.SNAPSHOT:
            # ztunnel answers these outside a snapshot with a ProtocolError and stops for good.
            raise ProtocolUsageError(f"{request_kind(request)} is only valid during the snapshot")
        if payload is None:
            payload = encode_request(request)
        if isinstance(request, AddWorkload) and len(payload) > defaults.MAX_MESSAGE_SIZE:
            raise ProtocolUsageError(
                f"AddWorkload for {request.uid!r} is {len(payload)} bytes; ztunnel reads at most "
                f"{defaults.MAX_MESSAGE_SIZE}"
            )
        self.in_flight = request
        self._sent_at = now
        self._last_activity = now
        return payload

    def sent_unchecked(self, request: Request, now: float) -> None:
        """``request`` was written without ``send``'s checks (a fault injected on purpose,
        ``zds fault``): it is in flight until its ack, like any other."""
        if self.state is ConnectionState.CLOSED or self.in_flight is not None:
            raise ProtocolUsageError(
                f"cannot put {request_kind(request)} in flight in state {self.state.value}"
            )
        self.in_flight = request
        self._sent_at = now
        self._last_activity = now

    # -- time ----------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When ``handle_timeout`` must next be called (None: no deadline pending)."""
        if self.state is ConnectionState.AWAITING_HELLO:
            return self._hello_deadline
        if self.in_flight is not None:
            return self._sent_at + self.ack_timeout
        return None

    def handle_timeout(self, now: float) -> list[Event]:
        """Close the connection if the hello or the in-flight ack is overdue."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline or self.state is ConnectionState.CLOSED:
            return []
        if self.state is ConnectionState.AWAITING_HELLO:
            return self._close(f"no hello from ztunnel within {self._hello_timeout:g}s")
        assert self.in_flight is not None
        return self._close(
            f"no ack for {request_kind(self.in_flight)} within {self.ack_timeout:g}s; "
            "a late ack would be mistaken for the next one's",
            ack_timeout=True,
        )

    def keepalive_due(self, now: float) -> bool:
        """Nothing happened for the keepalive interval: probe the connection."""
        return (
            self.state in (ConnectionState.SNAPSHOT, ConnectionState.READY)
            and self.in_flight is None
            and now - self._last_activity >= self._keepalive_interval
        )

    def keepalive_probed(self, now: float) -> None:
        """The probe found the connection alive (nothing to read, no EOF)."""
        self._last_activity = now

    def close(self, reason: str) -> list[Event]:
        """Close from our side (shutdown, write error)."""
        return self._close(reason)

    def _close(
        self, reason: str, *, peer_gone: bool = False, ack_timeout: bool = False, peer_error: bool = False
    ) -> list[Event]:
        if self.state is ConnectionState.CLOSED:
            return []
        request, self.in_flight = self.in_flight, None
        self.state = ConnectionState.CLOSED
        self.close_reason = reason
        self.peer_error = peer_error
        return [
            ConnectionClosed(
                reason=reason,
                request=request,
                peer_gone=peer_gone,
                ack_timeout=ack_timeout,
                peer_error=peer_error,
            )
        ]


class AcceptLimiter:
    """Token bucket for accepting ztunnel connections (Istio: 5 a second, burst 1)."""

    def __init__(self, rate: float = defaults.ACCEPTS_PER_SECOND, burst: int = 1) -> None:
        self._interval = 1.0 / rate
        self._burst = burst
        self._tokens = float(burst)
        self._updated: float | None = None

    def _refill(self, now: float) -> None:
        if self._updated is None:
            self._updated = now
        self._tokens = min(self._burst, self._tokens + (now - self._updated) / self._interval)
        self._updated = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next accept; 0 means accept now (and take a token)."""
        self._refill(now)
        if self._tokens >= 1.0 - 1e-9:  # tolerate float drift at exact multiples
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) * self._interval
