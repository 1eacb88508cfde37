"""One connection from the ztunnel under test, as the strict node agent of ``zds check ztunnel``
sees it.

Every record ztunnel sends is judged as it arrives: the first must be exactly
``08 01``; every later one must answer a request (nothing unasked), be a strict,
canonical ``WorkloadResponse{ack}`` and carry no fd. Every request must be answered
within ``--timeout`` (Istio's node agent waits 5 s): one that is not is a finding of
the check that sent it, and the connection is used no more (a late answer would be
taken as the next request's).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zds import defaults
from zds.aio import cancel_and_wait
from zds.check.report import CLOSE_LINGER, Finding
from zds.errors import CodecError, ZdsError
from zds.protocol.messages import Ack, decode_ack, decode_request, encode_ack, request_label
from zds.transport import SeqpacketConnection

if TYPE_CHECKING:
    from zds.check.ztbench import Bench

_FD_SIZE = array.array("i").itemsize
HELLO = b"\x08\x01"


@dataclass
class Reply:
    payload: bytes
    ack: Ack | None
    at: float


def said(reply: Reply | None) -> str:
    """What a request was answered with, as a finding says it."""
    if reply is None:
        return "nothing"
    if reply.ack is None:  # (bytes that are no Ack: replies-canonical judges them)
        return repr(reply.payload.hex(" "))
    return repr(reply.ack.error) if reply.ack.error else "an empty Ack (success)"


def unacked(what: str, sent: bytes, reply: Reply | None, conn: ZtConn) -> Finding | None:
    """The finding for a request (``what``, its bytes ``sent``) that ``reply`` did not ack;
    None if it did."""
    if reply is not None and reply.ack is not None and not reply.ack.error:
        return None
    return Finding(
        f"{what} was answered with {said(reply)}",
        conn.name,
        sent=sent,
        received=reply.payload if reply else None,
    )


class ZtConn:
    """One connection from the ztunnel under test."""

    def __init__(self, no: int, sock: socket.socket, bench: Bench) -> None:
        self.no = no
        self.conn = SeqpacketConnection(sock)
        self.bench = bench
        self.accepted_at = time.monotonic()
        self.hello_at: float | None = None
        self.closed_at: float | None = None
        self.awaiting = False
        #: The request left unanswered (when it was sent, its finding): the connection is done.
        self.unanswered: tuple[float, Finding] | None = None
        self.replies: asyncio.Queue[Reply | None] = asyncio.Queue()
        self.hello_seen = asyncio.Event()
        creds = self.conn.peer_credentials()
        self.pid: int | None = creds.pid if creds is not None else None
        self._reader = asyncio.ensure_future(self._read())

    @property
    def name(self) -> str:
        return f"conn {self.no}"

    async def _read(self) -> None:
        while True:
            await self.conn.wait_readable()
            if not self._read_one():
                self.hello_seen.set()
                await self.replies.put(None)
                return

    def _read_one(self) -> bool:
        """Read and judge one record if one is waiting; False once the peer closed."""
        try:
            payload, anc, _, _ = self.conn.socket.recvmsg(
                65536, socket.CMSG_SPACE(8 * _FD_SIZE), socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return True
        except OSError:
            payload, anc = b"", []
        fds = [
            fd
            for lvl, kind, data in anc
            if (lvl, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            for fd in array.array("i", data[: len(data) - len(data) % _FD_SIZE])
        ]
        for fd in fds:
            os.close(fd)
        now = time.monotonic()
        if not payload and not fds:
            self.closed_at = now
            return False
        self._judge(payload, len(fds), now)
        return True

    def _judge(self, payload: bytes, fds: int, now: float) -> None:
        report = self.bench.report
        where = f"{self.name}"
        if self.hello_at is None:
            self.hello_at = now
            self.hello_seen.set()
            self.bench.exercised["hello"] += 1
            if payload != HELLO or fds:
                report(
                    "hello",
                    Finding(
                        f"the first record is not ZdsHello{{V1}} (08 01){_fds(fds)}", where, received=payload
                    ),
                )
            return
        if not self.awaiting and self.unanswered is not None:
            # The answer that came too late: the request's own finding says so, not an unasked record.
            sent_at, finding = self.unanswered
            self.unanswered = None
            finding.detail.append(f"its answer came {now - sent_at:.2f}s after it was sent")
            finding.received = payload
            self._judge_answer(payload, fds, where)
            return
        if not self.awaiting:
            what = "a second ZdsHello" if payload == HELLO else "a record nobody asked for"
            report("speaks-only-when-asked", Finding(f"{what}{_fds(fds)}", where, received=payload))
            return
        self.awaiting = False
        self.replies.put_nowait(Reply(payload, self._judge_answer(payload, fds, where), now))

    def _judge_answer(self, payload: bytes, fds: int, where: str) -> Ack | None:
        """Judge an answer's bytes (replies-canonical); its Ack, if it decodes."""
        report = self.bench.report
        self.bench.exercised["replies-canonical"] += 1
        ack: Ack | None = None
        try:
            ack = decode_ack(payload)
        except CodecError as exc:
            report(
                "replies-canonical",
                Finding(f"the answer is not a WorkloadResponse{{ack}}: {exc}", where, received=payload),
            )
        if ack is not None and (encode_ack(ack, whole=True) != payload or fds):
            report(
                "replies-canonical",
                Finding(
                    f"the answer is not canonical{_fds(fds)}",
                    where,
                    received=payload,
                    detail=[f"canonical: {encode_ack(ack, whole=True).hex(' ')}"],
                ),
            )
        if len(payload) > defaults.MAX_MESSAGE_SIZE:
            report(
                "replies-canonical",
                Finding(
                    f"the answer is {len(payload)} bytes: Istio's node agent reads an answer into "
                    f"{defaults.MAX_MESSAGE_SIZE} and refuses a longer one as truncated",
                    where,
                    received=payload,
                ),
            )
        return ack

    async def send(self, payload: bytes, fds: list[int] | None = None, *, expect_reply: bool = True) -> None:
        """Write one record (even an empty one); ``fds`` are closed here."""
        if self.unanswered is not None:
            for fd in fds or []:
                os.close(fd)
            raise Unanswered(f"{self.name} is not used after a request it left unanswered")
        self.awaiting = expect_reply
        try:
            if payload:
                await self.conn.send(payload, fds or [])
            else:
                self.conn.socket.send(b"")
        except OSError as exc:
            raise ZtunnelClosed(
                f"{self.name}: cannot write to the ztunnel, which closed the connection ({exc.strerror or exc})"
            ) from exc
        finally:
            for fd in fds or []:
                os.close(fd)

    async def request(self, payload: bytes, fds: list[int] | None = None, *, check: str) -> Reply | None:
        """Send a request and wait for its answer (None: the connection closed first).

        No answer within ``--timeout`` is a finding of ``check`` and raises Unanswered: the
        connection is done, since its late answer would be read as the next request's."""
        await self.send(payload, fds)
        sent_at = time.monotonic()
        within = self.bench.options.timeout
        reply = await self.reply(within)
        if reply is not None or self.closed_at is not None:
            return reply
        self.awaiting = False
        finding = Finding(
            f"{request_named(payload)} was answered with nothing within {within:g}s; ztunnel answers "
            "every request (Istio's node agent waits 5 s: an answer after that is read as the next one's)",
            self.name,
            sent=payload,
        )
        self.unanswered = (sent_at, finding)
        self.bench.report(check, finding)
        raise Unanswered(
            f"{self.name}: {request_named(payload)} was answered with nothing within {within:g}s"
        )

    async def reply(self, within: float) -> Reply | None:
        """The next answer, if one comes within ``within`` seconds (None: none, or the connection closed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                return await self.replies.get()
        return None if self.replies.empty() else self.replies.get_nowait()

    async def closed_within(self, within: float) -> bool:
        """Whether ztunnel closes the connection within ``within`` seconds."""
        deadline = time.monotonic() + within
        while self.closed_at is None and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await asyncio.shield(self._reader)
        return self.closed_at is not None

    async def close(self) -> None:
        """Close our end; what ztunnel sent before, and in a moment more, is judged first
        (nothing unasked slips by: a record sent right after the hello or an answer)."""
        await asyncio.wait({self._reader}, timeout=CLOSE_LINGER)
        self._reader.cancel()
        with contextlib.suppress(OSError):
            while self.closed_at is None and not self.conn.closed and _readable(self.conn.socket):
                if not self._read_one():
                    break
        await cancel_and_wait(self._reader)
        self.conn.close()


class ZtunnelClosed(ZdsError):
    """The ztunnel closed a connection a record was being written to (mid-snapshot, say)."""


class Unanswered(ZdsError):
    """A request was not answered in time: what its scenario had left to judge is not judged."""


def request_named(payload: bytes) -> str:
    """How a finding names a request it sent: "AddWorkload uid=u1", "a 3-byte record"."""
    try:
        return request_label(decode_request(payload))
    except ZdsError:
        return f"a {len(payload)}-byte record"


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _fds(n: int) -> str:
    return f" (with {n} fd{'s' if n != 1 else ''})" if n else ""
