"""One ztunnel connection, seen from the node agent.

All writes to a connection go through its one task (``serve``): ZDS acks
correlate by order only, so two writers would mix up whose ack is whose.
Other tasks hand requests to it with ``deliver`` and wait for the ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from zds import defaults
from zds.protocol.messages import Ack, AddWorkload, KeepWorkload, Request, SnapshotSent, request_kind
from zds.protocol.nodeagent import (
    AckReceived,
    ConnectionClosed,
    ConnectionState,
    Event,
    HelloAccepted,
    NodeAgentProtocol,
    ReceivedRecord,
    SnapshotComplete,
)
from zds.transport import PeerCredentials, SeqpacketConnection

log = logging.getLogger("zds.server")


class ConnectionLost(ConnectionError):
    """The connection closed before the request was acked; ``reason`` says why."""

    def __init__(self, conn_id: str, reason: str) -> None:
        super().__init__(f"ztunnel connection {conn_id} closed: {reason}")
        self.conn_id = conn_id
        self.reason = reason


@dataclass
class Delivery:
    """A request waiting for its turn on a connection; owns ``fd`` (a dup) until sent."""

    request: Request
    fd: int | None
    result: asyncio.Future[Ack]

    def drop(self, error: BaseException) -> None:
        self.close_fd()
        if not self.result.done():
            self.result.set_exception(error)

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class SnapshotItem:
    """One snapshot entry: an Add with a (dup'd, owned) fd, or a Keep without one."""

    request: AddWorkload | KeepWorkload
    fd: int | None


@dataclass
class ConnectionStats:
    sent: int = 0
    acked: int = 0
    nacked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class SnapshotSource(Protocol):
    """Where a connection reads its snapshot from (the node agent's pod cache)."""

    def snapshot_uids(self) -> list[str]: ...
    def snapshot_item(self, uid: str) -> SnapshotItem | None: ...


class ConnectionObserver:
    """Hooks the node agent uses to follow a connection (logs, pod states, metrics)."""

    def hello(self, conn: ZtunnelConnection, version: int) -> None: ...
    def sent(self, conn: ZtunnelConnection, request: Request) -> None: ...
    def acked(self, conn: ZtunnelConnection, request: Request, ack: Ack, latency: float) -> None: ...
    def snapshot_complete(self, conn: ZtunnelConnection) -> None: ...


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
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.sock = sock
        self.connected_at = time.time()
        self.stats = ConnectionStats()
        self._loop = asyncio.get_running_loop()
        self._observer = observer
        self._keepalive_interval = keepalive_interval
        self.protocol = NodeAgentProtocol(
            now=self._loop.time(),
            hello_timeout=hello_timeout,
            ack_timeout=ack_timeout,
            keepalive_interval=keepalive_interval,
        )
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        try:
            self.peer: PeerCredentials | None = sock.peer_credentials()
        except OSError:
            self.peer = None

    @property
    def snapshot_complete(self) -> bool:
        return self.protocol.state is ConnectionState.READY

    @property
    def closed(self) -> bool:
        return self.protocol.state is ConnectionState.CLOSED

    @property
    def log_extra(self) -> dict[str, str]:
        return {"conn": self.id}

    # -- used by other tasks ---------------------------------------------------
    async def deliver(self, request: Request, fd: int | None = None) -> Ack:
        """Queue ``request`` (``fd``: an owned dup, closed once sent) and wait for its ack.

        Raises ConnectionLost when the connection closes first.
        """
        delivery = Delivery(request=request, fd=fd, result=self._loop.create_future())
        if self.closed:
            delivery.drop(ConnectionLost(self.id, self.protocol.close_reason or "closed"))
        else:
            self._queue.put_nowait(delivery)
        return await delivery.result

    # -- the connection's own task ---------------------------------------------
    async def serve(self, source: SnapshotSource, on_ready: Callable[[], None]) -> str:
        """Hello, snapshot, then updates until the connection ends; returns why it ended."""
        try:
            await self._await_hello()
            on_ready()
            await self._send_snapshot(source)
            while True:
                delivery = await self._next_delivery()
                await self._exchange(delivery)
        except ConnectionLost as lost:
            return lost.reason
        finally:
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
        for event in events:
            match event:
                case HelloAccepted(version=version):
                    self._observer.hello(self, version)
                case AckReceived(request=request, ack=ack, latency=latency):
                    if ack.ok:
                        self.stats.acked += 1
                    else:
                        self.stats.nacked += 1
                    self._observer.acked(self, request, ack, latency)
                case SnapshotComplete():
                    self._observer.snapshot_complete(self)
                case ConnectionClosed(reason=reason):
                    raise ConnectionLost(self.id, reason)
        return events

    async def _receive(self) -> list[Event]:
        """Wait for the next record or the protocol's deadline, whichever comes first."""
        deadline = self.protocol.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - self._loop.time())
        try:
            record = await asyncio.wait_for(self.sock.recv(), timeout)
        except TimeoutError:
            return self._handle(self.protocol.handle_timeout(self._loop.time()))
        except OSError as exc:
            return self._handle(self.protocol.close(f"read failed: {exc}"))
        fd_count = len(record.fds)
        record.close_fds()  # ztunnel never sends fds; whatever came is ours to close
        received = ReceivedRecord(payload=record.payload, fd_count=fd_count, truncated=record.truncated)
        return self._handle(self.protocol.receive(received, self._loop.time()))

    async def _await_hello(self) -> None:
        while self.protocol.state is ConnectionState.AWAITING_HELLO:
            await self._receive()

    async def _exchange(self, delivery: Delivery) -> Ack:
        """Send one request (+fd) and wait for its ack; the only place that writes."""
        try:
            payload = self.protocol.send(delivery.request, self._loop.time())
        except Exception as exc:
            delivery.drop(exc)
            raise
        try:
            await self.sock.send(payload, [delivery.fd] if delivery.fd is not None else [])
        except OSError as exc:
            delivery.drop(ConnectionLost(self.id, f"write failed: {exc}"))
            self._handle(self.protocol.close(f"write failed: {exc}"))
        finally:
            delivery.close_fd()  # the kernel made the receiver its own copy
        kind = request_kind(delivery.request)
        self.stats.sent += 1
        self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        self._observer.sent(self, delivery.request)
        try:
            while True:
                for event in await self._receive():
                    if isinstance(event, AckReceived):
                        if not delivery.result.done():
                            delivery.result.set_result(event.ack)
                        return event.ack
        except ConnectionLost as lost:
            delivery.drop(lost)
            raise

    async def _send_snapshot(self, source: SnapshotSource) -> None:
        """Every known pod (Add + fd, or Keep), each acked before the next, then SnapshotSent.

        Each entry is read from the cache when its turn comes, so a pod removed
        meanwhile is skipped and only one fd is duplicated at a time.
        """
        for uid in source.snapshot_uids():
            item = source.snapshot_item(uid)
            if item is not None:
                await self._exchange(
                    Delivery(request=item.request, fd=item.fd, result=self._loop.create_future())
                )
        await self._exchange(Delivery(request=SnapshotSent(), fd=None, result=self._loop.create_future()))

    async def _next_delivery(self) -> Delivery:
        """The next queued request; while idle, probe the connection every keepalive interval."""
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), self._keepalive_interval)
            except TimeoutError:
                pass
            now = self._loop.time()
            if not self.protocol.keepalive_due(now):
                continue
            # ztunnel never speaks unprompted: nothing to read means alive, EOF means gone.
            record = self.sock.try_recv()
            if record is None:
                self.protocol.keepalive_probed(now)
                continue
            fd_count = len(record.fds)
            record.close_fds()
            received = ReceivedRecord(payload=record.payload, fd_count=fd_count, truncated=record.truncated)
            self._handle(self.protocol.receive(received, now))


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel a task and wait for it to finish, swallowing its cancellation."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
