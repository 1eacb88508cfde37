"""ztunnel's side of the ZDS connection, sans-I/O.

One object for the life of the process: the workloads it holds outlive any
one connection to the node agent (a reconnect must not disturb a pod that is
still enrolled). The caller tells it when a connection starts
(``connection_made``, which returns the hello), feeds it every record that
arrives (``receive``) and gets back events: the reply to send, a proxy to
start or stop, the connection to close. It opens no socket and reads no
clock; starting a proxy is the caller's job, reported back with
``proxy_started`` / ``proxy_failed``.

The rules are ztunnel's (``src/inpod/protocol.rs``, ``statemanager.rs``,
``workloadmanager.rs``):

- a record is checked before anything else, in ztunnel's order: more than one
  fd, truncation, protobuf, no payload, fd/kind mismatch. Any of these is
  answered ``failure to read message : ...``; the connection is then closed
  and re-established (the node agent resends a snapshot);
- a 0-byte record is EOF;
- Add without ``workload_info``, Keep after SnapshotSent and a second
  SnapshotSent are ``failure to process message : ProtocolError(...)``: the
  connection is closed and ztunnel's in-pod manager stops for good;
- a proxy that cannot start is ``failure to start proxy : ...``: the
  connection stays, the workload is *pending* and retried (every 5 s);
- snapshot state is per connection: Adds and Keeps before SnapshotSent mark
  uids to keep, a Del before it only unmarks (and forgets a pending start),
  and SnapshotSent stops every proxy not marked;
- re-adding a uid with the same netns (``st_dev``, ``st_ino``) is a no-op; with
  another netns the old proxy is replaced.

Every fd handed to ``receive`` becomes this object's: it is closed on every
error path, when a re-add turns out to be a no-op, when its workload's proxy
is up (the proxy's sockets hold the namespace from then on: one fd fewer per
pod) and when its workload is removed or replaced before that.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple

from zds.errors import ProtocolUsageError
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    encode_ack,
    encode_hello,
)
from zds.protocol.reading import (
    PROCESS_FAILURE,
    READ_FAILURE,
    START_FAILURE,
    ProtocolViolation,
    ReadError,
    close_all,
    read_record,
)
from zds.protocol.records import Record
from zds.protocol.workloads import (
    CloseConnection,
    Event,
    SendReply,
    SnapshotReconciled,
    StartProxy,
    StopProxy,
    Workload,
    WorkloadState,
)
from zds.values import frozen


def fstat_identity(fd: int) -> Hashable:
    """A netns fd's identity as ztunnel compares them: ``(st_dev, st_ino)``."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class ConnectionState(enum.Enum):
    """Where the current connection to the node agent is."""

    DISCONNECTED = "disconnected"
    #: Hello sent; the snapshot is arriving.
    SNAPSHOT = "snapshot"
    #: SnapshotSent processed: state reconciled, updates follow.
    SYNCED = "synced"
    #: A fatal protocol error: the in-pod manager stopped for good.
    STOPPED = "stopped"


@frozen
class _Outstanding(NamedTuple):
    """A proxy start handed to the caller and not reported yet."""

    request: AddWorkload | None  # the Add awaiting its ack; None for a retry
    workload: Workload


class _Snapshot:
    """Per-connection snapshot bookkeeping (ztunnel's snapshot_names/snapshot_received)."""

    __slots__ = ("marked", "received")

    def __init__(self, received: bool = False) -> None:
        self.received = received
        self.marked: set[str] = set()


