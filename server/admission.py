"""Which ztunnel connection that said hello is served next: in the order they said it, at
the accept rate (``AcceptLimiter``, Istio's 5 a second, burst 1).

A slot of the rate is taken only by a connection that is served then. One whose peer has
left by its turn, or whose task ended while it waited (dropped for newer connections, the
node agent stopping), takes none: a slot reserved at the hello and never given back let a
flood of hellos that left run up a debt, and a real ztunnel behind them waited a fifth of
a second for each (500 of them: 98 s).
"""

from __future__ import annotations

import asyncio
import collections
import socket

from zds.protocol.nodeagent import AcceptLimiter
from zds.seqpacket import peer_hung_up
from zds.server.tasks import TaskOwner


class Admission:
    """The connections waiting for their slot, first come first served."""

    def __init__(self, limiter: AcceptLimiter, tasks: TaskOwner) -> None:
        self.limiter = limiter
        self._tasks = tasks
        self._waiting: collections.deque[tuple[socket.socket, asyncio.Future[bool]]] = collections.deque()
        self._admitting: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    async def turn(self, sock: socket.socket) -> bool:
        """Wait for the slot of the connection on ``sock``: True when it is served now, False
        when its peer left before (it took no slot)."""
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((sock, turn))
        if self._admitting is None or self._admitting.done():
            self._admitting = self._tasks.spawn(self._admit(), name="ztunnel-admission")
        return await turn  # (cancelled with its connection's task: skipped when its turn comes)

    async def _admit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            sock, turn = self._waiting[0]
            if turn.done():  # its connection's task ended while it waited
                self._waiting.popleft()
            elif peer_gone(sock):
                self._waiting.popleft()
                turn.set_result(False)
            elif (wait := self.limiter.delay(loop.time())) > 0:
                await asyncio.sleep(wait)  # (then the first in line is looked at again)
            else:  # (the slot is taken)
                self._waiting.popleft()
                turn.set_result(True)


def peer_gone(sock: socket.socket) -> bool:
    """Whether the peer left (or the socket is closed already: gone too)."""
    try:
        return peer_hung_up(sock)
    except (OSError, ValueError):  # (a closed socket: fileno -1)
        return True
