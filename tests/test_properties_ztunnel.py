"""Properties of ztunnel's side (``ZtunnelProtocol``) under random records and random callers.

A rule-based machine feeds the protocol records of every kind (well-formed
requests, garbage, EOF; with 0 to 3 real fds: dups of this process's netns,
``/dev/null``, pipes; with and without MSG_TRUNC/MSG_CTRUNC), reports random
outcomes for the proxies it asks to start, and connects, disconnects and
retries at random. Whatever happens:

- every fd handed in is closed exactly once: a live workload's fd is open and is
  the fd it was given; no fd the test still holds is ever closed under it (fd
  numbers the protocol just closed are taken by canaries, which must survive
  the next step); and after draining, no fd handed in remains open;
- every reply's error is empty or starts with one of ztunnel's three prefixes,
  and each says what the model says (read error, protocol error, proxy start);
- exactly one reply per request record, none for the 0-byte EOF;
- a proxy runs exactly when the events said so (StartProxy + proxy_started, until
  a StopProxy), and readiness is: snapshot reconciled and every workload Up;
- the only exception is ProtocolUsageError, for calls the convention forbids.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Hashable

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.harness import is_open, open_fds, wire_vector
from zds.errors import CodecError, ProtocolUsageError
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_request,
    encode_ack,
    encode_request,
)
from zds.protocol.reading import PROCESS_FAILURE, READ_FAILURE, START_FAILURE
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
from zds.protocol.ztunnel import ConnectionState, ZtunnelProtocol

MACHINE_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: This process's own network namespace: openable without root.
SELF_NETNS = "/proc/self/ns/net"
#: How many canary fds take the numbers the protocol may just have closed.
CANARIES = 12

UID_POOL = ["pod-a", "pod-b", "pod-c"]
UIDS = st.sampled_from(UID_POOL)
NAMES = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
INFOS = st.builds(WorkloadInfo, name=NAMES, namespace=NAMES, service_account=NAMES)
ADDS = st.builds(AddWorkload, uid=UIDS, info=INFOS)

#: Well-formed requests; the fatal ones (Keep after the snapshot, a second
#: SnapshotSent) are rarer so that sequences go on long enough to matter.
WELL_FORMED: st.SearchStrategy[Request] = st.one_of(
    ADDS,
    ADDS,
    ADDS,
    st.builds(DelWorkload, uid=UIDS),
    st.builds(DelWorkload, uid=UIDS),
    st.builds(KeepWorkload, uid=UIDS),
    st.just(SnapshotSent()),
)
ANY_REQUEST: st.SearchStrategy[Request] = st.one_of(
    WELL_FORMED, st.builds(AddWorkload, uid=UIDS, info=st.none())
)
PAYLOADS = st.one_of(
    st.builds(encode_request, ANY_REQUEST),
    st.binary(min_size=1, max_size=24),
    st.just(b""),
)
#: netns: a dup of this process's netns (all the same netns); null: /dev/null (not a
#: netns, all the same file); pipe: a new pipe each time (a different "netns" each time).
FD_KINDS = st.sampled_from(["netns", "netns", "pipe", "null"])
FLAGS = st.sampled_from(
    [0, 0, 0, 0, socket.MSG_TRUNC, socket.MSG_CTRUNC, socket.MSG_TRUNC | socket.MSG_CTRUNC]
)
#: What the caller does with a StartProxy right after the record that asked for it.
OUTCOMES = st.sampled_from(["failed", "started", "started", "later"])
PREFIXES = (READ_FAILURE, PROCESS_FAILURE, START_FAILURE)


def identity(fd: int) -> Hashable:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino)


class ZtunnelMachine(RuleBasedStateMachine):
    """Random records, outcomes and reconnects against a model of ztunnel's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.fds_before = open_fds()
        self.netns_fd = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        self.canary_source = os.memfd_create("zds-canary", os.MFD_CLOEXEC)
        self.canary_id = identity(self.canary_source)
        self.canaries: list[int] = []
        self.helpers = {self.netns_fd: identity(self.netns_fd), self.canary_source: self.canary_id}
        self.proto = ZtunnelProtocol()
        # The model.
        self.state = ConnectionState.DISCONNECTED
        self.connected = False  # between connection_made and connection_lost
        self.socket_open = False  # connected, and no CloseConnection yet
        self.snapshot_received = False
        self.marked: set[str] = set()
        self.up: dict[str, Hashable] = {}  # uid -> netns identity, for proxies running
        self.outstanding: dict[str, AddWorkload | None] = {}  # StartProxy not reported; the Add waiting
        self.records = 0  # request records on this connection (not EOF)
        self.replies = 0

    # -- fds -------------------------------------------------------------------------
    def _new_fd(self, kind: str) -> int:
        if kind == "netns":
            return os.dup(self.netns_fd)
        if kind == "null":
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end

    # -- events ----------------------------------------------------------------------
    def _apply(self, events: list[Event]) -> list[SendReply]:
        """Check each event against the model and update it; returns the replies."""
        replies: list[SendReply] = []
        for ev in events:
            match ev:
                case SendReply(ack=ack, data=data):
                    assert data == encode_ack(ack)
                    assert ack.error == "" or ack.error.startswith(PREFIXES), ack.error
                    assert self.socket_open, "a reply on a closed connection"
                    self.replies += 1
                    replies.append(ev)
                case StartProxy(workload=w):
                    assert self.proto.workloads.get(w.uid) is w
                    assert w.state is WorkloadState.STARTING
                    assert w.uid not in self.up
                case StopProxy(uid=uid):
                    assert uid in self.up, f"StopProxy for {uid}, whose proxy is not running"
                    del self.up[uid]
                case SnapshotReconciled(removed=removed):
                    assert not set(removed) & set(self.up)
                    self.snapshot_received = True
                    self.state = ConnectionState.SYNCED
                case CloseConnection(fatal=fatal):
                    assert self.socket_open
                    self.socket_open = False
                    self.state = ConnectionState.STOPPED if fatal else ConnectionState.DISCONNECTED
        return replies

    # -- connection lifecycle ------------------------------------------------------------
    @initialize()
    def connect_first(self) -> None:
        self.connection_made()

    @precondition(
        lambda self: not self.connected and self.state is not ConnectionState.STOPPED and not self.outstanding
    )
    @rule()
    def connection_made(self) -> None:
        assert self.proto.connection_made() == wire_vector("hello_v1")
        self.connected = self.socket_open = True
        self.state = ConnectionState.SNAPSHOT
        self.snapshot_received = False
        self.marked = set()
        self.records = self.replies = 0
        # Pending workloads are forgotten: this connection's snapshot names them again.
        assert all(w.state is WorkloadState.UP for w in self.proto.workloads.values())

    @precondition(lambda self: self.connected)
    @rule()
    def connection_lost(self) -> None:
        self.proto.connection_lost()
        self.connected = self.socket_open = False
        self.outstanding.clear()
        if self.state is not ConnectionState.STOPPED:
            self.state = ConnectionState.DISCONNECTED
        assert not any(w.state is WorkloadState.STARTING for w in self.proto.workloads.values())

    @precondition(lambda self: not self.connected and self.state is ConnectionState.STOPPED)
    @rule()
    def reconnecting_after_a_fatal_error_is_refused(self) -> None:
        with pytest.raises(ProtocolUsageError):
            self.proto.connection_made()

    @precondition(lambda self: not self.connected and bool(self.outstanding))
    @rule()
    def connecting_with_a_start_unreported_is_refused(self) -> None:
        with pytest.raises(ProtocolUsageError):
            self.proto.connection_made()

    # -- records ---------------------------------------------------------------------
    @precondition(lambda self: self.socket_open and not self.outstanding)
    @rule(request=WELL_FORMED, kind=FD_KINDS, outcome=OUTCOMES)
    def receive_a_request(self, request: Request, kind: str, outcome: str) -> None:
        fds = [self._new_fd(kind)] if isinstance(request, AddWorkload) else []
        self._receive(encode_request(request), fds, 0)
        # Like ztunnel, the caller mostly reports a start's outcome at once; sometimes
        # later (a rule of its own), after a retry, or never (the connection goes first).
        if outcome != "later" and isinstance(request, AddWorkload) and request.uid in self.outstanding:
            self._report(request.uid, started=outcome == "started", error="address in use")

    @precondition(lambda self: self.socket_open and not self.outstanding)
    @rule(payload=PAYLOADS, kinds=st.lists(FD_KINDS, max_size=3), flags=FLAGS)
    def receive_any_record(self, payload: bytes, kinds: list[str], flags: int) -> None:
        self._receive(payload, [self._new_fd(k) for k in kinds], flags)

    @precondition(lambda self: not self.socket_open or bool(self.outstanding))
    @rule(payload=PAYLOADS, kinds=st.lists(FD_KINDS, max_size=3))
    def a_record_when_none_may_come_is_refused_and_its_fds_closed(
        self, payload: bytes, kinds: list[str]
    ) -> None:
        fds = [self._new_fd(k) for k in kinds]
        with pytest.raises(ProtocolUsageError):
            self.proto.receive(Record(payload=payload, fds=list(fds)))
        assert not any(is_open(fd) for fd in fds)

    def _receive(self, payload: bytes, fds: list[int], flags: int) -> None:
        expected = self._expect(payload, fds, flags)
        request = self._decoded(payload)
        fd_id = identity(fds[0]) if len(fds) == 1 else None
        existing = self.proto.workloads.get(request.uid) if isinstance(request, AddWorkload) else None
        held_before = set(self.proto.workloads)
        record = Record(payload=payload, fds=list(fds), flags=flags)
        events = self.proto.receive(record)
        assert record.fds == []
        if payload:
            self.records += 1
        replies = self._apply(events)
        event(f"record: {expected}")

        if expected == "eof":
            assert len(events) == 1
            close = events[0]
            assert isinstance(close, CloseConnection)
            assert close.peer_closed
            assert not close.fatal
            assert replies == []
        elif expected in ("read", "process"):
            prefix = READ_FAILURE if expected == "read" else PROCESS_FAILURE
            assert len(events) == 2, events
            assert replies == [events[0]]
            assert replies[0].ack.error.startswith(prefix)
            assert replies[0].request == (request if expected == "process" else None)
            assert isinstance(events[1], CloseConnection)
            assert events[1].fatal == (expected == "process")
            assert not events[1].peer_closed
            assert not any(is_open(fd) for fd in fds)
        elif expected == "start":
            assert isinstance(request, AddWorkload)
            assert replies == [], "an Add is answered once its proxy started or failed"
            start = events[-1]
            assert isinstance(start, StartProxy)
            assert not start.retry
            assert start.workload.uid == request.uid
            assert start.workload.netns_fd == fds[0]
            assert start.workload.netns_id == fd_id
            if existing is not None and existing.state is WorkloadState.UP:
                event("proxy replaced: the netns changed")
                assert events[:-1] == [StopProxy(request.uid, "replaced: the pod's netns changed")]
            else:
                assert len(events) == 1
            self.outstanding[request.uid] = request
            self._mark(request)
        else:  # acked at once
            assert request is not None
            assert replies == [events[-1]]
            assert replies[0].ack == Ack()
            assert replies[0].request == request
            self._check_acked(request, events[:-1], held_before, fds)

    def _check_acked(
        self, request: Request, before: list[Event], held_before: set[str], fds: list[int]
    ) -> None:
        match request:
            case AddWorkload():
                # The same pod in the same netns, already served: a no-op, its new fd closed.
                assert before == []
                assert not is_open(fds[0])
                self._mark(request)
            case KeepWorkload():
                assert before == []
                self.marked.add(request.uid)
            case DelWorkload(uid=uid):
                if self.snapshot_received:
                    assert uid not in self.proto.workloads
                    assert before in ([], [StopProxy(uid, "deleted by the node agent")])
                else:
                    # Before SnapshotSent a Del only unmarks (and forgets a proxy not running).
                    assert before == []
                    self.marked.discard(uid)
                    assert uid not in self.proto.workloads or uid in self.up
            case SnapshotSent():
                removed = tuple(sorted(held_before - self.marked))
                event(f"snapshot reconciled, {len(removed)} removed")
                reconciled = before[-1]
                assert reconciled == SnapshotReconciled(removed=removed)
                assert {s.uid for s in before[:-1] if isinstance(s, StopProxy)} <= set(removed)
                assert set(self.proto.workloads) == held_before - set(removed)
                self.marked = set()

    def _mark(self, request: AddWorkload) -> None:
        if not self.snapshot_received:
            self.marked.add(request.uid)

    @staticmethod
    def _decoded(payload: bytes) -> Request | None:
        try:
            return decode_request(payload)
        except CodecError:
            return None

    def _expect(self, payload: bytes, fds: list[int], flags: int) -> str:
        """What ztunnel's rules say this record gets: eof, read, process, start or ack."""
        if not payload:
            return "eof"
        if len(fds) > 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return "read"
        request = self._decoded(payload)
        if request is None:
            return "read"
        if isinstance(request, AddWorkload) != bool(fds):
            return "read"
        match request:
            case AddWorkload(info=None):
                return "process"
            case KeepWorkload() | SnapshotSent() if self.snapshot_received:
                return "process"
            case AddWorkload(uid=uid):
                same_netns = uid in self.up and self.up[uid] == identity(fds[0])
                return "ack" if same_netns else "start"
        return "ack"

    # -- proxy outcomes and retries --------------------------------------------------
    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data(), started=st.booleans(), error=st.text(max_size=10))
    def report_proxy_outcome(self, data: st.DataObject, started: bool, error: str) -> None:
        self._report(data.draw(st.sampled_from(sorted(self.outstanding)), label="uid"), started, error)

    def _report(self, uid: str, started: bool, error: str) -> None:
        add = self.outstanding.pop(uid)
        workload = self.proto.workloads[uid]
        if started:
            replies = self._apply(self.proto.proxy_started(uid))
            self.up[uid] = workload.netns_id
            assert workload.state is WorkloadState.UP
            expected = [] if add is None else [Ack()]
        else:
            replies = self._apply(self.proto.proxy_failed(uid, error))
            assert workload.state is WorkloadState.PENDING
            expected = [] if add is None else [Ack(START_FAILURE + error)]
        assert [r.ack for r in replies] == expected
        assert [r.request for r in replies] == ([] if add is None else [add])
        event("proxy started" if started else "proxy failed")

    @precondition(lambda self: bool(set(UID_POOL) - set(self.outstanding)))
    @rule(uid=UIDS, started=st.booleans())
    def reporting_a_start_never_asked_for_is_refused(self, uid: str, started: bool) -> None:
        if uid in self.outstanding:
            return
        with pytest.raises(ProtocolUsageError):
            if started:
                self.proto.proxy_started(uid)
            else:
                self.proto.proxy_failed(uid, "no such start")

    @precondition(lambda self: not self.outstanding)
    @rule()
    def retry_pending(self) -> None:
        pending = {uid for uid, w in self.proto.workloads.items() if w.state is WorkloadState.PENDING}
        starts = self.proto.retry_pending()
        if self.state is ConnectionState.STOPPED:
            assert starts == []
            return
        assert {s.workload.uid for s in starts} == pending
        for start in starts:
            assert start.retry
            self._apply([start])
            self.outstanding[start.workload.uid] = None
        if starts:
            event("retried pending proxies")

    @precondition(lambda self: bool(self.outstanding))
    @rule()
    def retrying_with_a_start_unreported_is_refused(self) -> None:
        with pytest.raises(ProtocolUsageError):
            self.proto.retry_pending()

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def each_live_workload_not_up_holds_the_open_fd_it_was_given(self) -> None:
        # A workload whose proxy is up has handed its netns to the proxy's sockets: no fd.
        fds = [w.netns_fd for w in self.proto.workloads.values() if w.netns_fd is not None]
        assert len(set(fds)) == len(fds), "two workloads hold one fd"
        for w in self.proto.workloads.values():
            if w.state is WorkloadState.UP:
                assert w.netns_fd is None, f"{w.uid} is up and still holds fd {w.netns_fd}"
                continue
            assert w.netns_fd is not None and is_open(w.netns_fd), f"{w.uid}'s netns fd was closed under it"
            assert identity(w.netns_fd) == w.netns_id, f"{w.uid}'s fd {w.netns_fd} is another file now"
        for fd, ident in self.helpers.items():
            assert is_open(fd) and identity(fd) == ident, "an fd the protocol never owned was closed"

    @invariant()
    def no_fd_the_protocol_closed_is_closed_again(self) -> None:
        # Canaries placed after the previous step took the lowest free numbers, the
        # ones the protocol had just closed: closing one of those again would hit a canary.
        for fd in self.canaries:
            assert is_open(fd) and identity(fd) == self.canary_id, f"fd {fd} was closed twice"
        # The new canaries first, so that they take the numbers just freed, not the old canaries'.
        old, self.canaries = self.canaries, [os.dup(self.canary_source) for _ in range(CANARIES)]
        for fd in old:
            os.close(fd)

    @invariant()
    def state_and_readiness_match_the_model(self) -> None:
        assert self.proto.state is self.state
        up = {uid for uid, w in self.proto.workloads.items() if w.state is WorkloadState.UP}
        assert up == set(self.up), "a proxy runs (or stopped) without the caller being told"
        for uid, ident in self.up.items():
            assert self.proto.workloads[uid].netns_id == ident
        all_up = len(self.proto.workloads) == len(self.up)
        assert self.proto.ready == (self.state is ConnectionState.SYNCED and all_up)

    @invariant()
    def exactly_one_reply_per_request_record(self) -> None:
        if self.connected:
            waiting = sum(1 for add in self.outstanding.values() if add is not None)
            assert self.replies == self.records - waiting

    def teardown(self) -> None:
        try:
            held = set(self.proto.workloads)
            stops = self.proto.drain()
            assert {s.uid for s in stops} == held
            assert not self.proto.workloads
            if self.connected:
                self.proto.connection_lost()
        finally:
            for fd in [*self.canaries, *self.helpers]:
                with contextlib.suppress(OSError):
                    os.close(fd)
        leaked = open_fds() - self.fds_before
        assert not leaked, f"fds left open: {sorted(leaked)}"


TestZtunnelProtocol = ZtunnelMachine.TestCase
TestZtunnelProtocol.settings = MACHINE_SETTINGS
