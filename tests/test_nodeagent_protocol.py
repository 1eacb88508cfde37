"""The node agent's connection state machine, without any socket."""

from __future__ import annotations

import os
import socket

import pytest

from zds.errors import ProtocolUsageError
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    encode_ack,
    encode_hello,
    encode_request,
)
from zds.protocol.nodeagent import (
    AcceptLimiter,
    AckReceived,
    ConnectionClosed,
    ConnectionState,
    HelloAccepted,
    NodeAgentProtocol,
    SnapshotComplete,
)
from zds.protocol.records import Record

INFO = WorkloadInfo(name="productpage", namespace="bookinfo", service_account="bookinfo-productpage")
ADD = AddWorkload(uid="u1", info=INFO)


def rec(payload: bytes, fds: list[int] | None = None, truncated: bool = False) -> Record:
    return Record(payload=payload, fds=fds or [], flags=socket.MSG_TRUNC if truncated else 0)


def ready_protocol(now: float = 0.0) -> NodeAgentProtocol:
    """A connection past hello and snapshot."""
    p = NodeAgentProtocol(now=now)
    assert p.receive(rec(encode_hello()), now) == [HelloAccepted(version=1)]
    p.send(SnapshotSent(), now)
    p.receive(rec(encode_ack(Ack())), now)
    assert p.state is ConnectionState.READY
    return p


def state_now(p: NodeAgentProtocol) -> ConnectionState:
    """``p.state``, read through a call: mypy would otherwise keep an asserted state
    across ``receive()`` and call the next assertion unreachable."""
    return p.state


def test_v1_hello_starts_the_snapshot() -> None:
    p = NodeAgentProtocol(now=0)
    assert state_now(p) is ConnectionState.AWAITING_HELLO
    assert p.receive(rec(bytes.fromhex("0801")), 1) == [HelloAccepted(version=1)]
    assert state_now(p) is ConnectionState.SNAPSHOT


@pytest.mark.parametrize(
    ("payload", "version"), [(bytes.fromhex("0800"), 0), (encode_hello(Hello(version=7)), 7)]
)
def test_a_hello_of_any_version_starts_the_snapshot_as_istio_takes_it(payload: bytes, version: int) -> None:
    """Istio's node agent (ztunnelserver.go handleConn) logs the version and sends the
    snapshot; zds closed the connection: a conformance check against Istio's server saw it."""
    p = NodeAgentProtocol(now=0)
    assert p.receive(rec(payload), 0) == [HelloAccepted(version=version)]
    assert p.state is ConnectionState.SNAPSHOT and p.hello_version == version


def test_a_hello_that_does_not_parse_closes_the_connection() -> None:
    p = NodeAgentProtocol(now=0)
    [event] = p.receive(rec(b"\x08"), 0)
    assert isinstance(event, ConnectionClosed)
    assert "bad hello" in event.reason
    assert p.state is ConnectionState.CLOSED
    assert event.peer_error and p.peer_error  # (the node agent's warning, with the peer's pid)


def test_no_hello_within_the_timeout_closes_the_connection() -> None:
    p = NodeAgentProtocol(now=100, hello_timeout=5)
    assert p.next_deadline() == 105
    assert p.handle_timeout(104.9) == []
    [event] = p.handle_timeout(105)
    assert isinstance(event, ConnectionClosed)
    assert "no hello" in event.reason


def test_nothing_may_be_sent_before_the_hello() -> None:
    p = NodeAgentProtocol(now=0)
    with pytest.raises(ProtocolUsageError):
        p.send(ADD, 0)


def test_snapshot_add_keep_then_snapshot_sent_completes() -> None:
    p = NodeAgentProtocol(now=0)
    p.receive(rec(encode_hello()), 0)
    assert p.send(ADD, 1) == encode_request(ADD)
    [acked] = p.receive(rec(encode_ack(Ack())), 2)
    assert acked == AckReceived(request=ADD, ack=Ack(), latency=1)
    p.send(KeepWorkload(uid="u2"), 3)
    [acked] = p.receive(rec(encode_ack(Ack())), 3)
    assert isinstance(acked, AckReceived) and acked.request == KeepWorkload(uid="u2")
    p.send(SnapshotSent(), 4)
    events = p.receive(rec(encode_ack(Ack())), 4)
    assert events == [AckReceived(request=SnapshotSent(), ack=Ack(), latency=0), SnapshotComplete()]
    assert p.state is ConnectionState.READY


def test_only_one_request_is_in_flight() -> None:
    p = ready_protocol()
    p.send(ADD, 0)
    with pytest.raises(ProtocolUsageError, match="still awaiting its ack"):
        p.send(DelWorkload(uid="u1"), 0)
    p.receive(rec(encode_ack(Ack())), 0)
    p.send(DelWorkload(uid="u1"), 0)  # allowed once the ack is in


def test_acks_correlate_with_the_request_in_flight_in_order() -> None:
    p = ready_protocol()
    p.send(ADD, 0)
    [first] = p.receive(rec(encode_ack(Ack(error="failure to start proxy : boom"))), 1)
    assert isinstance(first, AckReceived)
    assert first.request == ADD and first.ack.error == "failure to start proxy : boom"
    p.send(DelWorkload(uid="u1"), 2)
    [second] = p.receive(rec(encode_ack(Ack())), 3)
    assert isinstance(second, AckReceived) and second.request == DelWorkload(uid="u1") and second.ack.ok


