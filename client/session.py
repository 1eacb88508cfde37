"""What the ztunnel side does for each record without an event loop, and its first snapshot
taken with blocking calls before asyncio is loaded.

A ZDS session is driven by ``zds.client.connection.ZdsClient`` on the event loop. The
steps that need no loop are here, shared: start a workload's proxy when the state
machine asks (``start_proxy``), count and log each reply (``count_reply``), say the
snapshot is reconciled (``log_reconciled``).

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
from dataclasses import dataclass, field
from types import FrameType

from zds import defaults
from zds.client.metrics import ZtunnelMetrics
from zds.client.workloads import WorkloadProxies, WorkloadProxy, workload_log_extra
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
from zds.seqpacket import poll_budget, poll_record, recv_record, send_record

log = logging.getLogger("zds.ztunnel")

#: How often a blocking wait looks whether a stop was asked for (seconds).
_STOP_CHECK = 0.05


def conn_id_of(number: int) -> str:
    """The log's name of a ztunnel's ``number``-th connection to its node agent."""
    return f"zds-{number}"


def start_proxy(
    protocol: ZtunnelProtocol, proxies: WorkloadProxies, start: StartProxy, conn_id: str
) -> tuple[list[Event], WorkloadProxy | None]:
    """Start ``start.workload``'s proxy; the state machine's events for the outcome (the ack
    or the nack) and the proxy, to serve once that reply went out (None: it failed)."""
    workload = start.workload
    try:
        proxy = proxies.start(workload)
    except Exception as exc:  # ProxyStartError, or anything unforeseen (EMFILE...): pending, retried
        log.error(
            "failed to start proxy: %s",
            exc,
            extra={**workload_log_extra(workload.uid, workload.info), "conn": conn_id},
        )
        return protocol.proxy_failed(workload.uid, str(exc)), None
    return protocol.proxy_started(workload.uid), proxy


def count_reply(metrics: ZtunnelMetrics, reply: SendReply, conn_id: str) -> None:
    """Count a reply that went out (``zds_ztunnel_requests_total``, nacks by reason) and log it."""
    kind = request_kind(reply.request) if reply.request is not None else "unreadable"
    metrics.inc("zds_ztunnel_requests_total", kind=kind)
    uid = getattr(reply.request, "uid", "")
    extra = {"conn": conn_id, "kind": kind, "uid": uid}
    if reply.ack.ok:
        log.debug("acked %s", kind, extra=extra)
        return
    error = reply.ack.error
    reason = "other"
    for prefix, name in ((READ_FAILURE, "read"), (PROCESS_FAILURE, "process"), (START_FAILURE, "start")):
        if error.startswith(prefix):
            reason = name
    metrics.inc("zds_ztunnel_nacks_total", reason=reason)
    log.warning("nacked %s: %s", kind, error, extra=extra)


def log_reconciled(protocol: ZtunnelProtocol, event: SnapshotReconciled, conn_id: str) -> None:
    """The line that says the snapshot is in (the bench times it)."""
    removed = event.removed
    log.info(
        "snapshot reconciled: %d workload(s) held, %d dropped%s",
        len(protocol.workloads),
        len(removed),
        f" ({', '.join(removed)})" if removed else "",
        extra={"conn": conn_id},
    )


@dataclass
class Handover:
    """A connection ``take_first_snapshot`` made, for the event loop's session to carry on."""

    sock: socket.socket
    connected_since: float
    #: The node agent answered the hello (its first record came).
    answered: bool = False
    #: The snapshot is reconciled (its ack sent).
    reconciled: bool = False
    #: ``within`` passed (found while waiting for the node agent, or for room to send).
    timed_out: bool = False
    #: The state machine's events not carried out yet, in order (the last record's rest).
    events: list[Event] = field(default_factory=list)
    #: Proxies started here (their acks sent): served once the loop runs.
    started: list[WorkloadProxy] = field(default_factory=list)
    #: A send that failed: the connection is over (as when it fails on the loop).
    error: OSError | None = None


