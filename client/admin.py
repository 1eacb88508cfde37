"""ztunnel's local HTTP endpoints: admin ``/config_dump``, readiness, metrics.

As ztunnel serves them: admin on 127.0.0.1:15000 (``/config_dump``, whose
``workloadState`` key is the in-pod manager's view, ``src/inpod/admin.rs``),
readiness on 15021 (``/healthz/ready``: 200 ``ready``, or 500 ``not ready,
pending: ...``, ``src/readiness/server.rs``) and metrics on 15020
(``/metrics`` and ``/stats/prometheus``, ztunnel's OpenMetrics text).

In two steps: ``bind`` (at start-up: a taken port stops ``zds ztunnel`` at once)
and ``serve`` (aiohttp, imported only then: ~125 ms from the first snapshot's ack to
a served endpoint here, ~40 of it aiohttp making two TLS client contexts at import;
``zds ztunnel`` does it once the first snapshot is in, so it never delays those pods;
a request that comes before waits in the socket's backlog meanwhile).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from zds import defaults
from zds.client.metrics import content_type
from zds.errors import ZdsError, resolvable_name
from zds.values import frozen

if TYPE_CHECKING:
    import asyncio

    from aiohttp import web

    from zds.httpguard import TcpGuard

log = logging.getLogger("zds.ztunnel.http")

#: What a listen flag accepts to mean "do not serve this endpoint".
OFF = ("off", "none", "")


class ListenAddressError(ZdsError, ValueError):
    """A HOST:PORT flag value that cannot be used."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port); port 0 picks a free one."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ListenAddressError(f"bad listen address {value!r}: expected [V6ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ListenAddressError(f"bad listen address {value!r}: expected HOST:PORT")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ListenAddressError(f"bad port in listen address {value!r}: expected 0-65535")
    if not resolvable_name(host):
        raise ListenAddressError(f"bad listen address {value!r}: {host!r} is no host name or address")
    return host or "0.0.0.0", int(port_text)


def bind_tcp(value: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT`` (in this, the host's, netns)."""
    host, port = parse_listen(value)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        addr: tuple[Any, ...] = (host, port)
    except ValueError:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise ListenAddressError(f"cannot resolve {host!r} in listen address {value!r}: {exc}") from exc
        family, addr = info[0], info[4]
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenAddressError(f"cannot listen on {value}: {exc.strerror or exc}") from exc
    return sock


def format_sockname(sock: socket.socket) -> str:
    """``host:port`` of a bound socket (``[v6]:port`` for IPv6)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


@frozen
class Views(NamedTuple):
    """Where the endpoints read from: callables, so they always show the current state."""

    config_dump: Callable[[], dict[str, Any]]
    ready: Callable[[], bool]
    metrics: Callable[[], str]
    #: GET /faults: every fault armed so far.
    faults: Callable[[], list[dict[str, Any]]] = list
    #: POST /faults: arm one (None: faults cannot be armed here).
    arm_fault: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
    #: DELETE /faults[/ID]: clear one, or every armed one (None where they cannot be armed).
    clear_faults: Callable[[str], list[dict[str, Any]]] | None = None


def admin_routes(views: Views) -> list[web.RouteDef]:
    from aiohttp import web

    async def config_dump(request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(views.config_dump(), indent=2, sort_keys=False) + "\n",
            content_type="application/json",
        )

    async def index(request: web.Request) -> web.Response:
        return web.Response(
            text="zds ztunnel admin\n  /config_dump  dump the current state\n"
            "  /faults       faults on demand: GET lists them, POST {kind, count, delay, text, after} arms one,\n"
            "                DELETE clears every armed one (DELETE /faults/ID: that one)\n"
        )

    async def list_faults(request: web.Request) -> web.Response:
        return web.json_response(views.faults())

    not_here = {
        "error": "faults cannot be armed here: start zds ztunnel with --faults-api (or --faults FILE)"
    }

    async def arm_fault(request: web.Request) -> web.Response:
        if views.arm_fault is None:
            return web.json_response(not_here, status=404)
        try:
            entry = await request.json()
        except (ValueError, RecursionError, LookupError):  # (LookupError: a charset Python lacks)
            return web.json_response(
                {"error": "the body must be a JSON object {kind, count, delay, text, after}"}, status=400
            )
        try:
            fault = await views.arm_fault(entry)
        except ValueError as exc:  # ZtunnelFaultError
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(fault)

    async def clear_faults(request: web.Request) -> web.Response:
        if views.clear_faults is None:
            return web.json_response(not_here, status=404)
        try:
            return web.json_response(views.clear_faults(request.match_info.get("id", "")))
        except ValueError as exc:  # ZtunnelFaultError: no such fault
            return web.json_response({"error": str(exc)}, status=404)

    return [
        web.route("*", "/config_dump", config_dump),  # (ztunnel's answer any method)
        web.route("*", "/", index),
        web.get("/faults", list_faults),
        web.post("/faults", arm_fault),
        web.delete("/faults", clear_faults),
        web.delete("/faults/{id}", clear_faults),
    ]


def readiness_routes(views: Views) -> list[web.RouteDef]:
    from aiohttp import web

    async def ready(request: web.Request) -> web.Response:
        if views.ready():
            return web.Response(text="ready\n")
        return web.Response(
            status=defaults.READINESS_NOT_READY_STATUS,
            text=f"not ready, pending: {defaults.READINESS_TASK}\n",
        )

    return [web.get("/healthz/ready", ready, allow_head=False)]  # (ztunnel: GET only, else 405)


#: What /metrics may be compressed with, preferred first on equal q-values (ztunnel's
#: tower-http also offers zstd and br, ahead of these).
CODINGS = ("gzip", "deflate")


def metrics_coding(accept_encoding: str) -> str | None:
    """The coding of ``CODINGS`` the client's ``Accept-Encoding`` prefers by its q-values
    (``*`` for any; q=0 refuses one), or None: the body goes as it is."""
    weights: dict[str, float] = {}
    for entry in accept_encoding.lower().split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        q = 1.0
        for param in params:
            key, _, number = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(number)
                except ValueError:
                    q = 0.0
        weights[name] = q
    q_of = {coding: weights.get(coding, weights.get("*", 0.0)) for coding in CODINGS}
    best = max(CODINGS, key=lambda coding: q_of[coding])  # (the first of the best: gzip on a tie)
    return best if q_of[best] > 0 else None


def metrics_routes(views: Views) -> list[web.RouteDef]:
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(text=views.metrics())
        response.headers["Content-Type"] = content_type(request.headers.getall("Accept", ()))
        # Compressed as ztunnel's stats server does (gzip for Prometheus's scrapes).
        response.headers["Vary"] = "accept-encoding"
        coding = metrics_coding(request.headers.get("Accept-Encoding", ""))
        if coding is not None:
            response.enable_compression(web.ContentCoding(coding))
        return response

    return [
        web.route("*", "/metrics", metrics),
        web.route("*", "/stats/prometheus", metrics),
    ]  # (any method, as ztunnel's)


async def _empty_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The router's 404 and 405 without a body, as ztunnel's servers answer them
    (``empty_response``; a 405 keeps aiohttp's Allow header)."""
    from aiohttp import web

    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        allow = exc.headers.get("Allow")
        return web.Response(status=exc.status, headers={"Allow": allow} if allow is not None else None)


class HttpEndpoints:
    """The admin, readiness and metrics servers; one server per distinct address."""

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._guards: list[TcpGuard] = []
        #: Bound and listening, not served yet: (endpoint names, socket).
        self._bound: list[tuple[list[str], socket.socket]] = []
        #: endpoint name → bound address, e.g. {"admin": "127.0.0.1:15000"}.
        self.bound: dict[str, str] = {}

    def bind(self, listens: dict[str, str]) -> None:
        """Bind and listen ``listens[name]`` for each name not switched off (ListenAddressError
        says which flag to change). Names given the same non-zero address share one server."""
        groups: dict[str, list[str]] = {}
        for name, value in listens.items():
            if value.strip().lower() in OFF:
                continue
            key = value if parse_listen(value)[1] != 0 else f"{value}#{name}"
            groups.setdefault(key, []).append(name)
        try:
            for names in groups.values():
                try:
                    sock = bind_tcp(listens[names[0]])
                except ListenAddressError as exc:
                    flags = " / ".join(f"--{name}-listen" for name in names)
                    raise ListenAddressError(f"{exc} (for {flags}; pick another address, or 'off')") from exc
                self._bound.append((names, sock))
                for name in names:
                    self.bound[name] = format_sockname(sock)
        except BaseException:
            self._close_bound()
            raise

    async def serve(self, routes: dict[str, list[web.RouteDef]]) -> None:
        """Serve ``routes[name]`` on each socket ``bind`` made (imports aiohttp)."""
        import asyncio

        from aiohttp import web

        from zds.httpguard import TcpGuard

        loop = asyncio.get_running_loop()
        try:
            while self._bound:
                names, sock = self._bound[0]
                # Anyone on the node can connect: at most 64 at once, 10 s to bring a request
                # (connections that said nothing had used up the fds the pods' sockets need).
                guard = TcpGuard()
                app = web.Application(middlewares=[guard.middleware, web.middleware(_empty_errors)])
                for name in names:
                    app.add_routes(routes[name])
                runner = web.AppRunner(
                    app, access_log=None, handle_signals=False, keepalive_timeout=guard.header_timeout
                )
                try:
                    await runner.setup()
                    assert runner.server is not None
                    server = await loop.create_server(guard.protocol(runner.server), sock=sock, backlog=128)
                except BaseException:
                    await runner.cleanup()
                    raise
                self._bound.pop(0)
                self._servers.append(server)
                self._runners.append(runner)
                self._guards.append(guard)
                for name in names:
                    log.info("%s listening on %s", name, self.bound[name])
        except BaseException:
            await self.close()
            raise

    def _close_bound(self) -> None:
        bound, self._bound = self._bound, []
        for _names, sock in bound:
            sock.close()

    async def close(self) -> None:
        """Stop every server (and close what was bound and never served)."""
        self._close_bound()
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        guards, self._guards = self._guards, []
        for guard in guards:
            guard.flush()
