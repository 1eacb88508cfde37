"""Properties of the node agent's side of one connection (``NodeAgentProtocol``) and of
the accept rate limit (``AcceptLimiter``), under any interleaving and any clock.

A rule-based machine sends, receives and lets time pass at random and holds the
protocol to a small model of Istio's rules: one request in flight, acks
correlate to it, the deadlines ``next_deadline`` gives are the ones that close
the connection, every fd that arrives is closed, and a closed connection stays
closed and says nothing more.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.harness import is_open
from zds.errors import CodecError, ProtocolUsageError
from zds.protocol.messages import (
    VERSION_V1,
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    decode_hello,
    encode_ack,
    encode_hello,
    encode_request,
)
from zds.protocol.nodeagent import (
    AcceptLimiter,
    AckReceived,
    ConnectionClosed,
    ConnectionState,
    Event,
    HelloAccepted,
    NodeAgentProtocol,
    SnapshotComplete,
)
from zds.protocol.records import Record

MACHINE_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

UIDS = st.sampled_from(["pod-a", "pod-b", "pod-c"])
INFO = WorkloadInfo(name="productpage-v1", namespace="bookinfo", service_account="bookinfo-productpage")
REQUESTS: st.SearchStrategy[Request] = st.one_of(
    st.builds(AddWorkload, uid=UIDS, info=st.just(INFO)),
    st.builds(KeepWorkload, uid=UIDS),
    st.builds(DelWorkload, uid=UIDS),
    st.just(SnapshotSent()),
)

#: What ztunnel might send: hellos (good, other versions), acks, nacks, garbage, EOF.
PAYLOADS = st.one_of(
    st.just(encode_hello()),
    st.builds(lambda v: encode_hello(Hello(version=v)), st.integers(min_value=0, max_value=3)),
    st.just(encode_ack(Ack())),
    st.builds(lambda e: encode_ack(Ack(error=e)), st.text(max_size=12)),
    st.binary(max_size=16),
    st.just(b""),
)
FLAGS = st.sampled_from([0, 0, 0, socket.MSG_TRUNC, socket.MSG_CTRUNC, socket.MSG_TRUNC | socket.MSG_CTRUNC])
#: Time steps: mostly small, sometimes past any timeout.
DELAYS = st.one_of(st.floats(min_value=0.0, max_value=2.0), st.floats(min_value=0.0, max_value=12.0))


@dataclass
class Model:
    """What the node agent's rules say the connection is."""

    state: ConnectionState
    hello_deadline: float
    last_activity: float
    in_flight: Request | None = None
    sent_at: float = 0.0


