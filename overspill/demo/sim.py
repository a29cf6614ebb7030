"""Simulated model servers: a fixed number of slots, a fixed service time, and an in-flight gauge.

A server can also shed load as inference servers' admission control does: past `shed_limit`
requests at once it answers `shed_status` (429 or 503) at once, before any work. After the
work it can answer another `status` (a generic failure: 500) or drop the connection.

The gauge `model_inflight_requests` (queued + being served) is what a real inference server's
queue-depth metric looks like to Prometheus, so it can drive offloading in the demo and tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import prometheus_client as prom
from aiohttp import web

log = logging.getLogger(__name__)

RECENT_REQUESTS = 1000


@dataclass(frozen=True)
class SeenRequest:
    """One request as it arrived, so tests can assert on what Envoy forwarded."""

    method: str
    path: str
    host: str
    headers: dict[str, str]


@dataclass
class ServerCounts:
    """What arrived at one server; plain counters, read directly by tests and the demo."""

    total: int = 0  # every request that arrived, shed ones included
    shed: int = 0  # turned away at the concurrency limit before any work
    inflight: int = 0
    max_inflight: int = 0
    paths: Counter[str] = field(default_factory=Counter)
    hosts: Counter[str] = field(default_factory=Counter)
    recent: deque[SeenRequest] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    # The in-flight count integrated over time (request-seconds), up to `inflight_at`: its
    # difference over an interval, divided by the interval, is the average in-flight count,
    # which a sampled gauge only estimates.
    inflight_area: float = 0.0
    inflight_at: float = field(default_factory=time.monotonic)

    def add_inflight(self, delta: int) -> None:
        now = time.monotonic()
        self.inflight_area += self.inflight * (now - self.inflight_at)
        self.inflight_at = now
        self.inflight += delta

    def area_now(self) -> float:
        """Request-seconds in flight from the start until now."""
        return self.inflight_area + self.inflight * (time.monotonic() - self.inflight_at)

    def header_values(self, name: str) -> Counter[str]:
        """Values of header `name` (case-insensitive) over the recent requests; '' when absent."""
        key = name.lower()
        return Counter(r.headers.get(key, "") for r in self.recent)


class ModelServer:
    """An aiohttp server on 127.0.0.1 standing in for one model's pods (or its remote copy)."""

    def __init__(
        self, name: str, concurrency: int | None, service_time: float, model_label: str | None = None
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.service_time = service_time
        self.model_label = model_label or name
        # Admission control: past this many requests at once, answer `shed_status` before any work.
        self.shed_limit: int | None = None
        self.shed_status = 429
        # Drop the connection after the work instead of answering (a crash mid-request).
        self.reset_after_work = False
        self.counts = ServerCounts()
        # ORCA named metrics returned (header endpoint-load-metrics) to requests that ask for them,
        # as vLLM returns num_requests_waiting and kv_cache_usage_perc; empty: none.
        self.orca: dict[str, float] = {}
        # The status every answer carries: a test sets 500 to stand for a model server failing.
        self.status = 200
        self.port: int | None = None
        self._slots = asyncio.Semaphore(concurrency) if concurrency else None
        self._runner: web.AppRunner | None = None
        # Own registry: several servers in one process must not collide in the global one.
        self.registry = prom.CollectorRegistry()
        labels = {"model": self.model_label}
        self._inflight_gauge = prom.Gauge(
            "model_inflight_requests", "Requests queued or being served", ["model"], registry=self.registry
        ).labels(**labels)
        self._requests_counter = prom.Counter(
            "model_requests", "Requests received", ["model"], registry=self.registry
        ).labels(**labels)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"model server {self.name} is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as a Prometheus target or an EndpointSlice address would name it."""
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:port (0 = ephemeral) and return the real port."""
        # Inference inputs (images, long prompts) run to megabytes: aiohttp's 1 MiB default would
        # answer 413 itself and pass for a proxy limit.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        # Short shutdown: stop() should not wait a minute for keep-alive connections.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info(
            "model server started name=%s port=%s concurrency=%s", self.name, self.port, self.concurrency
        )
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("model server stopped name=%s total=%s", self.name, self.counts.total)

    async def __aenter__(self) -> ModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _serve(self, request: web.Request) -> web.Response:
        await request.read()  # drain the body so keep-alive connections stay usable
        counts = self.counts
        host = request.headers.get("Host", "")
        counts.total += 1
        counts.paths[request.path] += 1
        counts.hosts[host] += 1
        counts.recent.append(
            SeenRequest(
                request.method, request.path, host, {k.lower(): v for k, v in request.headers.items()}
            )
        )
        self._requests_counter.inc()
        if self.shed_limit is not None and counts.inflight >= self.shed_limit:
            counts.shed += 1
            return web.json_response(
                {"error": "overloaded, not started", "served_by": self.name},
                status=self.shed_status,
                headers={"x-served-by": self.name},
            )
        counts.add_inflight(+1)
        counts.max_inflight = max(counts.max_inflight, counts.inflight)
        self._inflight_gauge.set(counts.inflight)
        try:
            if self._slots is None:
                await asyncio.sleep(self.service_time)
            else:
                async with self._slots:
                    await asyncio.sleep(self.service_time)
        finally:
            counts.add_inflight(-1)
            self._inflight_gauge.set(counts.inflight)
        body = {"served_by": self.name, "path": request.path, "host": host}
        headers = {"x-served-by": self.name}
        if self.reset_after_work and request.transport is not None:
            request.transport.abort()
            raise web.HTTPInternalServerError  # never sent: the connection is gone
        if self.orca and request.headers.get("endpoint-load-metrics-format") == "TEXT":  # as vLLM
            metrics = ", ".join(f"named_metrics.{k}={v:g}" for k, v in sorted(self.orca.items()))
            headers["endpoint-load-metrics"] = f"TEXT {metrics}"
        return web.json_response(body, status=self.status, headers=headers)

    async def _metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=prom.generate_latest(self.registry))
        resp.headers["Content-Type"] = prom.CONTENT_TYPE_LATEST
        return resp
