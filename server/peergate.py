"""The control socket's door: ``SO_PEERCRED`` checked before any byte reaches gRPC.

gRPC's Python server gives a handler no peer credentials on a unix socket, so the
node agent serves its control API on a private socket (in a 0700 directory only
root can enter) and puts this gate on the public path: each connection is
accepted, its peer checked against the allow-list (refused: logged once per
process, closed), and an allowed one spliced to gRPC byte for byte, with
backpressure both ways. grpcurl and ``zds pod`` see a plain gRPC socket. An allowed
connection that opens with the bulk lane's first byte instead of HTTP/2's is the lane's
(bulklane.py): ``zds pod add --from-file`` without gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from zds import defaults
from zds.server.bulklane import BulkLane, BulkServe
from zds.server.bulkwire import BUSY, MAGIC
from zds.server.peers import PeerGuard
from zds.transport import bind_unix_listener, peer_credentials

log = logging.getLogger("zds.server.control")


class _Pipe(asyncio.Protocol):
    """One direction's end: what arrives here is written to ``peer``'s transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._pending: list[bytes] = []
        #: This side sent its EOF (it will send nothing more).
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self._pending.append(data)  # the other side is still connecting

    def flush_to(self, peer: _Pipe) -> None:
        """Join ``peer``: whatever arrived meanwhile goes first."""
        self.peer = peer
        assert peer.transport is not None
        for data in self._pending:
            peer.transport.write(data)
        self._pending.clear()
        if self.eof:  # it ended before the other side was there: pass the EOF on now
            self._forward_eof()

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.eof:
            # Both directions are done, nothing more can flow: close both ends (else each
            # spliced connection would hold two fds for the rest of the node agent's life).
            if self.peer.transport is not None:
                self.peer.transport.close()
            return False
        self._forward_eof()
        return True  # keep our end open until the other side is done

    def _forward_eof(self) -> None:
        if self.peer is not None and self.peer.transport is not None and self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # Backpressure: when the other side cannot keep up, stop reading here.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


#: The warning that connections were closed for want of room comes at most this often (s).
FULL_SAID_EVERY = 10.0


