"""What the node agent needs of a ztunnel connection: an id, and ``deliver``.

``ZtunnelConnection`` is the real one; unit tests of the delivery rules use
stand-ins with the same two members, no socket behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from opentelemetry import context as otel_context

from zds.errors import ZdsError
from zds.protocol.messages import Ack, Request


class ConnectionLost(ZdsError, ConnectionError):
    """The connection closed before the request was acked; ``reason`` says why."""

    def __init__(self, conn_id: str, reason: str, *, ack_timeout: bool = False) -> None:
        super().__init__(f"ztunnel connection {conn_id} closed: {reason}")
        self.conn_id = conn_id
        self.reason = reason
        #: This request's own ack did not come in time (not just: the connection went away).
        self.ack_timeout = ack_timeout


class ZtunnelLink(Protocol):
    """One ztunnel connection, as enrollment and removal use it."""

    @property
    def id(self) -> str: ...

    async def deliver(
        self,
        request: Request,
        fd: int | None = None,
        *,
        payload: bytes | None = None,
        trace_context: otel_context.Context | None = None,
    ) -> Ack:
        """Send ``request`` (``fd``: an owned dup, closed once sent; ``payload``: the request
        already encoded) and wait for its ack. ConnectionLost when the connection closes first."""
        ...


class Connections(Protocol):
    """The connections delivery can choose from (a ``ConnectionRegistry``)."""

    def newest(self) -> ZtunnelLink | None:
        """Where an AddWorkload goes."""
        ...

    def ready(self) -> Sequence[ZtunnelLink]:
        """Where a DelWorkload goes."""
        ...
