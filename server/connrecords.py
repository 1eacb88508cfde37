"""What a ztunnel connection carries and what it reports.

A ``Delivery`` is a request waiting for its turn (its fd owned until sent), a
``SnapshotItem`` one entry of the snapshot read from a ``SnapshotSource``, and
``ConnectionInfo`` the connection as ListConnections and Watch show it, and a
``ConnectionObserver`` what the node agent hears of it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from opentelemetry import context as otel_context

from zds.protocol.messages import Ack, AddWorkload, KeepWorkload, Request
from zds.protocol.nodeagent import ConnectionState
from zds.transport import PeerCredentials

if TYPE_CHECKING:
    from zds.server.connection import ZtunnelConnection


@dataclass
class Delivery:
    """A request waiting for its turn on a connection; owns ``fd`` (a dup) until sent."""

    request: Request
    fd: int | None
    result: asyncio.Future[Ack]
    #: The trace this message belongs to (an enrollment, a removal, a snapshot), if traced.
    trace_context: otel_context.Context | None = None
    #: ``request`` already encoded (a pod's AddWorkload is encoded once); None: encode when sent.
    payload: bytes | None = None

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
    """One snapshot entry: an Add with a (dup'd, owned) fd and its encoded bytes, or a Keep."""

    request: AddWorkload | KeepWorkload
    fd: int | None
    payload: bytes | None = None


@dataclass
class ConnectionStats:
    sent: int = 0
    acked: int = 0
    nacked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectionInfo:
    """What a connection looks like at one moment (ListConnections, Watch events)."""

    id: str
    peer: PeerCredentials | None
    hello_version: int
    connected_at: float
    state: ConnectionState
    snapshot_complete: bool
    sent: int
    acked: int
    nacked: int
    sent_by_type: dict[str, int]
    newest: bool


class SnapshotSource(Protocol):
    """Where a connection reads its snapshot from (the node agent's pod cache)."""

    def snapshot_uids(self) -> list[str]: ...
    def snapshot_item(self, uid: str) -> SnapshotItem | None: ...


class ConnectionObserver:
    """Hooks the node agent uses to follow a connection (logs, pod states, metrics)."""

    def hello(self, conn: ZtunnelConnection, version: int) -> None: ...
    def sent(self, conn: ZtunnelConnection, request: Request) -> None: ...
    def acked(self, conn: ZtunnelConnection, request: Request, ack: Ack, latency: float) -> None: ...
    def unanswered(self, conn: ZtunnelConnection, request: Request, reason: str) -> None:
        """A sent request got no ack: the connection closed (or timed out) first."""

    def snapshot_complete(self, conn: ZtunnelConnection, pods: int) -> None: ...
