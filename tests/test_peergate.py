"""The control socket's door at the node agent's stop: its bulk lanes are ended together."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from zds.gen import nodeagent_pb2
from zds.server import bulklane
from zds.server.bulkwire import MAGIC
from zds.server.peergate import PeerGate
from zds.server.peers import AllowList, PeerGuard


async def test_the_bulk_lanes_have_their_grace_together_at_the_stop(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lane's answers get LANE_STOP_GRACE; one lane after the other, 16 lanes whose
    answers never went out held the node agent's stop for 16 s. Every lane's stream is ended
    before any lane's grace is up."""
    monkeypatch.setattr(bulklane, "LANE_STOP_GRACE", 0.2)
    events: list[tuple[str, int]] = []
    numbers = itertools.count()
    never = asyncio.Event()

    async def serve(
        requests: AsyncIterator[nodeagent_pb2.AddPodsRequest],
    ) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]:
        lane = next(numbers)
        try:
            async for _ in requests:
                pass
            events.append(("ended", lane))
            await never.wait()  # its answers never go out
        except asyncio.CancelledError:
            events.append(("cancelled", lane))
            raise
        yield nodeagent_pb2.AddPodsReply()  # (not reached)

    gate = PeerGate(str(tmp_path / "private.sock"), PeerGuard(AllowList.default(), "control"), serve)
    public = str(tmp_path / "control.sock")
    await gate.start(public, 0o600)
    loop = asyncio.get_running_loop()
    clients: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            clients.append(sock)
            await loop.sock_connect(sock, public)
            await loop.sock_sendall(sock, MAGIC)
            assert await loop.sock_recv(sock, len(MAGIC)) == MAGIC  # a lane now
        await gate.close()
    finally:
        for sock in clients:
            sock.close()
    assert sorted(events) == [("cancelled", i) for i in range(3)] + [("ended", i) for i in range(3)]
    assert [what for what, _ in events[:3]] == ["ended"] * 3, events
