"""A whole Overspill stack on loopback for end-to-end tests: real Prometheus, real Envoy, the
real `overspill serve` process, and in-process model servers that count what reaches them.

The offloading metric is a gauge the test sets (`overspill_test_load{model=...}`), scraped by
Prometheus like any exporter, so a test decides exactly when the metric crosses its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import prometheus_client as prom
import pytest
import yaml
from aiohttp import web

from overspill.demo.procs import (
    ENVOY_HINT,
    EXPORTERS_JOB,
    ComponentMissing,
    ControlPlaneProcess,
    Envoy,
    Prometheus,
    component_jobs,
    find_binary,
    free_port,
)
from overspill.demo.sim import ModelServer
from xds.render import ads_bootstrap

SCRAPE_INTERVAL = 1.0
EVALUATION_INTERVAL = 1.0
# How long after the metric crosses its target offloading may take to show in traffic.
SWITCH_BUDGET = EVALUATION_INTERVAL + SCRAPE_INTERVAL + 2.0


def missing(exc: ComponentMissing) -> None:
    """A missing real component fails under CI and skips on a developer's machine."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required component missing under CI: {exc}")
    pytest.skip(str(exc))


def envoy_binary() -> str:
    """The venv's Envoy; missing, it fails under CI and skips elsewhere."""
    try:
        return find_binary("envoy", ENVOY_HINT, before=[Path(sys.executable).parent / "envoy"])
    except ComponentMissing as exc:
        missing(exc)
        raise


class Knob:
    """The test-controlled offloading metric, served to Prometheus from this process."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.gauge = prom.Gauge(
            "overspill_test_load", "Test-controlled load", ["model"], registry=self.registry
        )
        self.runner: web.AppRunner | None = None
        self.port = 0

    def set(self, model: str, value: float) -> None:
        self.gauge.labels(model).set(value)

    async def start(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=prom.generate_latest(self.registry), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@dataclass
class Model:
    """One model of the stack: its local and remote servers and the knobs of its CR."""

    name: str
    namespace: str = "default"
    percentage: float = 50
    buffer_seconds: float = 30
    activation_seconds: float = 0
    threshold: float = 10
    path_prefix: str = "/standby"
    ready: bool = True
    metrics: list[dict] | None = None  # offloading metrics (default: the test-controlled gauge)
    policies: list[dict] | None = None  # spec.policies
    remote_fields: dict | None = None  # more remoteBackend fields (location, flavor...)
    spillover: dict | None = None  # behavior.spillover, as written in the CR
    local: ModelServer = field(init=False)
    remote: ModelServer = field(init=False)

    def __post_init__(self) -> None:
        self.local = ModelServer(f"{self.name}-local", None, 0.0, self.name)
        self.remote = ModelServer(f"{self.name}-remote", None, 0.0, f"{self.name}-remote")

    @property
    def host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local:8080"

    def manifests(self) -> list[dict]:
        labels = {"kubernetes.io/service-name": self.name}
        meta = {"name": self.name, "namespace": self.namespace}
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": self.local.port}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"{self.name}-abcde", "namespace": self.namespace, "labels": labels},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": self.ready}}],
                "ports": [{"name": "http", "port": self.local.port, "protocol": "TCP"}],
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta,
                "spec": {"replicas": 1},
                "status": {"replicas": 1, "readyReplicas": 1},
            },
            {
                "apiVersion": "deployment.beamlit.com/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": meta,
                "spec": {
                    "model": self.name,
                    "modelSourceRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": self.name},
                    "serviceRef": {"name": self.name, "namespace": self.namespace, "targetPort": 8080},
                    **({"policies": self.policies} if self.policies is not None else {}),
                    "offloadingConfig": {
                        "remoteBackend": {
                            "host": self.remote.address,
                            "scheme": "http",
                            "pathPrefix": self.path_prefix,
                            "headersToAdd": [{"name": "x-offloaded-by", "value": "overspill"}],
                            **(self.remote_fields or {}),
                        },
                        "behavior": {
                            "percentage": self.percentage,
                            "activationDelaySeconds": self.activation_seconds,
                            "bufferDurationSeconds": self.buffer_seconds,
                        }
                        | ({"spillover": self.spillover} if self.spillover is not None else {}),
                        "metrics": self.metrics
                        if self.metrics is not None
                        else [
                            {
                                "type": "External",
                                "external": {
                                    "metric": {
                                        "name": "overspill_test_load",
                                        "selector": {"matchLabels": {"model": self.name}},
                                    },
                                    "target": {"type": "Value", "value": str(self.threshold)},
                                },
                            }
                        ],
                    },
                },
            },
        ]

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump_all(self.manifests(), sort_keys=False))
        tmp.rename(path)  # atomic: the control plane never reads half a file
        return path


def rejected_by_envoy(beside: Model, name: str = "tls") -> tuple[Model, list[dict]]:
    """A ModelDeployment the control plane takes but Envoy refuses (its remote's CA file does not
    exist on the Envoy host), on `beside`'s local port; its documents, to write as `<name>.yaml`."""
    model = Model(name, path_prefix="")
    model.local.port, model.remote.port = beside.local.port, 443
    docs = model.manifests()
    docs[-1]["spec"]["offloadingConfig"]["remoteBackend"] = {
        "host": "standby.invalid",
        "scheme": "https",
        "caFile": "/nonexistent/ca.pem",
    }
    return model, docs


