"""The node agent's HTTP endpoints (Istio's node agent: port 8000): ``/healthz``,
``/readyz`` and ``/metrics`` (Prometheus text from OpenTelemetry's Prometheus exporter)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

log = logging.getLogger("zds.server.http")


def health_app(
    ready: Callable[[], tuple[bool, str]],
    metrics: Callable[[str], tuple[bytes, str]] | None = None,
    middlewares: Iterable[Callable[..., Awaitable[web.StreamResponse]]] = (),
) -> web.Application:
    """``/healthz``: the process is up. ``/readyz``: ``ready()``, 200 or 503 with what is not
    (every listener up, the container engine answering, the pod store's last write done).
    ``/metrics``: ``metrics(accept_header)`` gives the body and its content type (an Accept the
    exporter cannot read gets the text format)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = ready()
        return web.Response(status=200 if ok else 503, text=detail + "\n")

    app = web.Application(middlewares=list(middlewares))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics is not None:
        render = metrics

        async def metrics_page(request: web.Request) -> web.Response:
            accept = request.headers.get("Accept", "")
            if not accept:
                body, content_type = render("")
            else:
                try:
                    body, content_type = render(accept)
                except (TypeError, ValueError) as exc:  # e.g. openmetrics with version=abc
                    log.debug("/metrics: Accept %r not understood (%s): text format", accept, exc)
                    body, content_type = render("")
            return web.Response(body=body, headers={"Content-Type": content_type})

        app.router.add_get("/metrics", metrics_page)
    return app
