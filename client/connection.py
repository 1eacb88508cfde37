"""The ZDS client loop: connect to the node agent, say hello, answer every request.

The asyncio half of ztunnel's ``workloadmanager.rs``; every decision is in
``zds.protocol.ztunnel``. This layer moves records between the socket and the
state machine, runs the proxy starts and stops the state machine asks for,
and keeps two timers:

- reconnecting: after a connection the node agent answered ends (EOF, a read
  error, a nack that closes it) the next attempt is immediate, as ztunnel's; a
  connect that fails, or a connection closed before anything answered the hello
  (a node agent that refuses this peer), waits the next backoff delay (10 ms
  doubling to 15 s, with jitter). As ztunnel's, the two have a backoff each: the
  connect's starts over once a connect succeeds, the unanswered connection's only
  once the node agent answers (ztunnel: once ready);
- retrying: while a workload is pending, every 5 s its proxy is started again
  (the timer keeps running while records come and go, like ztunnel's).

The first connection may come already made, its snapshot taken before the event loop
ran (``zds.client.session.take_first_snapshot``): the session then carries on from the
``Handover`` as it stands, with the same outcomes.

A fatal protocol error ends ``run`` with ``FatalProtocolError``: ztunnel's
in-pod manager does not reconnect then (``zds ztunnel`` exits non-zero).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Iterable

from zds import defaults, limits
from zds.client.backoff import Backoff
from zds.client.faults import ZtunnelFaults
from zds.client.metrics import ZtunnelMetrics
from zds.client.session import Handover, RecordWork, conn_id_of, log_reconciled
from zds.client.workloads import WorkloadProxies, workload_log_extra
from zds.errors import ProtocolError, printable
from zds.protocol.workloads import (
    CloseConnection,
    Event,
    SendReply,
    SnapshotReconciled,
)
from zds.protocol.ztunnel import ConnectionState, ZtunnelProtocol
from zds.seqpacket import sent_empty
from zds.transport import BusyPoll, SeqpacketConnection, connect

log = logging.getLogger("zds.ztunnel")


def _not_a_socket(path: str) -> str | None:
    """What is at ``path`` (followed, as connect follows it) when that is not a socket; None
    when it is one, or nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    return (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a regular file"
        if stat.S_ISREG(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
    )


class FatalProtocolError(ProtocolError):
    """The node agent broke the protocol in a way ztunnel does not retry (``ProtocolError``)."""


class ZdsClient:
    """One ztunnel's connection to its node agent, reconnected for as long as it runs."""

    def __init__(
        self,
        socket_path: str,
        protocol: ZtunnelProtocol,
        proxies: WorkloadProxies,
        metrics: ZtunnelMetrics,
        *,
        retry_interval: float = defaults.PENDING_RETRY_INTERVAL,
        busy_poll: float = defaults.BUSY_POLL,
        backoff: Backoff | None = None,
        faults: ZtunnelFaults | None = None,
        handover: Handover | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.protocol = protocol
        self.proxies = proxies
        self.metrics = metrics
        self.retry_interval = retry_interval
        #: Between failed connects (from the first delay again once one succeeds).
        self.backoff = backoff or Backoff()
        #: Between connections closed before the hello was answered (from the first delay
        #: again once one is answered: ztunnel's readiness backoff, reset when ready).
        self.unanswered = Backoff(self.backoff.initial, self.backoff.maximum, jitter=self.backoff.jitter)
        #: After each ack, polls a moment for the next request (in a snapshot or a burst it
        #: comes within microseconds) before sleeping: ``zds.transport.BusyPoll``.
        self._busy = BusyPoll(busy_poll)
        #: How many connections were established so far.
        self.connections = 0
        #: Why the last connection ended or the last attempt failed (None: none yet).
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._retry_at: float | None = None
        self._conn_id = ""
        #: Faults on demand (zds ztunnel --faults, POST /faults); None: none can be armed.
        self.faults = faults
        self._conn: SeqpacketConnection | None = None
        #: Set by interrupt_read: the wait for a record was cut short (a fault stops reading).
        self._interrupted = False
        #: Set once the first snapshot is reconciled, or a connect failed (nothing to wait for),
        #: or the first snapshot taken before the loop ran out of time: from then on, work that
        #: is not the pods' (the HTTP endpoints) may start.
        self.settled = asyncio.Event()
        #: The first connection, made before the event loop ran (``zds.client.session``).
        self._handover = handover

    @property
    def connected(self) -> bool:
        """A connection to the node agent is open (hello sent)."""
        return self.protocol.state in (ConnectionState.SNAPSHOT, ConnectionState.SYNCED)

    # -- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, reconnect, until cancelled or a fatal protocol error."""
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            handover, self._handover = self._handover, None
            try:
                conn = SeqpacketConnection(handover.sock) if handover else await connect(self.socket_path)
            except OSError as exc:
                self.settled.set()
                delay = self.backoff.next()
                # Retried as ztunnel does whatever the error (a node agent that starts replaces
                # what is there: Istio's removes it), but said as it is: connect says "Connection
                # refused" for a directory or a file as for a socket nothing listens on.
                other = _not_a_socket(self.socket_path) if exc.errno == errno.ECONNREFUSED else None
                problem = f"it is {other}, not a socket" if other else exc.strerror or str(exc)
                self.last_error = f"cannot connect to {self.socket_path}: {problem}"
                # ztunnel logs every failure; only the first and the slow ones here, to keep the log readable.
                level = logging.WARNING if self.backoff.attempts == 1 or delay >= 1.0 else logging.DEBUG
                why = (
                    "permission denied (the node agent's sockets are root's: run as root, or have it give "
                    "them to a group of yours with zds server --socket-group)"
                    if exc.errno == errno.EACCES
                    else f"{problem} (is --zds-socket the node agent's socket?)"
                    if other
                    else f"{problem} (is it running?)"
                )
                log.log(
                    level,
                    "failed to connect to the node agent over %s: %s; retrying in %.3fs",
                    self.socket_path,
                    why,
                    delay,
                )
                continue
            # ztunnel's connect backoff is per connect: a connection made starts it over.
            self.backoff.reset()
            answered = await self._session(conn, handover)
            if self.protocol.fatal_error is not None:
                # Stopped for good, even when the nack could not be sent (the peer was gone).
                raise FatalProtocolError(self.protocol.fatal_error)
            # After a read error or EOF ztunnel reconnects at once. A connection closed before
            # anything answered the hello (a node agent that refuses us, or is overloaded)
            # waits the backoff instead of spinning.
            if answered:
                self.unanswered.reset()
                delay = 0.0
            else:
                delay = self.unanswered.next()
                log.warning(
                    "the node agent closed the connection before answering the hello (not allowed "
                    "to connect, or overloaded?); retrying in %.3fs",
                    delay,
                )

    async def _session(self, conn: SeqpacketConnection, handover: Handover | None = None) -> bool:
        """Serve one connection until it ends; True if the node agent answered the hello.
        ``handover``: the connection was made, and maybe the snapshot taken, before the loop ran."""
        self.connections += 1
        self._conn_id = conn_id_of(self.connections)
        answered = handover.answered if handover else False
        extra = {"conn": self._conn_id}
        work = handover.work if handover else None
        try:
            if handover is None:
                hello_error = await self._hello(conn)
            else:
                hello_error = handover.hello_error
                self.connected_since = handover.connected_since
            if hello_error is not None:
                self.last_error = f"node agent announcement failed: {hello_error}"
                log.error("node agent announcement failed (%s)", hello_error, extra=extra)
                return False
            if handover is not None:
                self._take_over(handover)
                self._schedule_retry(since=handover.pending_since)  # (the first snapshot's nacks)
            self._conn = conn
            if self.faults is not None:
                await self.write_extras()
            while True:
                if work is not None:  # the rest of a record the first snapshot began
                    close = await self._apply(work, conn)
                    work = None
                    if close is not None:
                        return self._closed(close, answered)
                    self._schedule_retry()
                    continue
                if self.faults is not None:
                    await self.faults.wait_to_read()
                    if not self.faults.armed:  # all took effect: the no-fault path again (POST re-arms)
                        self.faults = None
                record = conn.try_recv()
                if record is None and answered and self.faults is None:
                    record = await self._busy.poll(conn)
                if record is None:
                    # Nothing waiting: wait for the next record, or the retry timer.
                    ready = await conn.wait_readable(self._retry_timeout())
                    if self._interrupted:  # a fault stopped reading (the record stays in the socket)
                        self._interrupted = False
                    elif not ready:
                        self._retry_at = None
                        if self.protocol.has_pending and (close := self._retry_pending()) is not None:
                            return self._closed(close, answered)
                    continue
                if not answered and record.payload:
                    answered = True  # its first message answers it (an empty one: EOF to ztunnel)
                    log.info("connected to the node agent at %s", self.socket_path, extra=extra)
                if (
                    self.faults is not None
                    and (answer := self.faults.intercept(record, conn.socket)) is not None
                ):
                    await conn.send(answer)
                    continue
                peer_open = sent_empty(conn.socket, record)
                events = self.protocol.receive(record, peer_open=peer_open)  # it owns the record's fds now
                close = await self._apply(self._work(events), conn)
                if close is not None:
                    return self._closed(close, answered)
                self._schedule_retry()  # (a nack's: before the next record, a Del, is read)
        except (ConnectionError, OSError) as exc:
            self.last_error = f"connection to the node agent failed: {exc}"
            log.warning("connection to the node agent failed: %s", exc, extra=extra)
            return answered
        finally:
            self._conn = None
            self._interrupted = False
            conn.close()
            self.protocol.connection_lost()
            self.connected_since = None
            self._retry_at = None

    async def _hello(self, conn: SeqpacketConnection) -> OSError | None:
        """Say hello on a new connection; the error if it could not be sent."""
        self.metrics.inc("zds_ztunnel_connections_total")
        hello = self.protocol.connection_made()
        if self.faults is not None:
            hello = self.faults.hello()
        self.connected_since = time.time()
        try:
            await conn.send(hello)
        except OSError as exc:
            return exc
        log.debug("hello sent to the node agent at %s", self.socket_path, extra={"conn": self._conn_id})
        return None

    def _take_over(self, handover: Handover) -> None:
        """Carry on where the first snapshot stopped: serve the proxies it acked; a send that
        failed there ends this session as one that fails here."""
        for proxy in handover.to_activate:
            self.proxies.activate(proxy)
        if handover.reconciled or handover.timed_out:
            self.settled.set()
        if handover.error is not None:
            if handover.work is not None:
                self._finish(handover.work)
            raise handover.error

    def _closed(self, close: CloseConnection, answered: bool) -> bool:
        """The connection ends as ``close`` says (FatalProtocolError: for good); ``answered``."""
        extra = {"conn": self._conn_id}
        self.last_error = close.reason
        if close.fatal:
            log.error("protocol error from the node agent, stopping: %s", close.reason, extra=extra)
            raise FatalProtocolError(close.reason)
        if close.peer_closed:
            log.info("node agent closed the connection", extra=extra)
        else:
            log.warning("closing the connection: %s", close.reason, extra=extra)
        return answered

    def _schedule_retry(self, *, since: float | None = None) -> None:
        """Start the retry timer if a workload is pending and none runs. As ztunnel's
        (``schedule_retry``, at each nack), once started it runs to its end while records come
        and go, also if a Del took every pending workload meanwhile: one that goes pending
        before it ends is retried then. ``since``: when (``time.monotonic()``) the nack came,
        if before now (the first snapshot's, answered before the loop ran)."""
        if self._retry_at is not None or not self.protocol.has_pending:
            return
        ago = 0.0 if since is None else max(0.0, time.monotonic() - since)
        self._retry_at = asyncio.get_running_loop().time() + max(0.0, self.retry_interval - ago)
        if self.protocol.has_retryable:
            log.info(
                "scheduling retry of pending workloads in %gs: %s",
                round(max(0.0, self.retry_interval - ago), 3),
                ", ".join(map(printable, self.protocol.retryable_uids)),
                extra={"conn": self._conn_id},
            )

    def _retry_timeout(self) -> float | None:
        """How long until pending workloads are retried (None: no timer)."""
        self._schedule_retry()
        if self._retry_at is None:
            return None
        return max(0.0, self._retry_at - asyncio.get_running_loop().time())

    def _retry_pending(self) -> CloseConnection | None:
        """Start the pending proxies again; a close when pods that let their netns fd go can be
        sent again: fds are free once more, and a new connection's snapshot brings them (as
        ztunnel, which keeps the fd, would retry them)."""
        let_go = self.protocol.netnsless_uids
        room = self.proxies.settings.fd_reserve + defaults.POD_FDS + 1  # (one more pod, and its netns fd)
        if let_go and limits.fd_shortage(room) is None:
            return CloseConnection(
                reason=f"{len(let_go)} pending pod(s) let their netns fd go for want of fds, and fds are "
                "free again: reconnecting for a snapshot that sends them again"
            )
        starts = self.protocol.retry_pending()
        for start in starts:
            log.info("retrying workload", extra=workload_log_extra(start.workload.uid, start.workload.info))
        work = self._work(starts)
        while work.next() is not None:  # a retry answers nobody: its outcome is only the state
            pass
        self._finish(work)
        if not self.protocol.has_pending:
            log.info("every pending workload is up now", extra={"conn": self._conn_id})
        return None

    # -- events --------------------------------------------------------------------
    def _work(self, events: Iterable[Event]) -> RecordWork:
        return RecordWork(events, self.protocol, self.proxies, self._conn_id)

    async def _apply(self, work: RecordWork, conn: SeqpacketConnection) -> CloseConnection | None:
        """Carry out a record's events in order (``RecordWork``); return the close, if one came.

        The replies go out first; what only matters to this side (serving the new
        listeners, logs, metrics) is done after, while the node agent moves on."""
        try:
            while (event := work.next()) is not None:
                match event:
                    case SnapshotReconciled():
                        self.settled.set()
                        log_reconciled(self.protocol, event, self._conn_id)
                    case SendReply():
                        work.replies.append(event)
                        if self.faults is not None:
                            in_snapshot = self.protocol.state is ConnectionState.SNAPSHOT
                            action = await self.faults.reply(event, in_snapshot)
                            if action == "skip":
                                continue
                            await conn.send(event.data + event.data if action == "twice" else event.data)
                            if action == "close":
                                return CloseConnection(
                                    reason="fault disconnect-in-snapshot: closed mid-snapshot"
                                )
                            await self.write_extras()
                            continue
                        await conn.send(event.data)
                    case CloseConnection():
                        return event
            return None
        finally:
            self._finish(work)

    def _finish(self, work: RecordWork) -> None:
        """A record's replies went out (or its connection failed): serve its new proxies, count."""
        for proxy in work.started:
            self.proxies.activate(proxy)
        work.started = []
        work.count_replies(self.metrics)

    async def write_extras(self) -> None:
        """Write what faults want said unasked (a second hello, an unsolicited ack), if connected."""
        if self.faults is None or self._conn is None:
            return
        for extra in self.faults.extras():
            await self._conn.send(extra)

    def interrupt_read(self) -> None:
        """Cut short a wait for a record (a fault stops reading at once)."""
        if self._conn is not None and self._conn.wake():
            self._interrupted = True
