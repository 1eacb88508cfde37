"""An HTTP endpoint on TCP that anyone on the node can reach, kept from using up its
process's fds (the node agent's /healthz, /readyz, /metrics; the ztunnel side's admin,
readiness and metrics endpoints). Imported only where aiohttp is."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from zds.logs import Tally

log = logging.getLogger("zds.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TcpGuard:
    """An HTTP endpoint on TCP anyone on the node can reach, kept from using up the node
    agent's fds: at most ``max_connections`` open at once (the one least recently in a request makes
    room for a new one, cut off at once: one waiting for its first request, its next, a body, or
    its answer to be read; if every one is in its handler, the new one is closed at once), and a
    connection must bring its first request within ``header_timeout`` or is closed (idle
    between requests, aiohttp's keep-alive timeout, the same), and a request's body must
    follow within as long again (else 408, and the connection closed). Each is said in a warning line
    at most every ``WARN_EVERY`` seconds, with how many it was.
    20,000 connections that sent half a request had held every fd the node agent may open."""

    WARN_EVERY = 10.0

    def __init__(self, max_connections: int = 64, header_timeout: float = 10.0) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        #: Open connections, the least recently in a request first, with the deadline of their
        #: first request (None once it came).
        self._open: dict[asyncio.BaseTransport, asyncio.TimerHandle | None] = {}
        #: Those in a request's handler (its body in, if any): not cut off for room.
        self._in_request: set[asyncio.BaseTransport] = set()
        self._refused = Tally(self.WARN_EVERY, log)
        self._dropped = Tally(self.WARN_EVERY, log)
        self._too_slow = Tally(self.WARN_EVERY, log)
        self._slow_body = Tally(self.WARN_EVERY, log)
        self._bad_body = Tally(self.WARN_EVERY, log)

    def flush(self) -> None:
        """Say what the tallies hold now (the server stops)."""
        for tally in (self._refused, self._dropped, self._too_slow, self._slow_body, self._bad_body):
            tally.flush()

    def protocol(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: AdmittedProtocol(inner(), self.admit, self.gone)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) >= self.max_connections:
            # The least recently in a request makes room (as on the ZDS and control sockets): refusing
            # the newest let idle connections, opened again as they were closed, keep every scrape
            # and probe out, and so did connections kept open after an answer (keep-alive) or
            # whose answers nobody read (pipelined requests).
            waiting = next((t for t in self._open if t not in self._in_request), None)
            if waiting is None:
                transport.close()
                self._refused.add(
                    "HTTP: %d connection(s) refused: %d open already (the most this endpoint keeps)",
                    len(self._open),
                )
                return False
            self.gone(waiting)
            cut_off(waiting)
            self._dropped.add(
                "HTTP: %d connection(s) closed to make room: %d open already, each the one least recently "
                "in a request",
                self.max_connections,
            )
        loop = asyncio.get_running_loop()
        self._open[transport] = loop.call_later(self.header_timeout, self._close_slow, transport)
        return True

    def _close_slow(self, transport: asyncio.BaseTransport) -> None:
        if not transport.is_closing():
            transport.close()
            self._too_slow.add("HTTP: %d connection(s) closed: no request within %gs", self.header_timeout)

    def gone(self, transport: asyncio.BaseTransport) -> None:
        self._in_request.discard(transport)
        timer = self._open.pop(transport, None)
        if timer is not None:
            timer.cancel()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """For an app served through ``protocol``: a request on a connection it did not admit
        is taken for one cut off and answered nobody."""
        transport = request.transport
        if transport is None or transport not in self._open:
            return _nobody_to_answer()  # (cut off to make room between its head and now)
        if (timer := self._open[transport]) is not None:
            timer.cancel()
            self._open[transport] = None
        if request.body_exists and (refusal := await self._read_body(request)) is not None:
            return refusal
        if transport not in self._open:
            return _nobody_to_answer()  # (cut off to make room while its body came)
        # In a request from here to the handler's return only: a head whose body does not come
        # (or comes a byte a second) must not keep its place for the body's 10 s.
        self._in_request.add(transport)
        try:
            return await handler(request)
        finally:
            self._in_request.discard(transport)  # (its answer is aiohttp's to write now)
            if transport in self._open:  # (the least recently in a request makes room first)
                self._open[transport] = self._open.pop(transport)

    async def _read_body(self, request: web.Request) -> web.StreamResponse | None:
        """The body within the same time as the request's head (a handler's read had none: a
        body dribbled a byte a second held its connection for good); None once it is in, else
        the 408 or 400 the request was answered."""
        try:
            async with asyncio.timeout(self.header_timeout):
                await request.read()
        except TimeoutError:
            self._slow_body.add(
                "HTTP: %d request(s) answered 408: body not in within %gs", self.header_timeout
            )
            return await answer_and_close(request, 408, "request body too slow\n")
        except (HttpProcessingError, ConnectionError, OSError) as exc:  # (a bad chunk, a reset)
            # (also one cut off to make room while its body came: gone alike, said alike)
            self._bad_body.add("HTTP: %d request(s) closed: body broken off or malformed (%s)", exc)
            return await answer_and_close(request, 400, "request body broken off or malformed\n")
        return None


def _nobody_to_answer() -> web.StreamResponse:
    """The answer to a request whose connection is gone: aiohttp's write of it fails quietly."""
    response = web.Response(status=503)
    response.force_close()
    return response


def cut_off(transport: asyncio.BaseTransport) -> None:
    """Close ``transport`` at once with a reset, what it had to send dropped: a close waits for
    that to go out (and the kernel goes on trying after the fd is closed), for ever if the peer
    reads nothing."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()  # (a stream's, asyncio's or uvloop's: both have it)


async def answer_and_close(request: web.Request, status: int, text: str) -> web.StreamResponse:
    """Answer ``status`` and close the connection at once: aiohttp would otherwise read the
    rest of an unread body for up to 10 s more (its lingering) before it closes."""
    response = web.Response(status=status, text=text)
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionError, OSError):
        pass  # (the client is gone: nothing to answer)
    finally:
        if request.transport is not None:
            request.transport.close()  # (what was written goes out first)
    return response


class AdmittedProtocol(asyncio.Protocol):
    """aiohttp's request handler (``inner``) behind ``admit(transport)``: a connection it
    refuses (and closes) is never shown to the handler; ``gone(transport)`` when an admitted
    one ends. Also the CNI endpoint's (``zds.server.unixhttp``)."""

    def __init__(
        self,
        inner: asyncio.Protocol,
        admit: Callable[[asyncio.BaseTransport], bool],
        gone: Callable[[asyncio.BaseTransport], None],
    ) -> None:
        self._inner = inner
        self._admit = admit
        self._gone = gone
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admit(transport):
            self._transport = transport
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._gone(self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()