class NodeAgentMachine(RuleBasedStateMachine):
    """Random send/receive/timeout interleavings against a model of the rules."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.proto = NodeAgentProtocol(now=self.now)
        self.model = Model(ConnectionState.AWAITING_HELLO, hello_deadline=5.0, last_activity=0.0)
        self.hello_timeout = 5.0
        self.ack_timeout = 5.0
        self.keepalive_interval = 5.0

    @initialize(
        start=st.floats(min_value=0.0, max_value=1e6),
        hello_timeout=st.sampled_from([0.5, 5.0]),
        ack_timeout=st.sampled_from([0.5, 5.0]),
        keepalive=st.sampled_from([1.0, 5.0]),
        hello=st.sampled_from([True, True, True, False]),
    )
    def connect(
        self, start: float, hello_timeout: float, ack_timeout: float, keepalive: float, hello: bool
    ) -> None:
        self.now = start
        self.hello_timeout, self.ack_timeout, self.keepalive_interval = hello_timeout, ack_timeout, keepalive
        self._new_connection(hello)

    def _new_connection(self, hello: bool) -> None:
        self.proto = NodeAgentProtocol(
            now=self.now,
            hello_timeout=self.hello_timeout,
            ack_timeout=self.ack_timeout,
            keepalive_interval=self.keepalive_interval,
        )
        self.model = Model(
            ConnectionState.AWAITING_HELLO,
            hello_deadline=self.now + self.hello_timeout,
            last_activity=self.now,
        )
        if hello:
            self._receive_clean(encode_hello())

    @precondition(lambda self: self.model.state is ConnectionState.CLOSED)
    @rule(hello=st.sampled_from([True, True, True, False]))
    def next_connection(self, hello: bool) -> None:
        # A closed connection is done with; ztunnel reconnects on a new one.
        self._new_connection(hello)

    # -- the model -------------------------------------------------------------------
    def _expect_closed(
        self, events: list[Event], *, peer_gone: bool = False, ack_timeout: bool = False
    ) -> None:
        assert len(events) == 1, events
        closed = events[0]
        assert isinstance(closed, ConnectionClosed)
        # The request in flight, unacked, is handed back with the close.
        assert closed.request == self.model.in_flight
        assert closed.peer_gone == peer_gone
        assert closed.ack_timeout == ack_timeout
        assert closed.reason
        event(f"closed in {self.model.state.value}" + (" on ack timeout" if ack_timeout else ""))
        self.model.state = ConnectionState.CLOSED
        self.model.in_flight = None

    def _expected_deadline(self) -> float | None:
        if self.model.state is ConnectionState.AWAITING_HELLO:
            return self.model.hello_deadline
        if self.model.in_flight is not None:
            return self.model.sent_at + self.ack_timeout
        return None

    # -- time ------------------------------------------------------------------------
    @rule(delay=DELAYS)
    def time_passes(self, delay: float) -> None:
        self.now += delay

    @rule()
    def handle_timeout(self) -> None:
        events = self.proto.handle_timeout(self.now)
        deadline = self._expected_deadline()
        if deadline is None or self.now < deadline or self.model.state is ConnectionState.CLOSED:
            assert events == []
            return
        self._expect_closed(events, ack_timeout=self.model.state is not ConnectionState.AWAITING_HELLO)

    @rule()
    def wait_for_the_deadline_next_deadline_gives(self) -> None:
        deadline = self.proto.next_deadline()
        if deadline is None:
            assert self.proto.handle_timeout(self.now + 1e6) == []
            return
        just_before = deadline - max(1e-3, abs(deadline) * 1e-12)
        if just_before > self.now:
            assert self.proto.handle_timeout(just_before) == []
        self.now = max(self.now, deadline)
        events = self.proto.handle_timeout(self.now)
        self._expect_closed(events, ack_timeout=self.model.state is not ConnectionState.AWAITING_HELLO)

    # -- outgoing --------------------------------------------------------------------
    @rule(request=REQUESTS)
    def send(self, request: Request) -> None:
        allowed = (
            self.model.state in (ConnectionState.SNAPSHOT, ConnectionState.READY)
            and self.model.in_flight is None
            and not (
                isinstance(request, KeepWorkload | SnapshotSent)
                and self.model.state is not ConnectionState.SNAPSHOT
            )
        )
        if not allowed:
            before = (self.proto.state, self.proto.in_flight, self.proto.next_deadline())
            with pytest.raises(ProtocolUsageError):
                self.proto.send(request, self.now)
            # A refused send changes nothing.
            assert (self.proto.state, self.proto.in_flight, self.proto.next_deadline()) == before
            return
        assert self.proto.send(request, self.now) == encode_request(request)
        self.model.in_flight = request
        self.model.sent_at = self.now
        self.model.last_activity = self.now

    @rule(request=st.builds(AddWorkload, uid=UIDS, info=st.just(INFO)))
    def send_an_add_already_encoded(self, request: AddWorkload) -> None:
        if self.model.state not in (ConnectionState.SNAPSHOT, ConnectionState.READY) or self.model.in_flight:
            return
        payload = encode_request(request)
        assert self.proto.send(request, self.now, payload=payload) is payload
        self.model.in_flight = request
        self.model.sent_at = self.now
        self.model.last_activity = self.now

    @rule()
    def keepalive(self) -> None:
        due = (
            self.model.state in (ConnectionState.SNAPSHOT, ConnectionState.READY)
            and self.model.in_flight is None
            and self.now - self.model.last_activity >= self.keepalive_interval
        )
        assert self.proto.keepalive_due(self.now) == due
        if due:
            self.proto.keepalive_probed(self.now)
            self.model.last_activity = self.now
            assert not self.proto.keepalive_due(self.now)

    @rule()
    def close_from_our_side(self) -> None:
        events = self.proto.close("shutting down")
        if self.model.state is ConnectionState.CLOSED:
            assert events == []
            return
        self._expect_closed(events)

    # -- incoming --------------------------------------------------------------------
    @rule(payload=PAYLOADS, fd_count=st.sampled_from([0, 0, 0, 1, 2]), flags=FLAGS)
    def receive(self, payload: bytes, fd_count: int, flags: int) -> None:
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(fd_count)]
        record = Record(payload=payload, fds=list(fds), flags=flags)
        eof = record.is_eof
        events = self.proto.receive(record, self.now)
        # Whatever the record was and whatever state the connection is in, its fds are closed.
        assert record.fds == []
        assert not any(is_open(fd) for fd in fds)
        self._check_receive(events, payload, fd_count, flags, eof)

    @precondition(lambda self: self.model.state is ConnectionState.AWAITING_HELLO)
    @rule(version=st.sampled_from([VERSION_V1, VERSION_V1, VERSION_V1, 0, 2]))
    def ztunnel_says_hello(self, version: int) -> None:
        self._receive_clean(encode_hello(Hello(version=version)))

    @precondition(lambda self: self.model.in_flight is not None)
    @rule(error=st.one_of(st.just(""), st.text(max_size=12)))
    def ztunnel_answers(self, error: str) -> None:
        self._receive_clean(encode_ack(Ack(error=error)))

    def _receive_clean(self, payload: bytes) -> None:
        record = Record(payload=payload)
        eof = record.is_eof  # a hello for version 0 encodes to nothing: EOF on the wire
        self._check_receive(self.proto.receive(record, self.now), payload, 0, 0, eof)

    def _check_receive(
        self, events: list[Event], payload: bytes, fd_count: int, flags: int, eof: bool
    ) -> None:
        model = self.model
        if model.state is ConnectionState.CLOSED:
            assert events == []
            return
        model.last_activity = self.now
        if eof:
            self._expect_closed(events, peer_gone=True)
        elif flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or fd_count:
            self._expect_closed(events)
        elif model.state is ConnectionState.AWAITING_HELLO:
            try:
                version = decode_hello(payload).version
            except CodecError:
                self._expect_closed(events)
                return
            # Any version that parses, as Istio's node agent takes it (served as V1).
            assert events == [HelloAccepted(version=version)]
            model.state = ConnectionState.SNAPSHOT
        elif model.in_flight is None:
            # ztunnel never speaks unprompted.
            self._expect_closed(events)
        else:
            try:
                ack = decode_ack(payload)
            except CodecError:
                self._expect_closed(events)
                return
            request = model.in_flight
            expected: list[Event] = [AckReceived(request=request, ack=ack, latency=self.now - model.sent_at)]
            if isinstance(request, SnapshotSent):
                expected.append(SnapshotComplete())
                model.state = ConnectionState.READY
            assert events == expected
            event("ack received" + (" (snapshot complete)" if len(expected) > 1 else ""))
            model.in_flight = None

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def state_matches_the_model(self) -> None:
        assert self.proto.state is self.model.state
        assert self.proto.in_flight == self.model.in_flight
        assert self.proto.next_deadline() == self._expected_deadline()
        if self.model.state is ConnectionState.CLOSED:
            assert self.proto.close_reason
            assert self.proto.next_deadline() is None
            assert not self.proto.keepalive_due(self.now + 1e9)

    @invariant()
    def at_most_one_request_is_in_flight(self) -> None:
        if self.proto.in_flight is not None:
            with pytest.raises(ProtocolUsageError):
                self.proto.send(DelWorkload(uid="another"), self.now)
            assert self.proto.in_flight == self.model.in_flight


TestNodeAgentProtocol = NodeAgentMachine.TestCase
TestNodeAgentProtocol.settings = MACHINE_SETTINGS


# -- the accept rate limit -----------------------------------------------------------


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=5),
    start=st.floats(min_value=0.0, max_value=1e4),
    gaps=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=60),
)
def test_accept_limiter_never_allows_more_than_rate_times_window_plus_burst(
    rate: float, burst: int, start: float, gaps: list[float]
) -> None:
    limiter = AcceptLimiter(rate=rate, burst=burst)
    now = start
    accepted: list[float] = []
    for gap in gaps:
        now += gap
        delay = limiter.delay(now)
        assert delay >= 0.0
        assert delay <= 1.0 / rate + 1e-9
        if delay == 0.0:
            accepted.append(now)
    assert accepted, "the first accept is never delayed"
    assert accepted[0] == start + gaps[0]
    for i, first in enumerate(accepted):
        for j in range(i, len(accepted)):
            window = accepted[j] - first
            assert j - i + 1 <= rate * window + burst + 1e-6, (first, accepted[j])


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=5),
    start=st.floats(min_value=0.0, max_value=1e4),
    accepts=st.integers(min_value=1, max_value=30),
)
def test_waiting_the_delay_the_limiter_asks_for_is_enough(
    rate: float, burst: int, start: float, accepts: int
) -> None:
    limiter = AcceptLimiter(rate=rate, burst=burst)
    now = start
    for _ in range(accepts):
        delay = limiter.delay(now)
        if delay > 0.0:
            now += delay
            assert limiter.delay(now) == 0.0