def connection_capacity(soft: int | None = None) -> int:
    """How many control-socket connections may be open at once: CONTROL_SOCKET_CONNECTIONS,
    or at most half the fds beyond the node agent's reserve (3 each), at least 16; ``soft``
    is RLIMIT_NOFILE's (this process's when None)."""
    import resource

    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return defaults.CONTROL_SOCKET_CONNECTIONS
    return max(16, min(defaults.CONTROL_SOCKET_CONNECTIONS, (soft - defaults.NODE_AGENT_FD_RESERVE) // 6))


class PeerGate:
    """Lets allowed peers of ``public`` through to ``private``, or to ``bulk``'s lane."""

    def __init__(self, private: str, guard: PeerGuard, bulk: BulkServe) -> None:
        self.private = private
        self.guard = guard
        self.bulk = bulk
        self._server: asyncio.AbstractServer | None = None
        self._dialing: set[asyncio.Task[None]] = set()
        self._lanes: set[BulkLane] = set()
        #: Doors let in that have said nothing yet, oldest first, with their deadlines.
        self._silent: dict[_Door, asyncio.TimerHandle] = {}
        #: Doors let in and open (silent, or let through to gRPC; not those made lanes).
        self._open: set[_Door] = set()
        #: How many may be open at once (see CONTROL_SOCKET_CONNECTIONS).
        self.capacity = connection_capacity()
        #: Connections closed for want of room since that was last said, and when it may be again.
        self._turned_away = 0
        self._say_full_at = 0.0
        self._say_timer: asyncio.TimerHandle | None = None
        self._closed = False

    async def start(self, public: str, mode: int) -> None:
        """Bind ``public`` (cleared by the caller) with ``mode`` and open the door."""
        loop = asyncio.get_running_loop()
        sock = bind_unix_listener(public, mode=mode, kind=socket.SOCK_STREAM)
        try:
            self._server = await loop.create_unix_server(self._accepted, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise

    def _accepted(self) -> asyncio.Protocol:
        return _Door(self)

    async def close(self) -> None:
        """No new connections, and the bulk lanes' streams ended (their enrollments must not
        start while the node agent stops: gRPC's streams are ended by its own stop)."""
        self._closed = True
        if self._say_timer is not None:
            self._say_timer.cancel()
            self._say_turned_away()
        if self._server is not None:
            self._server.close()
        for door in list(self._silent):
            self.spoke(door)
            if door.transport is not None:
                door.transport.close()
        # Together: each has LANE_STOP_GRACE for its answers (one after the other, 16 lanes
        # whose clients read nothing held the stop for 16 s).
        for failed in await asyncio.gather(
            *(lane.stop() for lane in list(self._lanes)), return_exceptions=True
        ):
            if failed is not None:  # (a bug: the other lanes are stopped all the same)
                log.error("control socket: a bulk lane failed to stop: %r", failed)
        self._lanes.clear()

    def let_in(self, door: _Door) -> bool:
        """Whether ``door`` (its peer allowed) may stay: it has CONTROL_OPENING_TIMEOUT to say
        what it is; past CONTROL_SILENT_MAX silent ones, or CONTROL_SOCKET_CONNECTIONS open
        ones, the oldest silent one goes (once silent CONTROL_SILENT_GRACE); if none can, a
        door beyond ``capacity`` is closed (said at most once every FULL_SAID_EVERY seconds)."""
        loop = asyncio.get_running_loop()
        if len(self._silent) >= defaults.CONTROL_SILENT_MAX:
            self._close_oldest_silent(
                f"more than {defaults.CONTROL_SILENT_MAX} connections said nothing yet; the oldest goes"
            )
        if len(self._open) >= self.capacity:
            self._close_oldest_silent(f"{self.capacity} connections are open; the oldest silent one goes")
        if len(self._open) >= self.capacity:
            self._turned_away += 1
            if loop.time() >= self._say_full_at:
                self._say_turned_away()
            elif self._say_timer is None:  # (those of the quiet time said at its end)
                self._say_timer = loop.call_at(self._say_full_at, self._say_turned_away)
            return False
        self._open.add(door)
        self._silent[door] = loop.call_later(
            defaults.CONTROL_OPENING_TIMEOUT,
            door.give_up,
            f"it said nothing within {defaults.CONTROL_OPENING_TIMEOUT:g}s",
        )
        return True

    def _say_turned_away(self) -> None:
        self._say_timer = None
        if self._turned_away:
            log.warning(
                "control socket: %d connections are open; %d more closed (said at most every %gs)",
                len(self._open),
                self._turned_away,
                FULL_SAID_EVERY,
            )
            self._turned_away = 0
            self._say_full_at = asyncio.get_running_loop().time() + FULL_SAID_EVERY

    def _close_oldest_silent(self, reason: str) -> None:
        """Close the door silent longest, if it has been for CONTROL_SILENT_GRACE."""
        if not self._silent:
            return
        door, deadline = next(iter(self._silent.items()))
        silent_since = deadline.when() - defaults.CONTROL_OPENING_TIMEOUT
        if asyncio.get_running_loop().time() - silent_since >= defaults.CONTROL_SILENT_GRACE:
            door.give_up(reason)

    def gone(self, door: _Door) -> None:
        """``door`` closed, or was made a bulk lane (counted among the lanes then)."""
        self.spoke(door)
        self._open.discard(door)

    def spoke(self, door: _Door) -> None:
        """``door`` said something, or closed."""
        deadline = self._silent.pop(door, None)
        if deadline is not None:
            deadline.cancel()

    def open_lane(self, transport: asyncio.Transport, data: bytes) -> None:
        """Hand ``transport`` (its first bytes: ``data``) to a bulk lane."""
        self._lanes = {lane for lane in self._lanes if not lane.done}
        if len(self._lanes) >= defaults.BULK_LANES_MAX:  # (each may hold ~5 MiB: the memory bounded)
            log.warning(
                "control socket: %d bulk lanes are open; one more is closed (its client goes over AddPods)",
                len(self._lanes),
            )
            transport.write(BUSY)  # (not the opening: the client sends its pods over AddPods)
            transport.close()
            return
        lane = BulkLane(self.bulk)
        self._lanes.add(lane)
        transport.set_protocol(lane)
        lane.connection_made(transport)
        lane.data_received(data)


class _Door(_Pipe):
    """The public side of one connection: checks the peer, then, at its first bytes, dials
    gRPC or hands it to the bulk lane (an HTTP/2 client speaks first: its preface)."""

    def __init__(self, gate: PeerGate) -> None:
        super().__init__()
        self._gate = gate
        self._chosen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if not self._gate.guard.check(peer_credentials(sock) if sock is not None else None):
            transport.close()
            return
        if not self._gate.let_in(self):
            transport.close()

    def give_up(self, reason: str) -> None:
        """Close a connection that said nothing (``PeerGate.let_in``)."""
        self._gate.gone(self)  # (its place free at once: its close is seen a moment later)
        log.warning("control socket: a connection closed: %s", reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.gone(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._chosen:
            self._chosen = True
            self._gate.spoke(self)
            if self._gate._closed and self.transport is not None:
                self.transport.close()  # the node agent is stopping
                return
            if data[:1] == MAGIC[:1] and self.transport is not None:
                self._gate.gone(self)  # (its connection is the lane's now: bounded as a lane)
                self._gate.open_lane(self.transport, data)
                return
            self._dial_grpc()
        super().data_received(data)

    def eof_received(self) -> bool:
        if not self._chosen:  # it said nothing: nothing to pass on
            return False
        return super().eof_received()

    def _dial_grpc(self) -> None:
        task = asyncio.get_running_loop().create_task(self._dial())
        self._gate._dialing.add(task)
        task.add_done_callback(self._gate._dialing.discard)

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, inner = await loop.create_unix_connection(_Pipe, self._gate.private)
        except OSError as exc:
            log.error("the control API is not answering on %s: %s", self._gate.private, exc)
            if self.transport is not None:
                self.transport.close()
            return
        # Both ends may have received bytes already (gRPC's server speaks at once too: SETTINGS).
        inner.flush_to(self)
        self.flush_to(inner)
        if self.transport is None or self.transport.is_closing():
            assert inner.transport is not None
            inner.transport.close()
