"""The ztunnel-role state machine (zds.protocol.ztunnel), without sockets.

Real fds stand in for netns fds: the state machine only identifies them by
``(st_dev, st_ino)`` (a dup or a reopen of the same file is "the same netns",
two pipes are two netns) and must close each one exactly when ztunnel would.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Hashable, Iterator

import pytest

from tests.harness import is_open, wire_vector
from zds.errors import ProtocolUsageError
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    encode_request,
)
from zds.protocol.records import Record
from zds.protocol.workloads import (
    CloseConnection,
    Event,
    SendReply,
    SnapshotReconciled,
    StartProxy,
    StopProxy,
    WorkloadState,
)
from zds.protocol.ztunnel import ConnectionState, ZtunnelProtocol, fstat_identity

INFO = WorkloadInfo(name="productpage-v1", namespace="bookinfo", service_account="bookinfo-productpage")


golden = wire_vector


class Netns:
    """Hands out fds that look like distinct network namespaces (one pipe each)."""

    def __init__(self) -> None:
        self._keep: list[int] = []
        #: fd handed out -> the fd this helper keeps of the same "netns" (the protocol may close
        #: the one it was given: a workload whose proxy is up hands its netns to the proxy).
        self._origin: dict[int, int] = {}

    def new(self) -> int:
        """An fd of a fresh "netns"."""
        r, w = os.pipe()
        self._keep += [r, w]
        fd = os.dup(r)
        self._origin[fd] = r
        return fd

    def same_as(self, fd: int) -> int:
        """Another fd to the same "netns" as ``fd`` (which may be closed by now)."""
        twin = os.dup(self._origin.get(fd, fd))
        self._origin[twin] = self._origin.get(fd, fd)
        return twin

    def identity(self, fd: int) -> Hashable:
        """The identity the protocol saw for ``fd`` (which may be closed by now)."""
        return fstat_identity(self._origin.get(fd, fd))

    def close(self) -> None:
        for fd in self._keep:
            os.close(fd)


@pytest.fixture
def netns() -> Iterator[Netns]:
    n = Netns()
    yield n
    n.close()


@pytest.fixture
def proto() -> Iterator[ZtunnelProtocol]:
    p = ZtunnelProtocol()
    yield p
    p.drain()


def add(uid: str, info: WorkloadInfo | None = INFO) -> bytes:
    return encode_request(AddWorkload(uid=uid, info=info))


def req(r: Request) -> bytes:
    return encode_request(r)


def replies(events: list[Event]) -> list[Ack]:
    return [decode_ack(e.data) for e in events if isinstance(e, SendReply)]


def only_reply(events: list[Event]) -> Ack:
    acks = replies(events)
    assert len(acks) == 1, events
    return acks[0]


def start_ok(proto: ZtunnelProtocol, uid: str, fd: int) -> list[Event]:
    """Feed an Add, start its proxy successfully, return every event."""
    events = proto.receive(Record(add(uid), [fd]))
    starts = [e for e in events if isinstance(e, StartProxy)]
    assert [s.workload.uid for s in starts] == [uid], events
    return events + proto.proxy_started(uid)


def snapshot(proto: ZtunnelProtocol) -> list[Event]:
    events = proto.receive(Record(req(SnapshotSent())))
    assert only_reply(events) == Ack()
    return events


def stopped(events: list[Event]) -> list[str]:
    return [e.uid for e in events if isinstance(e, StopProxy)]


# -- hello and wire ---------------------------------------------------------------


def test_a_connection_starts_with_the_v1_hello() -> None:
    proto = ZtunnelProtocol()
    assert proto.connection_made() == golden("hello_v1") == b"\x08\x01"
    assert proto.state is ConnectionState.SNAPSHOT


def test_golden_add_starts_a_proxy_and_is_acked_with_golden_bytes(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd = netns.new()
    events = proto.receive(Record(golden("add"), [fd]))
    assert len(events) == 1 and isinstance(events[0], StartProxy)
    w = events[0].workload
    assert (w.uid, w.info, w.netns_fd, w.state) == ("pod-uid-1", INFO, fd, WorkloadState.STARTING)
    reply = proto.proxy_started("pod-uid-1")
    assert [e.data for e in reply if isinstance(e, SendReply)] == [golden("ack_ok")]
    assert proto.workloads["pod-uid-1"].state is WorkloadState.UP


def test_nothing_can_be_received_before_the_hello(netns: Netns) -> None:
    proto = ZtunnelProtocol()
    fd = netns.new()
    with pytest.raises(ProtocolUsageError):
        proto.receive(Record(add("a"), [fd]))
    assert not is_open(fd)


# -- snapshot -------------------------------------------------------------------------


def test_snapshot_adds_are_up_and_ready_after_snapshot_sent(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    start_ok(proto, "a", netns.new())
    start_ok(proto, "b", netns.new())
    assert not proto.ready, "not ready before SnapshotSent"
    events = snapshot(proto)
    assert [e for e in events if isinstance(e, SnapshotReconciled)] == [SnapshotReconciled(removed=())]
    assert proto.ready
    assert {uid: w.state for uid, w in proto.workloads.items()} == {
        "a": WorkloadState.UP,
        "b": WorkloadState.UP,
    }


def test_a_new_snapshot_drops_exactly_the_workloads_it_does_not_name(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd_a, fd_b, fd_c = netns.new(), netns.new(), netns.new()
    for uid, fd in (("a", fd_a), ("b", fd_b), ("c", fd_c)):
        start_ok(proto, uid, fd)
    snapshot(proto)
    proto.connection_lost()
    assert not proto.ready

    proto.connection_made()
    # b comes again in the same netns: a no-op, no new proxy.
    dup_b = netns.same_as(fd_b)
    events = proto.receive(Record(add("b"), [dup_b]))
    assert not [e for e in events if isinstance(e, StartProxy)]
    assert only_reply(events) == Ack()
    assert not is_open(dup_b)
    # c is kept without an fd.
    assert only_reply(proto.receive(Record(req(KeepWorkload(uid="c"))))) == Ack()
    events = snapshot(proto)
    assert stopped(events) == ["a"]
    assert SnapshotReconciled(removed=("a",)) in events
    assert sorted(proto.workloads) == ["b", "c"]
    assert not is_open(fd_a)
    # A running proxy holds its netns through its sockets: the protocol keeps no fd for it.
    assert proto.workloads["b"].netns_fd is None and not is_open(fd_b)
    assert proto.workloads["b"].netns_id == netns.identity(fd_b), "the running proxy is the original one"
    assert proto.ready


def test_an_empty_snapshot_drops_everything(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    start_ok(proto, "a", netns.new())
    snapshot(proto)
    proto.connection_lost()
    proto.connection_made()
    assert stopped(snapshot(proto)) == ["a"]
    assert not proto.workloads
    assert proto.ready


def test_del_before_snapshot_only_unmarks_and_the_reconcile_stops_the_proxy(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd = netns.new()
    start_ok(proto, "a", fd)
    snapshot(proto)
    proto.connection_lost()

    proto.connection_made()
    proto.receive(Record(add("a"), [netns.same_as(fd)]))
    events = proto.receive(Record(req(DelWorkload(uid="a"))))
    assert only_reply(events) == Ack()
    assert not stopped(events), "a Del before SnapshotSent does not stop the proxy itself"
    assert proto.workloads["a"].state is WorkloadState.UP
    assert stopped(snapshot(proto)) == ["a"]
    assert not is_open(fd)


def test_del_before_snapshot_forgets_a_pending_start(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    fd = netns.new()
    proto.receive(Record(add("a"), [fd]))
    proto.proxy_failed("a", "port taken")
    assert proto.has_pending
    only_reply(proto.receive(Record(req(DelWorkload(uid="a")))))
    assert "a" not in proto.workloads
    assert not is_open(fd)
    snapshot(proto)
    assert proto.ready


def test_keep_of_an_unknown_uid_is_acked_and_changes_nothing(proto: ZtunnelProtocol) -> None:
    proto.connection_made()
    assert only_reply(proto.receive(Record(req(KeepWorkload(uid="ghost"))))) == Ack()
    snapshot(proto)
    assert not proto.workloads


# -- updates after the snapshot -------------------------------------------------------


def test_del_after_snapshot_stops_the_proxy_and_closes_its_netns(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    snapshot(proto)
    fd = netns.new()
    start_ok(proto, "a", fd)
    events = proto.receive(Record(req(DelWorkload(uid="a"))))
    assert stopped(events) == ["a"]
    assert only_reply(events) == Ack()
    assert not proto.workloads
    assert not is_open(fd)


def test_del_of_an_unknown_uid_is_a_no_op_ack(proto: ZtunnelProtocol) -> None:
    proto.connection_made()
    snapshot(proto)
    events = proto.receive(Record(golden("del")))
    assert events == [e for e in events if isinstance(e, SendReply)]
    assert only_reply(events) == Ack()


def test_re_add_in_the_same_netns_is_a_no_op(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    snapshot(proto)
    fd = netns.new()
    start_ok(proto, "a", fd)
    again = netns.same_as(fd)
    events = proto.receive(Record(add("a"), [again]))
    assert only_reply(events) == Ack()
    assert not [e for e in events if isinstance(e, StartProxy | StopProxy)]
    assert not is_open(again)
    assert proto.workloads["a"].netns_id == netns.identity(fd)


def test_re_add_in_another_netns_replaces_the_proxy(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    snapshot(proto)
    old, new = netns.new(), netns.new()
    start_ok(proto, "a", old)
    events = proto.receive(Record(add("a"), [new]))
    assert stopped(events) == ["a"]
    start = [e for e in events if isinstance(e, StartProxy)]
    assert len(start) == 1 and start[0].workload.netns_fd == new
    assert events.index(next(e for e in events if isinstance(e, StopProxy))) < events.index(start[0])
    assert not is_open(old)
    assert only_reply(proto.proxy_started("a")) == Ack()
    assert proto.workloads["a"].netns_fd is None, "up: the proxy holds the netns now"
    assert proto.workloads["a"].netns_id == netns.identity(new)


# -- proxy start failures ---------------------------------------------------------------


def test_a_proxy_that_cannot_start_is_nacked_pending_and_retried(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd = netns.new()
    proto.receive(Record(add("a"), [fd]))
    nack = only_reply(proto.proxy_failed("a", "Bind([::]:15001, [Errno 98] Address already in use)"))
    assert nack.error == "failure to start proxy : Bind([::]:15001, [Errno 98] Address already in use)"
    assert proto.state is ConnectionState.SNAPSHOT, "the connection stays"
    snapshot(proto)
    w = proto.workloads["a"]
    assert w.state is WorkloadState.PENDING and w.state.admin_name == "Pending"
    assert w.last_error.startswith("Bind(")
    assert proto.has_pending and not proto.ready
    assert is_open(fd), "a pending workload keeps its netns for the retry"

    (retry,) = proto.retry_pending()
    assert retry.retry and retry.workload.netns_fd == fd
    assert proto.proxy_failed("a", "still taken") == [], "a retry owes the node agent nothing"
    assert w.failures == 2
    (retry,) = proto.retry_pending()
    assert proto.proxy_started("a") == []
    assert proto.workloads["a"].state is WorkloadState.UP and not proto.workloads["a"].last_error
    assert proto.ready
    assert proto.retry_pending() == []


def test_a_pending_workload_that_lets_its_netns_go_waits_for_the_node_agent(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    # (the ztunnel side out of fds: pending pods may not take the room a netns fd needs)
    proto.connection_made()
    fd = netns.new()
    proto.receive(Record(add("a"), [fd]))
    nack = only_reply(proto.proxy_failed("a", "fd budget exhausted", release_netns=True))
    assert nack.error == "failure to start proxy : fd budget exhausted"
    w = proto.workloads["a"]
    assert not is_open(fd) and w.netns_fd is None
    assert w.state is WorkloadState.PENDING and proto.has_pending
    assert not proto.has_retryable  # (no retry timer for it)
    assert proto.retry_pending() == [], "nothing to retry with"
    snapshot(proto)
    assert not proto.ready
    proto.connection_lost()
    proto.connection_made()  # the node agent's next snapshot sends it again, with its netns
    again = netns.new()
    start_ok(proto, "a", again)
    assert proto.workloads["a"].state is WorkloadState.UP


def test_pending_workloads_are_forgotten_on_reconnect(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    fd = netns.new()
    proto.receive(Record(add("a"), [fd]))
    proto.proxy_failed("a", "nope")
    proto.connection_lost()
    proto.connection_made()
    assert "a" not in proto.workloads
    assert not is_open(fd)


def test_a_record_cannot_be_fed_while_a_start_is_unreported(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    proto.receive(Record(add("a"), [netns.new()]))
    with pytest.raises(ProtocolUsageError):
        proto.receive(Record(req(SnapshotSent())))
    with pytest.raises(ProtocolUsageError):
        proto.proxy_started("b")
    proto.proxy_started("a")


def test_adding_a_pending_uid_again_retries_with_the_new_fd(proto: ZtunnelProtocol, netns: Netns) -> None:
    proto.connection_made()
    snapshot(proto)
    first, second = netns.new(), netns.new()
    proto.receive(Record(add("a"), [first]))
    proto.proxy_failed("a", "nope")
    events = proto.receive(Record(add("a"), [second]))
    assert [e.workload.netns_fd for e in events if isinstance(e, StartProxy)] == [second]
    assert not is_open(first)
    assert only_reply(proto.proxy_started("a")) == Ack()
    assert proto.ready


# -- read errors: nack, close, reconnect; every fd closed -----------------------------

BAD_RECORDS = {
    "truncated": (
        golden("keep"),
        0,
        socket.MSG_TRUNC,
        "failure to read message : received truncated message",
    ),
    # nix >= 0.29 (ztunnel's 0.31): RecvMsg::cmsgs() is Err(ENOBUFS) on MSG_CTRUNC, before any count
    "ctrunc": (
        golden("add"),
        1,
        socket.MSG_CTRUNC,
        "failure to read message : ENOBUFS: No buffer space available",
    ),
    "ctrunc without fd (EMFILE)": (
        golden("add"),
        0,
        socket.MSG_CTRUNC,
        "failure to read message : ENOBUFS: No buffer space available",
    ),
    "cut bytes and cut fds (the fds first, as ztunnel)": (
        golden("add"),
        1,
        socket.MSG_TRUNC | socket.MSG_CTRUNC,
        "failure to read message : ENOBUFS: No buffer space available",
    ),
    "three fds (two fit)": (
        golden("add"),
        2,
        socket.MSG_CTRUNC,
        "failure to read message : ENOBUFS: No buffer space available",
    ),
    "two fds": (golden("add"), 2, 0, "failure to read message : Expected 1 FD, got 2"),
    "two fds and garbage": (b"\xff\xff", 2, 0, "failure to read message : Expected 1 FD, got 2"),
    "undecodable": (b"\xff", 0, 0, "failure to read message : failed to decode Protobuf message: "),
    "undecodable with fd": (
        b"\x0a\x05ab",
        1,
        0,
        "failure to read message : failed to decode Protobuf message: ",
    ),
    "no payload": (b"\x20\x01", 0, 0, "failure to read message : no payload"),
    # a known field of another wire type: prost fails the message (upb keeps the field aside)
    "add whose workload_info is a varint": (
        bytes.fromhex("0a050a01751001"),
        1,
        0,
        "failure to read message : failed to decode Protobuf message: ",
    ),
    "add without fd": (golden("add"), 0, 0, "failure to read message : No control message"),
    "keep with fd": (golden("keep"), 1, 0, "failure to read message : Unexpected control message"),
    "del with fd": (golden("del"), 1, 0, "failure to read message : Unexpected control message"),
    "snapshot with fd": (
        golden("snapshot_sent"),
        1,
        0,
        "failure to read message : Unexpected control message",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_a_bad_record_is_nacked_closes_the_connection_and_leaks_no_fd(
    proto: ZtunnelProtocol, netns: Netns, kind: str
) -> None:
    payload, nfds, flags, text = BAD_RECORDS[kind]
    proto.connection_made()
    kept = netns.new()
    start_ok(proto, "kept", kept)
    fds = [netns.new() for _ in range(nfds)]
    events = proto.receive(Record(payload, fds, flags))
    nack = only_reply(events)
    assert nack.error.startswith(text), nack.error
    if not text.endswith(": "):
        assert nack.error == text
    assert isinstance(events[-1], CloseConnection)
    assert not events[-1].fatal, "a read error reconnects"
    assert proto.state is ConnectionState.DISCONNECTED
    assert [fd for fd in fds if is_open(fd)] == []
    assert proto.workloads["kept"].state is WorkloadState.UP
    proto.connection_lost()
    assert proto.connection_made() == b"\x08\x01", "the next connection works"


@pytest.mark.parametrize("nfds", [0, 1, 3])
def test_a_zero_byte_record_is_eof_without_a_reply(proto: ZtunnelProtocol, netns: Netns, nfds: int) -> None:
    proto.connection_made()
    fds = [netns.new() for _ in range(nfds)]
    events = proto.receive(Record(b"", fds))
    assert events == [CloseConnection(reason="node agent closed the connection", peer_closed=True)]
    assert [fd for fd in fds if is_open(fd)] == []


def test_a_zero_byte_record_while_the_node_agent_is_there_is_an_empty_record(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd = netns.new()
    (event,) = proto.receive(Record(b"", [fd]), peer_open=True)
    assert isinstance(event, CloseConnection) and not event.peer_closed and not event.fatal
    assert event.reason.startswith("node agent sent an empty record (0 bytes")
    assert not is_open(fd)


# -- protocol errors: nack, close, stop for good -------------------------------------

FATAL = {
    "add without workload_info": (
        [],
        add("a", info=None),
        1,
        'failure to process message : ProtocolError("workload_info is required but not present")',
    ),
    "keep after snapshot": (
        [req(SnapshotSent())],
        golden("keep"),
        0,
        'failure to process message : ProtocolError("pod keep received after snapshot")',
    ),
    "second snapshot": (
        [req(SnapshotSent())],
        golden("snapshot_sent"),
        0,
        'failure to process message : ProtocolError("pod snapshot received already")',
    ),
}


@pytest.mark.parametrize("kind", sorted(FATAL))
def test_a_protocol_error_is_nacked_and_stops_the_manager_for_good(
    proto: ZtunnelProtocol, netns: Netns, kind: str
) -> None:
    before, payload, nfds, text = FATAL[kind]
    proto.connection_made()
    for record in before:
        only_reply(proto.receive(Record(record)))
    fds = [netns.new() for _ in range(nfds)]
    events = proto.receive(Record(payload, fds))
    assert only_reply(events).error == text
    assert isinstance(events[-1], CloseConnection) and events[-1].fatal
    assert proto.state is ConnectionState.STOPPED
    assert proto.fatal_error == text
    assert [fd for fd in fds if is_open(fd)] == []
    proto.connection_lost()
    with pytest.raises(ProtocolUsageError):
        proto.connection_made()


# -- readiness and shutdown -----------------------------------------------------------


def test_readiness_needs_a_connection_and_a_reconciled_snapshot(proto: ZtunnelProtocol, netns: Netns) -> None:
    assert not proto.ready
    proto.connection_made()
    assert not proto.ready
    snapshot(proto)
    assert proto.ready
    proto.connection_lost()
    assert not proto.ready
    proto.connection_made()
    assert not proto.ready, "a new connection is not ready until its own snapshot"
    snapshot(proto)
    assert proto.ready


def test_a_start_interrupted_by_a_lost_connection_is_left_pending(
    proto: ZtunnelProtocol, netns: Netns
) -> None:
    proto.connection_made()
    fd = netns.new()
    proto.receive(Record(add("a"), [fd]))
    proto.connection_lost()
    assert proto.workloads["a"].state is WorkloadState.PENDING
    proto.connection_made()
    assert not is_open(fd)


def test_drain_stops_every_proxy_and_closes_every_fd(netns: Netns) -> None:
    proto = ZtunnelProtocol()
    proto.connection_made()
    fds = [netns.new() for _ in range(3)]
    for i, fd in enumerate(fds):
        start_ok(proto, f"w{i}", fd)
    stops = proto.drain()
    assert sorted(s.uid for s in stops) == ["w0", "w1", "w2"]
    assert [fd for fd in fds if is_open(fd)] == []
    assert not proto.workloads