def test_a_nack_keeps_the_connection_open() -> None:
    p = ready_protocol()
    p.send(ADD, 0)
    p.receive(rec(encode_ack(Ack(error="nope"))), 0)
    assert p.state is ConnectionState.READY


def test_an_ack_timeout_closes_the_connection_and_reports_the_request() -> None:
    p = ready_protocol(now=10)
    p.send(ADD, 10)
    assert p.next_deadline() == 15
    assert p.handle_timeout(14) == []
    [event] = p.handle_timeout(15)
    assert isinstance(event, ConnectionClosed)
    assert event.request == ADD and "no ack for add within 5s" in event.reason
    assert event.ack_timeout and not event.peer_error and not p.peer_error
    # A late ack cannot be mistaken for anything now.
    assert p.receive(rec(encode_ack(Ack())), 16) == []


def test_keep_and_snapshot_sent_are_refused_after_the_snapshot() -> None:
    p = ready_protocol()
    for request in (KeepWorkload(uid="u"), SnapshotSent()):
        with pytest.raises(ProtocolUsageError, match="only valid during the snapshot"):
            p.send(request, 0)


def test_an_add_over_1024_bytes_is_refused() -> None:
    p = ready_protocol()
    big = AddWorkload(uid="u" * 1100, info=INFO)
    with pytest.raises(ProtocolUsageError, match="at most 1024"):
        p.send(big, 0)
    assert p.in_flight is None


def test_unexpected_message_while_idle_closes_the_connection() -> None:
    p = ready_protocol()
    [event] = p.receive(rec(encode_ack(Ack())), 0)
    assert isinstance(event, ConnectionClosed) and "unexpected message" in event.reason
    assert event.peer_error and p.peer_error


def test_eof_means_the_peer_is_gone() -> None:
    p = ready_protocol()
    p.send(ADD, 0)
    [event] = p.receive(rec(b""), 0)
    assert isinstance(event, ConnectionClosed) and event.peer_gone and event.request == ADD
    assert not event.peer_error and not p.peer_error  # (gone is not a broken protocol)


@pytest.mark.parametrize(
    ("with_fd", "truncated", "reason"),
    [(True, False, "file descriptor"), (False, True, "exceeds 1024")],
)
def test_fds_or_oversized_records_from_ztunnel_close_the_connection(
    with_fd: bool, truncated: bool, reason: str
) -> None:
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)] if with_fd else []
    record = rec(encode_ack(Ack()) if with_fd else b"x" * 10, list(fds), truncated=truncated)
    p = ready_protocol()
    p.send(ADD, 0)
    [event] = p.receive(record, 0)
    assert isinstance(event, ConnectionClosed) and reason in event.reason
    assert event.peer_error and p.peer_error
    for fd in fds:  # the protocol closed what came with the record
        with pytest.raises(OSError):
            os.fstat(fd)


def test_more_fds_than_a_record_is_read_with_are_said_as_fds_not_as_its_size() -> None:
    """A 2-byte ack with 3 fds comes with MSG_CTRUNC and the one there was room for: it was
    said to exceed 1024 bytes."""
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)]
    p = ready_protocol()
    p.send(ADD, 0)
    [event] = p.receive(Record(payload=encode_ack(Ack()), fds=list(fds), flags=socket.MSG_CTRUNC), 0)
    assert isinstance(event, ConnectionClosed)
    assert event.reason.endswith(
        "ztunnel sent file descriptors (more than one, or none free here to take them); it never should"
    )
    assert event.peer_error and p.peer_error
    with pytest.raises(OSError):
        os.fstat(fds[0])


def test_undecodable_ack_closes_the_connection() -> None:
    p = ready_protocol()
    p.send(ADD, 0)
    [event] = p.receive(rec(b"\x0a\xff"), 0)
    assert isinstance(event, ConnectionClosed) and "bad ack for add" in event.reason
    assert event.peer_error and p.peer_error


def test_keepalive_is_due_only_when_idle_for_the_interval() -> None:
    p = NodeAgentProtocol(now=0, keepalive_interval=5)
    assert not p.keepalive_due(100)  # no hello yet
    p.receive(rec(encode_hello()), 0)
    assert not p.keepalive_due(4.9)
    assert p.keepalive_due(5)
    p.keepalive_probed(5)
    assert not p.keepalive_due(9)
    p.send(ADD, 9)
    assert not p.keepalive_due(100)  # something is in flight: the ack timeout watches it


def test_accept_limiter_allows_five_a_second_with_burst_one() -> None:
    """By default, as Istio's node agent (rate.NewLimiter(5, 1))."""
    limiter = AcceptLimiter()
    assert limiter.delay(0.0) == 0
    assert limiter.delay(0.0) == pytest.approx(0.2)
    assert limiter.delay(0.1) == pytest.approx(0.1)
    assert limiter.delay(0.2) == 0
    fresh = AcceptLimiter()
    accepted = [i for i in range(100) if fresh.delay(i * 0.01) == 0]
    assert accepted == [0, 20, 40, 60, 80]  # one second of attempts every 10 ms