@dataclass
class Stack:
    manifests: Path
    knob: Knob
    prometheus: Prometheus
    control_plane: ControlPlaneProcess
    envoy: Envoy
    models: dict[str, Model]
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.control_plane.listener_port}"

    async def request(self, host: str, path: str = "/v1/predict") -> tuple[int, str]:
        async with self.session.post(f"{self.url}{path}", headers={"Host": host}, data=b"{}") as resp:
            return resp.status, await resp.text()

    async def send(self, model: Model, n: int, concurrency: int = 16) -> list[int]:
        """n requests to a model through Envoy; returns their status codes."""
        codes: list[int] = []
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                codes.append((await self.request(model.host))[0])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return codes

    async def model_status(self, model: Model) -> dict:
        return (await self.control_plane.status())["models"].get(f"{model.namespace}/{model.name}", {})

    async def overspill_status(self) -> str:
        """What `overspill status` prints for this control plane (the CLI, run as users run it)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "overspill", "status", "--url", self.control_plane.metrics_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def wait_phase(self, model: Model, phases: set[str], timeout: float) -> float:
        """Seconds until the model's phase is one of `phases`."""
        started = time.monotonic()
        last = None
        while time.monotonic() - started < timeout:
            last = (await self.model_status(model)).get("phase")
            if last in phases:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise AssertionError(f"{model.name}: phase {last!r} after {timeout}s, wanted {phases}")


def totals(model: Model) -> tuple[int, int]:
    """Requests counted so far at the model's (local, remote) backends."""
    return model.local.counts.total, model.remote.counts.total


def delta(model: Model, before: tuple[int, int]) -> tuple[int, int]:
    """(local, remote) requests counted since `before` (from `totals`)."""
    return model.local.counts.total - before[0], model.remote.counts.total - before[1]


async def open_loop(
    s: Stack, model: Model, rate: float, seconds: float, answers: list[tuple[float, str]] | None = None
) -> list[int]:
    """`rate` requests a second for `seconds`, each sent on time whatever the others are doing
    (as clients do); returns their status codes once all are answered, and appends each
    request's (seconds taken, body) to `answers` if given."""

    async def one() -> int:
        sent = time.monotonic()
        code, body = await s.request(model.host)
        if answers is not None:
            answers.append((time.monotonic() - sent, body))
        return code

    tasks = []
    started = time.monotonic()
    for i in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    return list(await asyncio.gather(*tasks))


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def bootstrap_file(
    directory: Path,
    delta: bool = False,
    namespaces: list[str] | None = None,
    listener_port: int | None = None,
) -> Path:
    """An ADS bootstrap as `overspill bootstrap` prints it (the harness points it at the test's ports)."""
    path = directory / f"bootstrap-{'delta' if delta else 'sotw'}-{'-'.join(namespaces or ['all'])}.yaml"
    doc = ads_bootstrap(delta=delta, namespaces=namespaces, listener_port=listener_port)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path,
    *models: Model,
    extra_args: tuple[str, ...] = (),
    delta: bool = False,
    bootstrap: Path | None = None,
    scrape_components: bool = False,
) -> AsyncIterator[Stack]:
    """The whole stack; Envoy runs `bootstrap` if given (its `xds_cluster` pointed at the control
    plane), else the one `overspill bootstrap` prints. With `scrape_components` Prometheus also
    scrapes the control plane's /metrics (job `overspill`) and Envoy's /stats/prometheus (job `envoy`), as an
    operator's Prometheus would (the knob's job is then `exporters`)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    knob = Knob()
    await knob.start()
    started: list[ModelServer] = []
    try:
        for m in models:
            for server in (m.local, m.remote):
                await server.start()
                started.append(server)
            knob.set(m.name, 0)
            m.write(manifests)
        # Prometheus starts first (the control plane reads it), so the ports it scrapes are chosen now.
        metrics_port, admin_port = free_port(), free_port()
        jobs = component_jobs(metrics_port, admin_port) if scrape_components else []
        async with contextlib.AsyncExitStack() as es:
            try:
                prometheus = await es.enter_async_context(
                    Prometheus(
                        [f"127.0.0.1:{knob.port}"],
                        scrape_interval=SCRAPE_INTERVAL,
                        job=EXPORTERS_JOB if jobs else "overspill",
                        jobs=jobs,
                    )
                )
                cp = await es.enter_async_context(
                    ControlPlaneProcess(
                        manifests,
                        metrics_port=metrics_port,
                        evaluation_interval=EVALUATION_INTERVAL,
                        prometheus_url=prometheus.url,
                        extra_args=(
                            "--listener-address",
                            "127.0.0.1",
                            "--xds-address",
                            "127.0.0.1",
                            "--metrics-address",
                            "127.0.0.1",
                            *extra_args,
                        ),
                    )
                )
                envoy = await es.enter_async_context(
                    Envoy(
                        cp.xds_port,
                        admin_port=admin_port,
                        bootstrap=bootstrap or bootstrap_file(tmp_path, delta),
                    )
                )
            except ComponentMissing as exc:
                missing(exc)
            await envoy.wait_listener(cp.listener_port, timeout=30)
            session = await es.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            )
            await prometheus.wait_for_series("overspill_test_load", timeout=15)
            yield Stack(manifests, knob, prometheus, cp, envoy, {m.name: m for m in models}, session)
    finally:
        for server in started:
            await server.stop()
        await knob.stop()
