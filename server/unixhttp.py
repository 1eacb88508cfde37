"""An HTTP endpoint on a unix socket that a privileged daemon can leave open.

Istio's CNI plugin talks to the node agent over HTTP on a unix socket; zds serves
the same endpoint with aiohttp, guarded:

- only allowed peers (``SO_PEERCRED``, see ``peers``): others are closed at once;
- the request must arrive in time: headers within ``header_timeout`` of the
  connection, the body within ``body_timeout`` (a half-sent request is closed);
- at most ``max_concurrent`` requests in flight (more get 503 at once, never a queue),
  and bodies of at most ``max_body`` bytes (413);
- at most ``max_waiting`` connections whose request has not come yet (the oldest is
  closed): idle connections cannot use up the fds;
- one request per connection (``Connection: close``; Istio's plugin makes one);
- one WARNING line per refused, aborted or bad request, with the peer's pid — never a
  traceback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from zds import defaults
from zds.httpguard import AdmittedProtocol, Handler, answer_and_close
from zds.server.peers import PeerGuard
from zds.transport import PeerCredentials, bind_unix_listener, peer_credentials

log = logging.getLogger("zds.server.http")


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_concurrent: int = 64
    max_body: int = 64 * 1024
    max_waiting: int = defaults.CONTROL_SILENT_MAX


class GuardedUnixHttp:
    """Serves ``app`` on a unix socket with the guards above; ``start`` then ``close``."""

    def __init__(self, app: web.Application, guard: PeerGuard, limits: HttpLimits = HttpLimits()) -> None:
        self.app = app
        self.guard = guard
        self.limits = limits
        self._in_flight = 0
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        app.middlewares.append(self._middleware)

    async def start(self, path: str, mode: int) -> None:
        """Bind ``path`` (cleared by the caller), restrict it to ``mode``, serve."""
        loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return AdmittedProtocol(server(), self._admit, self._gone)

        sock = bind_unix_listener(path, mode=mode, kind=socket.SOCK_STREAM)
        try:
            self._server = await loop.create_unix_server(protocol, sock=sock, backlog=128)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for timer in self._deadlines.values():
            timer.cancel()
        self._deadlines.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- per connection ------------------------------------------------------------------
    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        sock = transport.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        if not self.guard.check(peer):
            transport.close()
            return False
        if len(self._deadlines) >= self.limits.max_waiting:
            oldest = next(iter(self._deadlines))
            self._deadlines.pop(oldest).cancel()
            log.warning(
                "closed a %s connection whose request had not come whole: more than %d were waiting",
                self.guard.socket_name,
                self.limits.max_waiting,
            )
            oldest.close()
        loop = asyncio.get_running_loop()
        self._deadlines[transport] = loop.call_later(
            self.limits.header_timeout, self._too_slow, transport, peer
        )
        return True

    def _gone(self, transport: asyncio.BaseTransport) -> None:
        timer = self._deadlines.pop(transport, None)
        if timer is not None:
            timer.cancel()

    def _too_slow(self, transport: asyncio.BaseTransport, peer: PeerCredentials | None) -> None:
        self._deadlines.pop(transport, None)
        if not transport.is_closing():
            log.warning(
                "closed a %s request from %s that did not arrive within %gs",
                self.guard.socket_name,
                _who(peer),
                self.limits.header_timeout,
            )
            transport.close()

    # -- per request ---------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        timer = self._deadlines.pop(request.transport, None) if request.transport is not None else None
        if timer is not None:
            timer.cancel()
        peer = _peer_of(request)
        if self._in_flight >= self.limits.max_concurrent:
            log.warning(
                "refused a %s request from %s: %d requests in flight already",
                self.guard.socket_name,
                _who(peer),
                self._in_flight,
            )
            # (Retry-After: zds-cni asks again within its timeout; other 503s are answers)
            busy = web.Response(status=503, text="too many requests in flight; try again\n")
            busy.headers["Retry-After"] = "1"
            return _closing(busy)
        self._in_flight += 1
        try:
            try:
                async with asyncio.timeout(self.limits.body_timeout):
                    await request.read()
            except TimeoutError:
                log.warning(
                    "closed a %s request from %s whose body did not arrive within %gs",
                    self.guard.socket_name,
                    _who(peer),
                    self.limits.body_timeout,
                )
                return await answer_and_close(request, 408, "request body too slow\n")
            except web.HTTPRequestEntityTooLarge:
                log.warning(
                    "refused a %s request from %s: body over %d bytes",
                    self.guard.socket_name,
                    _who(peer),
                    self.limits.max_body,
                )
                return _closing(web.Response(status=413, text=f"body over {self.limits.max_body} bytes\n"))
            except (ConnectionError, OSError) as exc:
                log.warning("a %s request from %s was aborted: %s", self.guard.socket_name, _who(peer), exc)
                return _closing(web.Response(status=400, text="request aborted\n"))
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # (aiohttp's 404 and 405, raised past the answers above: kept alive, they were
                # outside every limit on connections)
                response = web.Response(
                    status=exc.status, reason=exc.reason, text=exc.text, headers=exc.headers
                )
            return _closing(response)
        finally:
            self._in_flight -= 1


def _peer_of(request: web.Request) -> PeerCredentials | None:
    transport = request.transport
    sock: Any = transport.get_extra_info("socket") if transport is not None else None
    return peer_credentials(sock) if sock is not None else None


def _who(peer: PeerCredentials | None) -> str:
    return f"pid {peer.pid} uid {peer.uid}" if peer is not None else "an unknown peer"


def _closing(response: web.StreamResponse) -> web.StreamResponse:
    response.force_close()
    return response
