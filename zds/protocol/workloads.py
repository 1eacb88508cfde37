"""ztunnel's side, sans-I/O: what it holds (``Workload``) and what its protocol object
asks the caller to do (the events ``ZtunnelProtocol`` returns)."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass

from zds.protocol.messages import Ack, Request, WorkloadInfo


class WorkloadState(enum.Enum):
    """A workload's proxy: being started, running, or waiting for a retry."""

    STARTING = "Starting"
    UP = "Up"
    PENDING = "Pending"

    @property
    def admin_name(self) -> str:
        """ztunnel's config_dump spelling: only ``Up`` and ``Pending`` exist there."""
        return "Up" if self is WorkloadState.UP else "Pending"


@dataclass
class Workload:
    """One pod ztunnel serves: who it is, its netns fd and its proxy state.

    ``netns_fd`` is owned here while the proxy is not up (a retry needs it); once it is
    up, the proxy's sockets hold the namespace and the fd is closed (None)."""

    uid: str
    info: WorkloadInfo
    netns_fd: int | None
    netns_id: Hashable
    state: WorkloadState = WorkloadState.STARTING
    last_error: str = ""
    #: How many times starting its proxy failed since the last success.
    failures: int = 0


# -- events ---------------------------------------------------------------------
@dataclass(frozen=True)
class SendReply:
    """Send ``data`` (a ``WorkloadResponse{ack}``) to the node agent."""

    ack: Ack
    data: bytes
    request: Request | None = None


@dataclass(frozen=True)
class StartProxy:
    """Start ``workload``'s proxy (listeners in its netns), then report the
    outcome with ``proxy_started`` or ``proxy_failed`` before the next record."""

    workload: Workload
    retry: bool = False


@dataclass(frozen=True)
class StopProxy:
    """Stop the proxy of ``uid`` (close its listeners); its netns fd is already closed."""

    uid: str
    reason: str


@dataclass(frozen=True)
class SnapshotReconciled:
    """SnapshotSent processed; ``removed`` are the uids the snapshot did not name."""

    removed: tuple[str, ...]


@dataclass(frozen=True)
class CloseConnection:
    """Close the connection now. ``fatal``: do not reconnect (ztunnel exits);
    otherwise reconnect at once. ``peer_closed``: the node agent went first (EOF)."""

    reason: str
    fatal: bool = False
    peer_closed: bool = False


Event = SendReply | StartProxy | StopProxy | SnapshotReconciled | CloseConnection
