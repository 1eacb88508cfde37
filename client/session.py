"""What the ztunnel side does for each record without an event loop, and its first snapshot
taken with blocking calls before asyncio is loaded.

A ZDS session is driven by ``zds.client.connection.ZdsClient`` on the event loop. The
steps that need no loop are here, shared: carry out the state machine's events for a
record (``RecordWork``: start and stop proxies, up to each reply), count and log each
reply (``count_reply``), say the snapshot is reconciled (``log_reconciled``).

``take_first_snapshot``: when ``zds ztunnel`` starts, the node agent's snapshot is what
every pod on the node waits for, and loading asyncio, uvloop and the rest of the ztunnel
side takes longer than answering hundreds of pods (README "Performance"). So the first
connection is made, the hello sent and the snapshot answered without an event loop
(``recvmsg``, ``sendmsg`` and ``poll`` as they are), with the modules that need none (the sans-I/O protocol, ``zds.client.workloads``,
``zds.client.inpod``); the proxies started meanwhile listen already (what arrives waits
in their backlog) and are served once the loop runs. Whatever is not the plain path (a
record that closes the connection, a send that fails, ``within`` seconds passed since
the connection was made (``defaults.HTTP_START_DELAY``: the HTTP endpoints are due then),
a stop signal (``StopSignals``)) hands the connection over as it stands
(``Handover``); the event loop's session carries on from exactly there, so every outcome
is the one it would have had. With faults armed (``--faults``) nothing is done here.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from collections import deque
from collections.abc import Iterable
from types import FrameType

from zds import defaults, limits, runtime
from zds.client.metrics import ZtunnelMetrics
from zds.client.workloads import (
    FdBudgetExhausted,
    WorkloadProxies,
    WorkloadProxy,
    out_of_fds,
    workload_log_extra,
)
from zds.errors import printable
from zds.protocol.messages import request_kind
from zds.protocol.reading import PROCESS_FAILURE, READ_FAILURE, START_FAILURE
from zds.protocol.workloads import (
    CloseConnection,
    Event,
    SendReply,
    SnapshotReconciled,
    StartProxy,
    StopProxy,
)
from zds.protocol.ztunnel import ZtunnelProtocol
from zds.seqpacket import poll_budget, poll_record, recv_record, send_record, sent_empty

log = logging.getLogger("zds.ztunnel")

#: How often a blocking wait looks whether a stop was asked for (seconds).
_STOP_CHECK = 0.05


def conn_id_of(number: int) -> str:
    """The log's name of a ztunnel's ``number``-th connection to its node agent."""
    return f"zds-{number}"


def count_answer(metrics: ZtunnelMetrics, kind: str, error: str = "") -> None:
    """A request of ``kind`` answered (``zds_ztunnel_requests_total``); a nack (``error``) also
    by its reason (``zds_ztunnel_nacks_total``). Also for an AddWorkload a fault nacked."""
    metrics.inc("zds_ztunnel_requests_total", kind=kind)
    if error:
        reason = "other"
        for prefix, name in ((READ_FAILURE, "read"), (PROCESS_FAILURE, "process"), (START_FAILURE, "start")):
            if error.startswith(prefix):
                reason = name
        metrics.inc("zds_ztunnel_nacks_total", reason=reason)


def count_reply(metrics: ZtunnelMetrics, reply: SendReply, conn_id: str) -> None:
    """Count a reply handed to the connection (``count_answer``) and log it."""
    kind = request_kind(reply.request) if reply.request is not None else "unreadable"
    count_answer(metrics, kind, reply.ack.error)
    extra = {"conn": conn_id, "kind": kind, "uid": getattr(reply.request, "uid", "")}
    if reply.ack.ok:
        log.debug("acked %s", kind, extra=extra)
    else:
        log.warning("nacked %s: %s", kind, reply.ack.error, extra=extra)


def log_reconciled(protocol: ZtunnelProtocol, event: SnapshotReconciled, conn_id: str) -> None:
    """The line that says the snapshot is in (the bench times it)."""
    removed = event.removed
    log.info(
        "snapshot reconciled: %d workload(s) held, %d dropped%s",
        len(protocol.workloads),
        len(removed),
        f" ({', '.join(map(printable, removed))})" if removed else "",
        extra={"conn": conn_id},
    )


class RecordWork:
    """The state machine's events for one record (or one retry), carried out in order.

    ``next`` does what needs no connection on the spot — start a proxy (its ack or nack goes
    first, before later events), stop one — and stops at what its driver must do: send a
    reply, note the snapshot reconciled, close. Both drivers (the event loop's and the first
    snapshot's) take the same steps; a handover passes the rest of a record on as it stands.
    Once the record's replies went out, its driver serves ``started`` and counts ``replies``.
    """

    def __init__(
        self, events: Iterable[Event], protocol: ZtunnelProtocol, proxies: WorkloadProxies, conn_id: str
    ) -> None:
        self.queue: deque[Event] = deque(events)
        self.protocol = protocol
        self.proxies = proxies
        self.conn_id = conn_id
        #: Proxies started for this record: served once its replies went out.
        self.started: list[WorkloadProxy] = []
        #: Replies handed to the connection (counted once the record is done, sent or not).
        self.replies: list[SendReply] = []

    def next(self) -> SendReply | SnapshotReconciled | CloseConnection | None:
        """Carry out events up to the next one for the driver; None when the record is done."""
        while self.queue:
            event = self.queue.popleft()
            match event:
                case StartProxy():
                    self.queue.extendleft(reversed(self._start(event)))
                case StopProxy(uid=uid, reason=reason):
                    self.proxies.stop(uid, reason)
                case SendReply() | SnapshotReconciled() | CloseConnection():
                    return event
        return None

    def put_back(self, event: Event) -> None:
        """``event`` (from ``next``) is to be done by whoever carries on."""
        self.queue.appendleft(event)

    def _start(self, start: StartProxy) -> list[Event]:
        workload = start.workload
        try:
            proxy = self.proxies.start(workload)
        except Exception as exc:  # ProxyStartError, or anything unforeseen (EMFILE...): pending, retried
            log.error(
                "failed to start proxy: %s",
                exc,
                extra={**workload_log_extra(workload.uid, workload.info), "conn": self.conn_id},
            )
            error, release = str(exc), False
            floor = self.proxies.settings.fd_reserve // 2
            if isinstance(exc, FdBudgetExhausted):  # (it counted them: no second count)
                short = exc.free < floor
            else:
                # Whatever the failure: a pod pending for a taken port or an fd that is no
                # netns holds its fd all the same (a first snapshot of such pods used them
                # all, and the event loop's code could not be imported: a traceback).
                highest = None if out_of_fds(exc) else workload.netns_fd
                short = limits.fd_shortage(floor, highest=highest) is not None
            if short:
                # Each pending pod holds its netns fd for the retry: past half the reserve,
                # they would take the room a netns fd needs to be received at all.
                error += (
                    f"; its netns fd is let go (fewer than {floor} fds free): "
                    "it starts once the node agent sends it again"
                )
                release = True
            return self.protocol.proxy_failed(workload.uid, error, release_netns=release)
        self.started.append(proxy)
        return self.protocol.proxy_started(workload.uid)

    def count_replies(self, metrics: ZtunnelMetrics) -> None:
        for reply in self.replies:
            count_reply(metrics, reply, self.conn_id)
        self.replies = []


class Handover:
    """A connection ``take_first_snapshot`` made, for the event loop's session to carry on."""

    __slots__ = (
        "answered",
        "connected_since",
        "error",
        "hello_error",
        "pending_since",
        "reconciled",
        "sock",
        "timed_out",
        "to_activate",
        "work",
    )

    def __init__(self, sock: socket.socket, connected_since: float) -> None:
        self.sock = sock
        self.connected_since = connected_since
        #: The hello could not be sent: the session ends as when that fails on the loop.
        self.hello_error: OSError | None = None
        #: The node agent answered the hello (its first record came).
        self.answered = False
        #: The snapshot is reconciled (SnapshotSent taken; its ack may still be in ``work``).
        self.reconciled = False
        #: ``within`` passed before the snapshot was in.
        self.timed_out = False
        #: The rest of the record at hand (its replies not all sent, or its close), if any.
        self.work: RecordWork | None = None
        #: Proxies of the records done (their replies sent): served, counted and logged once the loop runs.
        self.to_activate: list[WorkloadProxy] = []
        #: A send failed: the connection is over, as when a send fails on the loop.
        self.error: OSError | None = None
        #: When (``time.monotonic()``) a workload first went pending (a nack): the loop's
        #: retry timer runs from then, as ztunnel's starts at the nack, not at the handover.
        self.pending_since: float | None = None


class StopSignals:
    """SIGTERM and SIGINT before the event loop's own handlers take over: noted (``requested``),
    acted on once the loop runs, so a stop during start-up is as graceful as any."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in runtime.stop_signals():
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


class _Stop(Exception):
    """A stop signal ends the part without a loop (see ``take_first_snapshot``)."""


class _Deadline(Exception):
    """``within`` passed."""


class _HandOver(Exception):
    """What comes next is the loop's to do (a close)."""


class _FirstSnapshot:
    """The driver without a loop: one connection, until the snapshot is in or a handover is due."""

    def __init__(
        self,
        protocol: ZtunnelProtocol,
        proxies: WorkloadProxies,
        metrics: ZtunnelMetrics,
        handover: Handover,
        *,
        within: float,
        path: str,
        stop: StopSignals,
        busy_poll: float,
    ) -> None:
        self.protocol = protocol
        self.proxies = proxies
        self.metrics = metrics
        self.handover = handover
        self.deadline = time.monotonic() + within
        self.path = path
        self.stop = stop
        self.busy_poll = poll_budget(busy_poll)
        self.conn_id = conn_id_of(1)
        self.poller = select.poll()
        self.poller.register(handover.sock, select.POLLIN)

    def _check(self) -> None:
        if self.stop.requested:
            raise _Stop
        if time.monotonic() >= self.deadline:
            self.handover.timed_out = True
            raise _Deadline

    def _wait(self, events: int) -> None:
        """Until the socket is ready for ``events`` (or hung up); _Deadline or _Stop first."""
        self.poller.modify(self.handover.sock, events)
        while True:
            self._check()
            left = self.deadline - time.monotonic()
            if self.poller.poll(min(left, _STOP_CHECK) * 1000.0):
                return

    def _send(self, data: bytes) -> None:
        while True:
            try:
                send_record(self.handover.sock, data)
                return
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT)

    def run(self) -> None:
        """Answer records until the snapshot is in; _Deadline, _Stop, _HandOver or OSError end it early."""
        handover = self.handover
        extra = {"conn": self.conn_id}
        try:
            send_record(handover.sock, self.protocol.connection_made())  # a fresh socket takes 2 bytes
        except OSError as exc:
            handover.hello_error = exc
            return
        log.debug("hello sent to the node agent at %s", self.path, extra=extra)
        while not handover.reconciled:
            self._check()  # also between records that come without a pause
            record = recv_record(handover.sock)
            if record is None and handover.answered and self.busy_poll:
                record = poll_record(handover.sock, self.busy_poll)  # the next one is due any moment
            if record is None:
                self._wait(select.POLLIN)
                continue
            if not handover.answered and record.payload:
                handover.answered = True  # its first message answers it (an empty one: EOF to ztunnel)
                log.info("connected to the node agent at %s", self.path, extra=extra)
            peer_open = sent_empty(handover.sock, record)
            work = RecordWork(
                self.protocol.receive(record, peer_open=peer_open), self.protocol, self.proxies, self.conn_id
            )
            handover.work = work  # until it is done
            try:
                self._carry_out(work)
            finally:
                if handover.pending_since is None and self.protocol.has_pending:
                    handover.pending_since = time.monotonic()
            handover.work = None
            handover.to_activate.extend(work.started)  # their lines and counts can wait too
            work.count_replies(self.metrics)

    def _carry_out(self, work: RecordWork) -> None:
        """``ZdsClient._apply`` without faults; a close is left to the loop (``_HandOver``)."""
        while (event := work.next()) is not None:
            match event:
                case SnapshotReconciled():
                    log_reconciled(self.protocol, event, self.conn_id)
                    self.handover.reconciled = True
                case SendReply():
                    work.replies.append(event)  # counted even if the send fails, as on the loop
                    try:
                        self._send(event.data)
                    except (_Deadline, _Stop):
                        work.replies.pop()
                        work.put_back(event)  # the loop sends it
                        raise
                case CloseConnection():
                    work.put_back(event)
                    raise _HandOver


def take_first_snapshot(
    path: str,
    protocol: ZtunnelProtocol,
    proxies: WorkloadProxies,
    metrics: ZtunnelMetrics,
    *,
    within: float,
    stop: StopSignals,
    busy_poll: float = defaults.BUSY_POLL,
) -> Handover | None:
    """Connect to the node agent at ``path``, say hello and answer its snapshot without an
    event loop (module docstring). None if no connection was made (a stop came first, or the
    connect failed: the loop's session tries, with its logs and backoff); otherwise the
    connection to carry on, the snapshot in (``reconciled``) or not. A stop signal noted by
    ``stop`` (installed by the caller) ends this part at once; the loop then stops."""
    if stop.requested:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    handover = Handover(sock=sock, connected_since=time.time())
    metrics.inc("zds_ztunnel_connections_total")
    driver = _FirstSnapshot(
        protocol, proxies, metrics, handover, within=within, path=path, stop=stop, busy_poll=busy_poll
    )
    try:
        driver.run()
    except (_Deadline, _Stop, _HandOver):
        pass
    except OSError as exc:
        handover.error = exc  # the record's rest is the loop's to wind up, as after its own failed send
    return handover
