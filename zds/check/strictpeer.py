"""The strict ztunnel's connections to the node agent under test.

Each connection reads in the background: every record is described, checked
against the record rules (``records.ConnectionRules``) and queued for the
scenario, which decides when to answer (answers are what real ztunnel would
say, so the node agent hears what it would hear in production). A 0-byte read
is told apart from the peer closing: only a closed peer shows ``POLLRDHUP``;
a real empty record does not (ztunnel would take it for EOF).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from zds.aio import cancel_and_wait
from zds.check.records import ConnectionRules, Seen, receive, take_fds
from zds.check.report import CLOSE_LINGER, Finding
from zds.errors import ZdsError
from zds.protocol.messages import Ack, encode_ack, encode_hello
from zds.protocol.records import Record
from zds.seqpacket import sent_empty
from zds.transport import PeerCredentials, SeqpacketConnection, connect

#: Read buffers far larger than ztunnel's, so an oversized record is seen whole.
READ_SIZE = 65536
READ_FDS = 16
_FD_SIZE = array.array("i").itemsize


class PeerClosed(ZdsError):
    """The node agent closed the connection."""


class CannotConnect(PeerClosed):
    """Connecting to the node agent's socket failed (refused, not a SOCK_SEQPACKET socket)."""

    def __init__(self, path: str, exc: OSError) -> None:
        super().__init__(f"cannot connect to the node agent at {path}: {exc.strerror or exc}")
        self.path = path
        self.errno = exc.errno


class StrictConnection:
    """One connection of the strict ztunnel; records arrive on ``queue``."""

    def __init__(
        self, no: int, sock: SeqpacketConnection, rules: ConnectionRules, log: Callable[[Seen], None]
    ) -> None:
        self.no = no
        self.sock = sock
        self.rules = rules
        self._log = log
        self.closed_at: float | None = None
        self.queue: asyncio.Queue[Seen | None] = asyncio.Queue()
        self._count = 0
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(
        cls, path: str, no: int, rules: ConnectionRules, log: Callable[[Seen], None]
    ) -> StrictConnection:
        try:
            sock = await connect(path)
        except OSError as exc:
            raise CannotConnect(path, exc) from exc
        return cls(no, sock, rules, log)

    @property
    def name(self) -> str:
        return f"conn {self.no}"

    @property
    def received(self) -> int:
        """Records received so far (empty ones included)."""
        return self._count

    @property
    def peer_closed(self) -> bool:
        return self.closed_at is not None

    def peer_credentials(self) -> PeerCredentials | None:
        try:
            return self.sock.peer_credentials()
        except OSError:
            return None

    async def _read(self) -> None:
        sock = self.sock.socket
        while True:
            await self.sock.wait_readable()
            try:
                payload, ancdata, flags, _ = sock.recvmsg(
                    READ_SIZE,
                    socket.CMSG_SPACE(READ_FDS * _FD_SIZE),
                    socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT,
                )
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                payload, ancdata, flags = b"", [], 0
            fds: list[int] = []
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % _FD_SIZE]))
            now = time.monotonic()
            if not payload:
                # (an EOF carries no fds: one that came with some is a record)
                if not sent_empty(sock, Record(payload, fds, flags)):
                    self.closed_at = now
                    await self.queue.put(None)
                    return
                self._empty_record(fds)
                continue
            self._count += 1
            self.rules.exercised["no-empty-record"] += 1
            seen = receive(self.no, self._count, now, payload, fds, flags)
            self.rules.inspect(seen)
            self._log(seen)
            await self.queue.put(seen)

    def _empty_record(self, fds: list[int]) -> None:
        """A 0-byte record: ztunnel's read_message takes any (whatever fds came with it) for
        EOF and reconnects, so it is judged here and never answered; its fds are closed."""
        infos = take_fds(fds)
        self._count += 1
        self.rules.exercised["no-empty-record"] += 1
        what = f"carrying {len(infos)} fd(s)" if infos else "(the peer did not close)"
        self.rules.report(
            "no-empty-record",
            Finding(
                f"a 0-byte record {what}: ztunnel reads it as EOF and reconnects",
                f"{self.name}, record {self._count}",
                received=b"",
                detail=[f"fd: {info}" for info in infos],
            ),
        )

    # -- talking -------------------------------------------------------------------
    async def hello(self) -> None:
        self.rules.hello_sent = True
        await self.send(encode_hello())

    async def send(self, payload: bytes) -> None:
        try:
            await self.sock.send(payload)
        except OSError as exc:
            raise PeerClosed(f"{self.name}: cannot write to the node agent: {exc.strerror or exc}") from exc

    async def answer(self, seen: Seen, error: str | None = None) -> None:
        """Answer ``seen`` (with ztunnel's own answer unless ``error`` is given)."""
        self.rules.answered(more_waiting=_waiting(self.sock.socket))
        await self.send(encode_ack(Ack(seen.answer if error is None else error)))

    async def next(self, within: float) -> Seen | None:
        """The next record, or None when none comes ``within`` seconds; PeerClosed on EOF."""
        if self.peer_closed and self.queue.empty():
            raise PeerClosed(f"{self.name}: the node agent closed the connection")
        try:
            async with asyncio.timeout(within):
                seen = await self.queue.get()
        except TimeoutError:
            return None
        if seen is None:
            raise PeerClosed(f"{self.name}: the node agent closed the connection")
        return seen

    async def take_snapshot(self, within: float) -> tuple[list[Seen], Seen | None]:
        """Answer every record until SnapshotSent: (entries, the SnapshotSent or None when it
        did not come ``within`` seconds of the previous record)."""
        entries: list[Seen] = []
        while True:
            seen = await self.next(within)
            if seen is None:
                return entries, None
            await self.answer(seen)
            if seen.kind == "snapshot_sent":
                return entries, seen
            entries.append(seen)

    async def until_closed(self, within: float) -> list[Seen]:
        """Records that arrive until the peer closes or ``within`` seconds pass (not answered)."""
        deadline = time.monotonic() + within
        got: list[Seen] = []
        with contextlib.suppress(PeerClosed):
            while (left := deadline - time.monotonic()) > 0:
                seen = await self.next(left)
                if seen is None:
                    break
                got.append(seen)
        return got

    async def close(self) -> None:
        """Close our end, after a moment in which what the node agent still sends is judged
        (a record right after SnapshotSent or an answer must not slip by)."""
        await asyncio.wait({self._reader}, timeout=CLOSE_LINGER)
        await cancel_and_wait(self._reader)
        self.sock.close()


def _waiting(sock: socket.socket) -> bool:
    """A (non-empty) record is waiting to be read: peeked at, not taken."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
