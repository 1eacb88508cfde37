"""Who is connected: the node agent's ztunnel connections (the connection
manager of Istio's ``ztunnelserver.go``).

Socket-free: it holds whatever objects stand for connections (``ZtunnelConnection``
in the node agent, plain objects in unit tests) and answers the two questions
delivery asks — which connection is the newest, and which are all of them —
plus the limits. A connection is *live* from accept to close, *ready* once it
said hello (only then does it take part in delivery). Only ready connections
count against ``--max-connections``: connections that never say hello (a flood,
a stuck client) cannot keep a real ztunnel out. They are bounded on their own:
past ``max_waiting`` the oldest is dropped.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class ConnectionRegistry(Generic[C]):
    """Live connections in accept order, and the ones that said hello, oldest first."""

    def __init__(self, max_connections: int, max_waiting: int = 64) -> None:
        self.max_connections = max_connections
        self.max_waiting = max_waiting
        self._live: dict[C, None] = {}
        self._ready: list[C] = []

    # -- membership --------------------------------------------------------------
    def full(self) -> bool:
        """No room for another connection that said hello (``--max-connections``)."""
        return len(self._ready) >= self.max_connections

    def admit(self, conn: C) -> C | None:
        """A connection was accepted. If now too many wait for their hello, the oldest of them
        is dropped from the registry and returned (the caller closes it)."""
        self._live[conn] = None
        waiting = [c for c in self._live if c not in self._ready]
        if len(waiting) <= self.max_waiting:
            return None
        del self._live[waiting[0]]
        return waiting[0]

    def hello(self, conn: C) -> None:
        """The connection said hello: it is now the newest, the one adds go to."""
        if conn in self._live and conn not in self._ready:
            self._ready.append(conn)

    def remove(self, conn: C) -> bool:
        """The connection is gone; True if it had said hello (watchers were told it connected)."""
        self._live.pop(conn, None)
        if conn in self._ready:
            self._ready.remove(conn)
            return True
        return False

    # -- what delivery asks -------------------------------------------------------
    def newest(self) -> C | None:
        """Where an AddWorkload goes: the connection that said hello last (Istio: the
        newest ztunnel gets new pods while an old one drains)."""
        return self._ready[-1] if self._ready else None

    def ready(self) -> list[C]:
        """Where a DelWorkload goes: every connection that said hello, oldest first
        (so an old ztunnel that is draining releases the pod too)."""
        return list(self._ready)

    def live(self) -> list[C]:
        """Every connection from accept to close, with or without a hello, in accept order."""
        return list(self._live)

    def __len__(self) -> int:
        return len(self._ready)
