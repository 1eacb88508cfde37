"""ztunnel's side, sans-I/O: what it holds (``Workload``) and what its protocol object
asks the caller to do (the events ``ZtunnelProtocol`` returns)."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from typing import NamedTuple

from zds.protocol.messages import Ack, Request, WorkloadInfo
from zds.values import frozen


class WorkloadState(enum.Enum):
    """A workload's proxy: being started, running, or waiting for a retry."""

    STARTING = "Starting"
    UP = "Up"
    PENDING = "Pending"

    @property
    def admin_name(self) -> str:
        """ztunnel's config_dump spelling: only ``Up`` and ``Pending`` exist there."""
        return "Up" if self is WorkloadState.UP else "Pending"


class Workload:
    """One pod ztunnel serves: who it is, its netns fd and its proxy state.

    ``netns_fd`` is owned here while the proxy is not up (a retry needs it); once it is
    up, the proxy's sockets hold the namespace and the fd is closed (None)."""

    __slots__ = ("failures", "info", "last_error", "netns_fd", "netns_id", "state", "uid")

    def __init__(self, uid: str, info: WorkloadInfo, netns_fd: int | None, netns_id: Hashable) -> None:
        self.uid = uid
        self.info = info
        self.netns_fd = netns_fd
        self.netns_id = netns_id
        self.state = WorkloadState.STARTING
        self.last_error = ""
        #: How many times starting its proxy failed since the last success.
        self.failures = 0

    def __repr__(self) -> str:
        return f"Workload(uid={self.uid!r}, state={self.state.value}, netns_fd={self.netns_fd!r})"


# -- events ---------------------------------------------------------------------
@frozen
class SendReply(NamedTuple):
    """Send ``data`` (a ``WorkloadResponse{ack}``) to the node agent."""

    ack: Ack
    data: bytes
    request: Request | None = None


@frozen
class StartProxy(NamedTuple):
    """Start ``workload``'s proxy (listeners in its netns), then report the
    outcome with ``proxy_started`` or ``proxy_failed`` before the next record."""

    workload: Workload
    retry: bool = False


@frozen
class StopProxy(NamedTuple):
    """Stop the proxy of ``uid`` (close its listeners); its netns fd is already closed."""

    uid: str
    reason: str


@frozen
class SnapshotReconciled(NamedTuple):
    """SnapshotSent processed; ``removed`` are the uids the snapshot did not name."""

    removed: tuple[str, ...]


@frozen
class CloseConnection(NamedTuple):
    """Close the connection now. ``fatal``: do not reconnect (ztunnel exits);
    otherwise reconnect at once. ``peer_closed``: the node agent went first (EOF)."""

    reason: str
    fatal: bool = False
    peer_closed: bool = False


Event = SendReply | StartProxy | StopProxy | SnapshotReconciled | CloseConnection