class StopSignals:
    """SIGTERM and SIGINT before the event loop's own handlers take over: noted (``requested``),
    acted on once the loop runs, so a stop during start-up is as graceful as any."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


class _Stop(Exception):
    """A stop signal ends the blocking part (see ``take_first_snapshot``)."""


class _Deadline(Exception):
    """``within`` passed."""


class _FirstSnapshot:
    """The blocking driver: one connection, until the snapshot is in or a handover is due."""

    def __init__(
        self,
        protocol: ZtunnelProtocol,
        proxies: WorkloadProxies,
        metrics: ZtunnelMetrics,
        handover: Handover,
        within: float,
        conn_id: str,
        path: str,
        stop: StopSignals,
        busy_poll: float,
    ) -> None:
        self.path = path
        self.busy_poll = poll_budget(busy_poll)
        self.stop = stop
        self.protocol = protocol
        self.proxies = proxies
        self.metrics = metrics
        self.handover = handover
        self.conn_id = conn_id
        self.deadline = time.monotonic() + within
        self.poller = select.poll()
        self.poller.register(handover.sock, select.POLLIN)

    def _wait(self, events: int) -> None:
        """Until the socket is ready for ``events`` (or hung up); _Deadline or _Stop otherwise."""
        self.poller.modify(self.handover.sock, events)
        while True:
            if self.stop.requested:
                raise _Stop
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.handover.timed_out = True
                raise _Deadline
            if self.poller.poll(min(left, _STOP_CHECK) * 1000.0):
                return

    def send(self, data: bytes) -> None:
        while True:
            try:
                send_record(self.handover.sock, data)
                return
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT)

    def run(self) -> None:
        handover = self.handover
        self.send(self.protocol.connection_made())
        log.debug("hello sent to the node agent at %s", self.path, extra={"conn": self.conn_id})
        while not handover.reconciled:
            if self.stop.requested:
                return
            record = recv_record(handover.sock)
            if record is None and handover.answered and self.busy_poll:
                record = poll_record(handover.sock, self.busy_poll)  # the next one is due any moment
            if record is None:
                self._wait(select.POLLIN)
                continue
            if record.is_eof:
                return  # left in the socket: the loop's session reads the EOF again
            if not handover.answered:
                handover.answered = True  # its first message answers the hello
                log.info("connected to the node agent at %s", self.path, extra={"conn": self.conn_id})
            self.apply(self.protocol.receive(record))  # it owns the record's fds now
            if handover.events:
                return

    def apply(self, events: list[Event]) -> None:
        """Carry out ``events`` in order, as ``ZdsClient._apply`` does; what it should not do
        here (a close) is left in ``handover.events`` with everything after it."""
        queue: deque[Event] = deque(events)
        replies: list[SendReply] = []
        try:
            while queue:
                event = queue[0]
                match event:
                    case StartProxy():
                        queue.popleft()
                        outcome, proxy = start_proxy(self.protocol, self.proxies, event, self.conn_id)
                        if proxy is not None:
                            self.handover.started.append(proxy)
                        queue.extendleft(reversed(outcome))  # its ack or nack goes first
                        continue
                    case StopProxy(uid=uid, reason=reason):
                        self.proxies.stop(uid, reason)
                    case SnapshotReconciled():
                        log_reconciled(self.protocol, event, self.conn_id)
                        self.handover.reconciled = True
                    case SendReply():
                        self.send(event.data)
                        replies.append(event)
                    case CloseConnection():
                        break
                queue.popleft()
        except (_Deadline, _Stop):
            pass
        except OSError as exc:
            self.handover.error = exc
            queue.clear()  # the connection is over, as on the loop
        finally:
            self.handover.events = list(queue)
            for reply in replies:
                count_reply(self.metrics, reply, self.conn_id)


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
    """Connect to the node agent at ``path``, say hello and answer its snapshot with blocking
    calls (module docstring). None if no connection could be made (the loop's session tries
    again, with its logs and backoff); otherwise the connection to carry on, the snapshot in
    (``reconciled``) or not. A stop signal noted by ``stop`` (installed by the caller) ends
    this part at once; the loop then stops."""
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
        protocol, proxies, metrics, handover, within, conn_id_of(1), path, stop, busy_poll
    )
    try:
        driver.run()
    except (_Deadline, _Stop):
        pass
    except OSError as exc:
        handover.error = exc
    return handover
