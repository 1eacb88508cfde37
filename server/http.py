"""The node agent's HTTP endpoints: ``/healthz`` and ``/readyz`` (Istio's node agent: port 8000)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


def health_app(ready: Callable[[], tuple[bool, str]]) -> web.Application:
    """``/healthz``: the process is up. ``/readyz``: every listener is up (else 503 with what is not)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = ready()
        return web.Response(status=200 if ok else 503, text=detail + "\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