class ZtunnelProtocol:
    """ztunnel's in-pod workload state and its side of every ZDS connection."""

    def __init__(self, *, identify: Callable[[int], Hashable] = fstat_identity) -> None:
        self._identify = identify
        self._workloads: dict[str, Workload] = {}
        self._snapshot = _Snapshot()
        self._outstanding: dict[str, _Outstanding] = {}
        # Kept with every state change, so no question about them scans every workload
        # (they are asked once per record: a scan made a snapshot quadratic).
        self._up: set[str] = set()
        self._pending: set[str] = set()
        #: Pending workloads that let their netns fd go: nothing to retry them with.
        self._netnsless: set[str] = set()
        self.state = ConnectionState.DISCONNECTED
        #: Why the manager stopped for good (set with ConnectionState.STOPPED).
        self.fatal_error: str | None = None

    # -- what ztunnel holds ----------------------------------------------------
    @property
    def workloads(self) -> Mapping[str, Workload]:
        """Every workload held, Up or Pending (read-only view; do not mutate)."""
        return self._workloads

    @property
    def has_pending(self) -> bool:
        """Whether a workload's proxy is not up (waiting for a retry, or, without its netns fd,
        for the node agent to send it again)."""
        return bool(self._pending)

    @property
    def netnsless_uids(self) -> list[str]:
        """The pending workloads that let their netns fd go (the node agent must send them again)."""
        return sorted(self._pending & self._netnsless)

    @property
    def retryable_uids(self) -> list[str]:
        """The pending workloads a retry starts again (they still hold their netns fd)."""
        return sorted(self._pending - self._netnsless)

    @property
    def has_retryable(self) -> bool:
        """Whether a pending workload can be retried (it still holds its netns fd)."""
        return len(self._pending) > len(self._netnsless)

    @property
    def ready(self) -> bool:
        """ztunnel's readiness: connected, snapshot reconciled, no proxy pending."""
        return self.state is ConnectionState.SYNCED and len(self._up) == len(self._workloads)

    # -- connection lifecycle ------------------------------------------------
    def connection_made(self) -> bytes:
        """A new connection: reset the snapshot marks and return the hello (``08 01``).

        Like ztunnel (``reset_snapshot``), pending workloads are forgotten: the
        node agent's snapshot on this connection names them again if they still exist.
        """
        if self.state is ConnectionState.STOPPED:
            raise ProtocolUsageError(f"the in-pod manager stopped for good: {self.fatal_error}")
        self._require_nothing_outstanding("start a connection")
        self._snapshot = _Snapshot()
        for uid in [uid for uid in self._workloads if uid not in self._up]:
            self._forget(uid)
        self.state = ConnectionState.SNAPSHOT
        return encode_hello()

    def connection_lost(self) -> None:
        """The connection is gone (closed by either side): not ready until the next snapshot."""
        self._outstanding.clear()
        # A start that was never reported leaves its workload pending, so the
        # next snapshot's Add decides about it.
        for w in self._workloads.values():
            if w.state is WorkloadState.STARTING:
                self._set_state(w, WorkloadState.PENDING)
        if self.state is not ConnectionState.STOPPED:
            self.state = ConnectionState.DISCONNECTED

    # -- incoming ------------------------------------------------------------
    def receive(self, record: Record, *, peer_open: bool = False) -> list[Event]:
        """Feed one record: its bytes, the fds that came with it (now owned here:
        each is kept by a workload or closed) and the recvmsg flags. ``peer_open``: a 0-byte
        record the node agent sent (with fds, or while its end is still open: the I/O layer
        asked the socket, ``seqpacket.sent_empty``), not its close: the connection's end
        all the same, said as such."""
        payload, fds, flags = record.payload, record.take_fds(), record.flags
        if self.state not in (ConnectionState.SNAPSHOT, ConnectionState.SYNCED):
            close_all(fds)
            raise ProtocolUsageError(f"no record can be received in state {self.state.value}")
        if self._outstanding:
            close_all(fds)
            self._require_nothing_outstanding("receive a record")
        if not payload:
            # ztunnel reads a 0-byte record as EOF, whatever came with it.
            close_all(fds)
            if peer_open:
                return self._close(
                    "node agent sent an empty record (0 bytes: read as the connection's end, as ztunnel reads one)"
                )
            return self._close("node agent closed the connection", peer_closed=True)
        try:
            request, fd = read_record(payload, fds, flags)
        except ReadError as exc:
            return self._reply_and_close(READ_FAILURE + str(exc), fatal=False)
        try:
            return self._process(request, fd)
        except ProtocolViolation as exc:
            if fd is not None:
                os.close(fd)
            return self._reply_and_close(
                f'{PROCESS_FAILURE}ProtocolError("{exc}")', fatal=True, request=request
            )

    def _process(self, request: Request, fd: int | None) -> list[Event]:
        match request:
            case AddWorkload():
                assert fd is not None
                return self._add(request, fd)
            case KeepWorkload(uid=uid):
                if self._snapshot.received:
                    raise ProtocolViolation("pod keep received after snapshot")
                self._snapshot.marked.add(uid)
                return [self._ack(request)]
            case DelWorkload(uid=uid):
                return self._delete(request, uid)
            case SnapshotSent():
                if self._snapshot.received:
                    raise ProtocolViolation("pod snapshot received already")
                return self._reconcile(request)
        raise TypeError(f"not a ZDS request: {request!r}")  # pragma: no cover

    def _add(self, request: AddWorkload, fd: int) -> list[Event]:
        if request.info is None:
            raise ProtocolViolation("workload_info is required but not present")
        uid = request.uid
        if not self._snapshot.received:
            self._snapshot.marked.add(uid)
        try:
            netns_id = self._identify(fd)
        except OSError as exc:
            os.close(fd)
            return [self._reply(Ack(f"{START_FAILURE}cannot identify the netns fd: {exc}"), request)]
        events: list[Event] = []
        existing = self._workloads.get(uid)
        if existing is not None:
            if existing.state is WorkloadState.UP and existing.netns_id == netns_id:
                # Idempotent: the same pod in the same netns is already served.
                os.close(fd)
                return [self._ack(request)]
            if existing.state is WorkloadState.UP:
                # A new netns for a known pod (its sandbox was re-created): replace the proxy.
                events.append(StopProxy(uid, "replaced: the pod's netns changed"))
            self._forget(uid)
        workload = Workload(uid=uid, info=request.info, netns_fd=fd, netns_id=netns_id)
        self._workloads[uid] = workload
        self._outstanding[uid] = _Outstanding(request=request, workload=workload)
        events.append(StartProxy(workload))
        return events

    def _delete(self, request: DelWorkload, uid: str) -> list[Event]:
        if not self._snapshot.received:
            # Before SnapshotSent a Del only unmarks: the reconcile stops the proxy.
            # A pending start is forgotten now, as the reconcile only sees running proxies.
            self._snapshot.marked.discard(uid)
            w = self._workloads.get(uid)
            if w is not None and w.state is not WorkloadState.UP:
                self._forget(uid)
            return [self._ack(request)]
        events: list[Event] = []
        w = self._workloads.get(uid)
        if w is not None:
            was_up = w.state is WorkloadState.UP
            self._forget(uid)
            if was_up:
                events.append(StopProxy(uid, "deleted by the node agent"))
        events.append(self._ack(request))
        return events

    def _reconcile(self, request: SnapshotSent) -> list[Event]:
        removed = sorted(uid for uid in self._workloads if uid not in self._snapshot.marked)
        events: list[Event] = []
        for uid in removed:
            was_up = self._workloads[uid].state is WorkloadState.UP
            self._forget(uid)
            if was_up:
                events.append(StopProxy(uid, "not in the node agent's snapshot"))
        self._snapshot = _Snapshot(received=True)
        self.state = ConnectionState.SYNCED
        events.append(SnapshotReconciled(removed=tuple(removed)))
        events.append(self._ack(request))
        return events

    # -- outcomes of StartProxy ------------------------------------------------
    def proxy_started(self, uid: str) -> list[Event]:
        """The proxy of ``uid`` is up. Returns the ack if an Add was waiting for it."""
        outstanding = self._take_outstanding(uid)
        workload = outstanding.workload
        self._set_state(workload, WorkloadState.UP)
        if workload.netns_fd is not None:
            # The proxy's sockets hold the netns now (and give it back: SIOCGSKNS); keeping
            # this fd too would cost every pod one more fd of the process's budget.
            os.close(workload.netns_fd)
            workload.netns_fd = None
        outstanding.workload.last_error = ""
        outstanding.workload.failures = 0
        if outstanding.request is None:
            return []
        return [self._ack(outstanding.request)]

    def proxy_failed(self, uid: str, error: str, *, release_netns: bool = False) -> list[Event]:
        """The proxy of ``uid`` could not start: it stays pending (retry later; with
        ``release_netns``, its netns fd is closed and it waits for the node agent to send
        it again). Returns the ``failure to start proxy`` nack if an Add was waiting for it."""
        outstanding = self._take_outstanding(uid)
        self._set_state(outstanding.workload, WorkloadState.PENDING)
        if release_netns and outstanding.workload.netns_fd is not None:
            os.close(outstanding.workload.netns_fd)
            outstanding.workload.netns_fd = None
            self._netnsless.add(uid)
        outstanding.workload.last_error = error
        outstanding.workload.failures += 1
        if outstanding.request is None:
            return []
        return [self._reply(Ack(START_FAILURE + error), outstanding.request)]

    def retry_pending(self) -> list[StartProxy]:
        """Start again every pending proxy (the caller's timer: every 5 s while any is pending)."""
        self._require_nothing_outstanding("retry pending proxies")
        if self.state is ConnectionState.STOPPED:
            return []
        starts: list[StartProxy] = []
        waiting = [
            w for w in self._workloads.values() if w.uid in self._pending and w.uid not in self._netnsless
        ]
        for w in waiting:
            self._set_state(w, WorkloadState.STARTING)
            self._outstanding[w.uid] = _Outstanding(request=None, workload=w)
            starts.append(StartProxy(w, retry=True))
        return starts

    # -- shutdown ------------------------------------------------------------
    def drain(self) -> list[StopProxy]:
        """Forget every workload (process shutdown): stop each proxy, close each fd."""
        self._outstanding.clear()
        stops = [StopProxy(uid, "ztunnel is shutting down") for uid, w in self._workloads.items()]
        for uid in list(self._workloads):
            self._forget(uid)
        return stops

    # -- helpers -------------------------------------------------------------
    def _set_state(self, w: Workload, state: WorkloadState) -> None:
        w.state = state
        (self._up.add if state is WorkloadState.UP else self._up.discard)(w.uid)
        (self._pending.add if state is WorkloadState.PENDING else self._pending.discard)(w.uid)
        if state is not WorkloadState.PENDING:
            self._netnsless.discard(w.uid)

    def _forget(self, uid: str) -> None:
        w = self._workloads.pop(uid, None)
        self._outstanding.pop(uid, None)
        self._up.discard(uid)
        self._pending.discard(uid)
        self._netnsless.discard(uid)
        if w is not None and w.netns_fd is not None:
            os.close(w.netns_fd)

    def _take_outstanding(self, uid: str) -> _Outstanding:
        outstanding = self._outstanding.pop(uid, None)
        if outstanding is None:
            raise ProtocolUsageError(f"no proxy start outstanding for {uid!r}")
        return outstanding

    def _require_nothing_outstanding(self, what: str) -> None:
        if self._outstanding:
            raise ProtocolUsageError(
                f"cannot {what}: proxy start(s) not reported yet for {sorted(self._outstanding)}"
            )

    def _ack(self, request: Request) -> SendReply:
        return self._reply(Ack(), request)

    @staticmethod
    def _reply(ack: Ack, request: Request | None) -> SendReply:
        return SendReply(ack=ack, data=encode_ack(ack), request=request)

    def _reply_and_close(self, error: str, *, fatal: bool, request: Request | None = None) -> list[Event]:
        reply = self._reply(Ack(error), request)
        return [reply, *self._close(error, fatal=fatal)]

    def _close(self, reason: str, *, fatal: bool = False, peer_closed: bool = False) -> list[Event]:
        if fatal:
            self.state = ConnectionState.STOPPED
            self.fatal_error = reason
        else:
            self.state = ConnectionState.DISCONNECTED
        return [CloseConnection(reason=reason, fatal=fatal, peer_closed=peer_closed)]
