"""The control socket's door at the node agent's stop: its bulk lanes are ended together,
and one that broke before does not stop the others' ending (nor the node agent's stop)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pathlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import pytest

from tests.harness import async_wait_until
from zds.gen import nodeagent_pb2
from zds.server import bulklane
from zds.server.bulkwire import MAGIC, Deframer, frame
from zds.server.peergate import PeerGate
from zds.server.peers import AllowList, PeerGuard


class Lanes:
    """A door on ``tmp``/control.sock whose bulk lanes never answer: what each lane's
    stream did (``ended``: its requests ended; ``cancelled``) in ``events``, in order."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.events: list[tuple[str, int]] = []
        self._numbers = itertools.count()
        self._never = asyncio.Event()
        self.public = str(tmp / "control.sock")
        self.gate = PeerGate(str(tmp / "private.sock"), PeerGuard(AllowList.default(), "control"), self.serve)
        self.clients: list[socket.socket] = []

    async def serve(
        self, requests: AsyncIterator[nodeagent_pb2.AddPodsRequest], *, brief: bool = False
    ) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]:
        lane = next(self._numbers)
        try:
            async for _ in requests:
                pass
            self.events.append(("ended", lane))
            await self._never.wait()  # its answers never go out
        except asyncio.CancelledError:
            self.events.append(("cancelled", lane))
            raise
        yield nodeagent_pb2.AddPodsReply()  # (not reached)

    async def open(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.clients.append(sock)
        await loop.sock_connect(sock, self.public)
        await loop.sock_sendall(sock, MAGIC)
        assert await loop.sock_recv(sock, len(MAGIC)) == MAGIC  # a lane now
        return sock


@pytest.fixture
def lanes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lanes]:
    monkeypatch.setattr(bulklane, "LANE_STOP_GRACE", 0.2)
    made = Lanes(tmp_path)
    try:
        yield made
    finally:
        for sock in made.clients:
            sock.close()


async def test_the_bulk_lanes_have_their_grace_together_at_the_stop(lanes: Lanes) -> None:
    """Each lane's answers get LANE_STOP_GRACE; one lane after the other, 16 lanes whose
    answers never went out held the node agent's stop for 16 s. Every lane's stream is ended
    before any lane's grace is up."""
    await lanes.gate.start(lanes.public, 0o600)
    for _ in range(3):
        await lanes.open()
    await lanes.gate.close()
    assert sorted(lanes.events) == [("cancelled", i) for i in range(3)] + [("ended", i) for i in range(3)]
    assert [what for what, _ in lanes.events[:3]] == ["ended"] * 3, lanes.events


async def test_a_lane_broken_before_the_stop_does_not_break_the_stop(lanes: Lanes) -> None:
    """A lane whose client sent a frame no zds end sends is cut off (its stream cancelled) and
    stays among the lanes until the next opens: at the stop, its cancelled stream raised
    CancelledError out of the door's close, and the node agent's stop ended there (gRPC, the
    pod store's close, the socket files: all skipped)."""
    await lanes.gate.start(lanes.public, 0o600)
    broken = await lanes.open()
    for _ in range(2):
        await lanes.open()
    await asyncio.get_running_loop().sock_sendall(broken, b"\x07" + b"\xff" * 8)  # no such frame
    with contextlib.suppress(ConnectionError):
        while await asyncio.get_running_loop().sock_recv(broken, 64):
            pass  # (until it is closed)
    await lanes.gate.close()
    assert ("cancelled", 0) in lanes.events and ("ended", 0) not in lanes.events
    assert sorted(e for e in lanes.events if e[1] != 0) == [
        ("cancelled", 1),
        ("cancelled", 2),
        ("ended", 1),
        ("ended", 2),
    ]


