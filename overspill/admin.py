"""The control plane's HTTP side: /metrics for Prometheus, /status for `overspill status`,
/healthz (the process is alive) and /readyz (its first state is loaded and xDS is served)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from metrics.exposition import Registry


def make_app(
    status: Callable[[], dict], registry: Registry, ready: Callable[[], bool] = lambda: True
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=registry.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_json(_: web.Request) -> web.Response:
        return web.json_response(status())

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n") if ready() else web.Response(status=503, text="loading\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