async def test_a_lane_silent_once_open_is_closed_unless_it_is_owed_answers(
    lanes: Lanes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an unfinished opening had a deadline: 16 clients that opened lanes and said nothing
    more held every lane, and the bulk path with them, for as long as they liked. A lane whose
    pods are still being enrolled waits for its answers however long they take."""
    monkeypatch.setattr(bulklane, "LANE_IDLE", 0.3)
    loop = asyncio.get_running_loop()
    await lanes.gate.start(lanes.public, 0o600)
    try:
        silent = await lanes.open()
        owed = await lanes.open()  # (the stand-in never answers: its pod stays owed)
        request = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest(uid="u0")])
        await loop.sock_sendall(owed, frame(request.SerializeToString()))
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionError):
                assert await loop.sock_recv(silent, 64) == b""  # closed by the node agent
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):  # (3 idle times: still open)
                await loop.sock_recv(owed, 64)
    finally:
        await lanes.gate.close()


@contextlib.asynccontextmanager
async def lane_client(
    tmp_path: pathlib.Path, serve: bulklane.BulkServe
) -> AsyncIterator[tuple[PeerGate, socket.socket]]:
    """A control socket's door serving ``serve``, and a client whose lane is open, one pod sent."""
    loop = asyncio.get_running_loop()
    gate = PeerGate(str(tmp_path / "private.sock"), PeerGuard(AllowList.default(), "control"), serve)
    await gate.start(str(tmp_path / "control.sock"), 0o600)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as sock:
        await loop.sock_connect(sock, str(tmp_path / "control.sock"))
        request = nodeagent_pb2.AddPodsRequest(pods=[nodeagent_pb2.AddPodRequest(uid="u0")])
        await loop.sock_sendall(sock, MAGIC + frame(request.SerializeToString()))
        assert await loop.sock_recv(sock, len(MAGIC)) == MAGIC
        yield gate, sock


async def test_a_lanes_answers_go_out_though_its_client_ends_its_requests_during_the_stop(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that half-closed (its last request sent) while the stop gave the lane its
    grace: the lane took that EOF for a broken client and closed, and every answer of the
    pods the stop had cut short was dropped ("closed the connection without answering";
    uvloop delivered an early EOF again once reading resumed, so it came then too)."""
    monkeypatch.setattr(bulklane, "LANE_STOP_GRACE", 10.0)  # (an answer comes at once)
    taken, go = asyncio.Event(), asyncio.Event()

    async def serve(
        requests: AsyncIterator[nodeagent_pb2.AddPodsRequest], *, brief: bool = False
    ) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]:
        async for request in requests:
            taken.set()
            await go.wait()  # (an enrollment under way, cut short by the stop)
            yield nodeagent_pb2.AddPodsReply(
                results=[nodeagent_pb2.AddPodsResult(index=0, uid=request.pods[0].uid, code=14)]
            )

    loop = asyncio.get_running_loop()
    async with lane_client(tmp_path, serve) as (gate, sock):
        await asyncio.wait_for(taken.wait(), 10)
        closing = asyncio.ensure_future(gate.close())
        await async_wait_until(lambda: all(lane._broken for lane in gate._lanes), "the lane's stop begun")
        sock.shutdown(socket.SHUT_WR)  # its requests end during the grace
        for _ in range(20):  # turns of the loop: the EOF is read in one of them
            await asyncio.sleep(0)
        go.set()
        received = bytearray()
        while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            received += data
        await asyncio.wait_for(closing, 10)
    [reply] = Deframer().feed(bytes(received))
    assert nodeagent_pb2.AddPodsReply.FromString(reply).results[0].uid == "u0"


async def test_a_lanes_last_answers_still_buffered_at_the_stop_go_out(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers written while the client read slowly wait in the transport's buffer; the stop
    aborted the connection as soon as the lane's stream ended, and what the buffer held was
    dropped (the client saw a cut frame, its last pods unanswered). The close flushes it."""
    monkeypatch.setattr(bulklane, "LANE_STOP_GRACE", 10.0)
    count, message = 64, "x" * 16_000  # (~1 MB of answers: more than the socket holds)
    taken = asyncio.Event()

    async def serve(
        requests: AsyncIterator[nodeagent_pb2.AddPodsRequest], *, brief: bool = False
    ) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]:
        async for _ in requests:
            taken.set()
            for i in range(count):
                yield nodeagent_pb2.AddPodsReply(
                    results=[nodeagent_pb2.AddPodsResult(index=i, uid=f"u{i}", code=14, message=message)]
                )
            return

    loop = asyncio.get_running_loop()
    async with lane_client(tmp_path, serve) as (gate, sock):
        await asyncio.wait_for(taken.wait(), 10)
        [lane] = gate._lanes
        await async_wait_until(lambda: not lane._writable.is_set(), "the lane's writing paused")
        closing = asyncio.ensure_future(gate.close())
        await async_wait_until(lambda: lane._stopping, "the lane's stop begun")
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := await asyncio.wait_for(loop.sock_recv(sock, 4096), 10):
                received += data
        await asyncio.wait_for(closing, 10)
    replies = [nodeagent_pb2.AddPodsReply.FromString(r) for r in Deframer().feed(bytes(received))]
    assert [reply.results[0].index for reply in replies] == list(range(count))
