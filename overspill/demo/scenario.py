"""The demo: a burst on a small local model spills over to its remote copy, and back.

Everything runs for real on loopback: two simulated model servers, Prometheus scraping the local
one's in-flight gauge, the control plane (`python -m overspill serve --manifests DIR`) and Envoy.
An open-loop load generator sends a baseline, a burst well over the local capacity, and the
baseline again, printing one line a second; at the end it writes timeline.png and timeline.csv
and judges whether offloading switched on during the burst and off after it, without errors.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from overspill.dashboard import rate_interval
from overspill.demo.board import ENVOY_FLUSH_SECONDS, draw_dashboard
from overspill.demo.load import SecondStats, run_load
from overspill.demo.plot import plot_timeline
from overspill.demo.procs import (
    CONTROL_PLANE_JOB,
    EXPORTERS_JOB,
    ControlPlaneProcess,
    Envoy,
    Prometheus,
    component_jobs,
    free_port,
)
from overspill.demo.sim import ModelServer

log = logging.getLogger(__name__)

MODEL = "demo-model"
NAMESPACE = "default"
MODEL_KEY = f"{NAMESPACE}/{MODEL}"
SERVICE_PORT = 8080
HOST = f"{MODEL}.{NAMESPACE}.svc.cluster.local:{SERVICE_PORT}"
OFFLOADED_STATES = {"offloading", "outage"}


@dataclass(frozen=True)
class DemoPlan:
    """The demo's knobs in one place: the load shape must cross the target only during the burst."""

    baseline_rps: float = 30.0
    burst_rps: float = 120.0  # local capacity is concurrency / service_time = 80 rps
    burst_start: float = 10.0
    # Offloading relieves the local model within seconds, so it ends bufferDurationSeconds after the
    # metric last exceeded the target, about 2-5 s into the burst. A burst shorter than the buffer
    # therefore sees offloading end clearly after it (not during it, which would flap).
    burst_end: float = 30.0
    duration: float = 60.0  # about 20 s of baseline after offloading ends: it must stay off
    threshold: float = 8.0
    percentage: int = 50
    buffer_seconds: int = 25
    local_concurrency: int = 4
    service_time: float = 0.05
    evaluation_interval: float = 1.0
    scrape_interval: float = 1.0
    # Remote share over the offloading period may miss `percentage` by this much (random split, lags).
    share_tolerance: float = 20.0
    mode: str = "Fixed"  # behavior.mode
    # long-burst: the burst's first seconds, while offloading ramps up, are left out of the
    # judgement of the local metric (the buffer holds the first, overshooting share this long).
    settle_seconds: float = 0.0
    # A PromQL expression to read instead of the in-flight gauge itself (e.g. its average over
    # the last seconds, less noisy than one sample).
    metric_query: str | None = None

    def rate(self, t: float) -> float:
        return self.burst_rps if self.burst_start <= t < self.burst_end else self.baseline_rps


@dataclass
class ModelView:
    """One model's entry of the control plane's GET /status, read tolerantly."""

    state: str = "?"
    remote_percent: float | None = None
    metric: float | None = None
    target: float | None = None

    @property
    def offloading(self) -> bool:
        return self.state.lower() in OFFLOADED_STATES or (self.remote_percent or 0) > 0


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def parse_status(body: Any, key: str = MODEL_KEY) -> ModelView:
    """Pick `key` out of {"models": {key: {...}}}; missing parts become defaults, never errors."""
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, dict):
        return ModelView()
    entry = models.get(key)
    if entry is None and len(models) == 1:
        entry = next(iter(models.values()))
    if not isinstance(entry, dict):
        return ModelView()
    metrics = entry.get("metrics") or []
    first = metrics[0] if isinstance(metrics, list) and metrics and isinstance(metrics[0], dict) else {}
    return ModelView(
        state=str(entry.get("state") or "?"),
        remote_percent=_float(entry.get("remotePercent")),
        metric=_float(first.get("value")),
        target=_float(first.get("target")),
    )


def manifests(local_port: int, remote_port: int, plan: DemoPlan) -> dict[str, dict[str, Any]]:
    """The four objects, as `kubectl get -o yaml` shows them, keyed by file name."""
    meta = {"name": MODEL, "namespace": NAMESPACE}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**meta, "labels": {"app": MODEL}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": MODEL},
            "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": local_port}],
        },
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{MODEL}-abcde",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": MODEL, "endpointslice.kubernetes.io/managed-by": "demo"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True, "serving": True}}],
        "ports": [{"name": "http", "port": local_port, "protocol": "TCP"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": MODEL}},
            "template": {
                "metadata": {"labels": {"app": MODEL}},
                "spec": {"containers": [{"name": "model", "image": "demo/model:latest"}]},
            },
        },
        "status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1},
    }
    model_deployment = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": meta,
        "spec": {
            "model": MODEL,
            "environment": "production",
            "modelSourceRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": MODEL,
                "namespace": NAMESPACE,
            },
            "serviceRef": {"name": MODEL, "namespace": NAMESPACE, "targetPort": SERVICE_PORT},
            "offloadingConfig": {
                "remoteBackend": {
                    "host": f"127.0.0.1:{remote_port}",
                    "scheme": "http",
                    "headersToAdd": [{"name": "x-offloaded-by", "value": "overspill"}],
                },
                "behavior": {
                    "mode": plan.mode,
                    "percentage": plan.percentage,
                    "activationDelaySeconds": 0,
                    "bufferDurationSeconds": plan.buffer_seconds,
                },
                "metrics": [
                    {
                        "type": "External",
                        "external": {
                            "metric": {"name": plan.metric_query}
                            if plan.metric_query
                            else {
                                "name": "model_inflight_requests",
                                "selector": {"matchLabels": {"model": MODEL}},
                            },
                            "target": {"type": "Value", "value": f"{plan.threshold:g}"},
                        },
                    }
                ],
            },
        },
    }
    return {
        "service.yaml": service,
        "endpointslice.yaml": endpoint_slice,
        "deployment.yaml": deployment,
        "modeldeployment.yaml": model_deployment,
    }


def write_manifests(directory: Path, local_port: int, remote_port: int, plan: DemoPlan) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.yaml"):  # a previous run's ports must not linger
        stale.unlink()
    for name, obj in manifests(local_port, remote_port, plan).items():
        (directory / name).write_text(yaml.safe_dump(obj, sort_keys=False))
    return directory


@dataclass
class Summary:
    """What the run showed, and whether that is what the demo promises."""

    first_cross: float | None
    on_at: float | None
    off_at: float | None
    remote_share_on: float | None  # % of answers from the remote while offloading was on
    remote_share_off: float | None  # % of answers from the remote while it was off
    requests: int
    errors: int
    error_kinds: dict[str, int]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def _share(rows: list[dict[str, Any]]) -> float | None:
    answered = sum(r["local_rps"] + r["remote_rps"] for r in rows)
    return 100.0 * sum(r["remote_rps"] for r in rows) / answered if answered else None


def summarize(rows: list[dict[str, Any]], plan: DemoPlan, errors: dict[str, int]) -> Summary:
    cross = next((r["t"] for r in rows if r["metric"] is not None and r["metric"] > plan.threshold), None)
    on_at = next((r["t"] for r in rows if r["offloading"]), None)
    off_at = next(
        (r["t"] for r in rows if on_at is not None and r["t"] > on_at and not r["offloading"]), None
    )
    on_rows = [r for r in rows if r["offloading"]]
    off_rows = [r for r in rows if not r["offloading"]]
    share_on = _share(on_rows)
    failures: list[str] = []
    if on_at is None:
        failures.append("offloading never switched on")
    elif not plan.burst_start <= on_at <= plan.burst_end:
        failures.append(
            f"offloading switched on at t={on_at:g}s, outside the burst "
            f"[{plan.burst_start:g}, {plan.burst_end:g}]s"
        )
    if on_at is not None and off_at is None:
        failures.append("offloading never switched off after the burst")
    elif off_at is not None and off_at <= plan.burst_end:
        failures.append(
            f"offloading switched off at t={off_at:g}s, before the burst ended at {plan.burst_end:g}s"
        )
    if off_at is not None and any(r["offloading"] for r in rows if r["t"] > off_at):
        failures.append("offloading switched on again after it had switched off")
    if share_on is not None and abs(share_on - plan.percentage) > plan.share_tolerance:
        failures.append(f"remote served {share_on:.0f}% while offloading, configured {plan.percentage}%")
    total_errors = sum(r["errors"] for r in rows)
    if total_errors:
        failures.append(f"{total_errors} requests failed: {errors}")
    return Summary(
        first_cross=cross,
        on_at=on_at,
        off_at=off_at,
        remote_share_on=share_on,
        remote_share_off=_share(off_rows),
        requests=sum(r["offered"] for r in rows),
        errors=total_errors,
        error_kinds=errors,
        failures=failures,
    )


def _fmt_t(t: float | None) -> str:
    return "never" if t is None else f"t={t:g}s"


def _fmt_pct(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.1f}%"


def summary_lines(s: Summary, plan: DemoPlan) -> list[str]:
    return [
        f"metric first over target ({plan.threshold:g}): {_fmt_t(s.first_cross)}",
        f"offloading switched on:  {_fmt_t(s.on_at)} (burst {plan.burst_start:g}s-{plan.burst_end:g}s)",
        f"remote share while on:   {_fmt_pct(s.remote_share_on)} (configured {plan.percentage}%)",
        f"remote share while off:  {_fmt_pct(s.remote_share_off)}",
        f"offloading switched off: {_fmt_t(s.off_at)} (buffer {plan.buffer_seconds}s)",
        f"requests: {s.requests}  errors: {s.errors}" + (f" {s.error_kinds}" if s.error_kinds else ""),
    ]


@dataclass(frozen=True)
class Change:
    """The control plane's state for a model changed, as a poll of /status saw it."""

    t: float  # seconds since the load started
    state: str
    offloading: bool


class StatusSampler:
    """Polls the control plane's /status; keeps the last view seen in each second of the run,
    and every change of state (a release shorter than a second shows only there)."""

    def __init__(self, cp: ControlPlaneProcess, period: float = 0.25) -> None:
        self.cp = cp
        self.period = period
        self.latest = ModelView()
        self.by_second: dict[int, ModelView] = {}
        self.failures = 0
        self.t0 = 0.0
        self.changes: list[Change] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.cp.check_alive("during the demo")
            try:
                self.latest = parse_status(await self.cp.status())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.failures += 1
                log.warning("status poll failed error=%r failures=%s", exc, self.failures)
            t = loop.time() - self.t0
            self.by_second[int(t)] = self.latest
            change = Change(round(t, 2), self.latest.state, self.latest.offloading)
            last = self.changes[-1] if self.changes else None
            if last is None or (last.state, last.offloading) != (change.state, change.offloading):
                self.changes.append(change)
            await asyncio.sleep(self.period)

    def view(self, second: int) -> ModelView:
        return self.by_second.get(second, self.latest)


async def _wait_routed(url: str, within: float = 20.0) -> None:
    """One request through Envoy must reach the local model before the clock starts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = "no attempt"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while loop.time() < deadline:
            try:
                async with session.post(url, headers={"Host": HOST}, data=b"{}") as resp:
                    await resp.read()
                    last = f"{resp.status} served_by={resp.headers.get('x-served-by')}"
                    if resp.status == 200 and resp.headers.get("x-served-by") == "local":
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
    raise TimeoutError(f"Envoy did not route {HOST} to the local model within {within:g}s (last: {last})")


class InflightSampler:
    """The local server's average in-flight count over each second of the run, from its own
    accounting (what the pods held, not what a scrape happened to catch)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.by_second: dict[int, float] = {}
        self.t0 = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        second, area = 0, self.server.counts.area_now()
        while True:
            await asyncio.sleep(max(0.0, self.t0 + second + 1 - loop.time()))
            now_area = self.server.counts.area_now()
            self.by_second[second] = now_area - area
            second, area = second + 1, now_area


def _row(stats: SecondStats, view: ModelView, local_inflight: float | None = None) -> dict[str, Any]:
    answered = sum(stats.served_by.values())
    p99 = stats.latency_quantile(0.99)
    return {
        "t": stats.second,
        "offered": stats.offered,
        "ok": stats.ok,
        "errors": stats.errors,
        "local_rps": stats.served_by["local"],
        "remote_rps": stats.served_by["remote"],
        "remote_pct": round(100.0 * stats.served_by["remote"] / answered, 1) if answered else 0.0,
        "metric": view.metric,
        "local_inflight": None if local_inflight is None else round(local_inflight, 2),
        "target": view.target,
        "state": view.state,
        "offloading": view.offloading,
        "configured_remote_pct": view.remote_percent,
        "p99_ms": None if p99 is None else round(p99 * 1000, 1),
    }


def _print_row(row: dict[str, Any]) -> None:
    metric = "-" if row["metric"] is None else f"{row['metric']:.1f}"
    state = "ON" if row["offloading"] else "off"
    print(
        f"t={row['t']}s offered={row['offered']}rps metric={metric} offload={state} "
        f"remote={row['remote_pct']:.0f}% errors={row['errors']}",
        flush=True,
    )


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class Run:
    """One run of a plan: a row per second of the load, and the failed requests by kind."""

    plan: DemoPlan
    rows: list[dict[str, Any]]
    errors: dict[str, int]
    changes: list[Change]  # every change of state the status polls saw, from before the load


async def run_plan(out_dir: Path, plan: DemoPlan, dashboard_png: Path | None = None) -> Run:
    """One run of `plan` end to end, on its own model servers, Prometheus, control plane and Envoy;
    with `dashboard_png`, the dashboard's main panels over the run are drawn there."""
    logs = out_dir / "logs"
    async with AsyncExitStack() as stack:
        local = await stack.enter_async_context(
            ModelServer("local", plan.local_concurrency, plan.service_time, model_label=MODEL)
        )
        remote = await stack.enter_async_context(
            ModelServer("remote", None, plan.service_time, model_label=f"{MODEL}-remote")
        )
        capacity = plan.local_concurrency / plan.service_time
        print(
            f"model servers: local {local.address} (~{capacity:.0f} rps), remote {remote.address}", flush=True
        )

        # Prometheus also scrapes the control plane and Envoy, for the dashboard's picture.
        metrics_port, admin_port = free_port(), free_port()
        prom = await stack.enter_async_context(
            Prometheus(
                [local.address],
                plan.scrape_interval,
                job=EXPORTERS_JOB,
                jobs=component_jobs(metrics_port, admin_port),
                log_dir=logs,
            )
        )
        await prom.wait_for_series(f'model_inflight_requests{{model="{MODEL}"}}', timeout=30)
        print(f"prometheus: {prom.url} scraping {local.address}", flush=True)

        manifest_dir = write_manifests(out_dir / "manifests", local.port or 0, remote.port or 0, plan)
        cp = await stack.enter_async_context(
            ControlPlaneProcess(
                manifest_dir,
                evaluation_interval=plan.evaluation_interval,
                prometheus_url=prom.url,
                metrics_port=metrics_port,
                log_dir=logs,
            )
        )
        print(f"control plane: xds 127.0.0.1:{cp.xds_port}, status {cp.metrics_url}/status", flush=True)

        envoy = await stack.enter_async_context(
            Envoy(cp.xds_port, admin_port=admin_port, node_id="overspill-demo", log_dir=logs)
        )
        await envoy.wait_listener(cp.listener_port, timeout=30)
        url = f"http://127.0.0.1:{cp.listener_port}/v1/predict"
        await _wait_routed(url)
        print(f"envoy: listener {url}, admin {envoy.admin_url}", flush=True)
        print(
            f"load: {plan.baseline_rps:g} rps, {plan.burst_rps:g} rps from t={plan.burst_start:g}s "
            f"to t={plan.burst_end:g}s, then {plan.baseline_rps:g} rps until t={plan.duration:g}s; "
            f"target {plan.threshold:g} in-flight",
            flush=True,
        )

        sampler = StatusSampler(cp)
        inflight = InflightSampler(local)
        rows: list[dict[str, Any]] = []

        def on_second(stats: SecondStats) -> None:
            row = _row(stats, sampler.view(stats.second), inflight.by_second.get(stats.second))
            rows.append(row)
            _print_row(row)

        sampler.t0 = inflight.t0 = asyncio.get_running_loop().time()
        started = time.time()
        async with asyncio.TaskGroup() as tg:
            poller = tg.create_task(sampler.run())
            counter = tg.create_task(inflight.run())
            result = await run_load(url, HOST, plan.rate, plan.duration, on_second)
            poller.cancel()
            counter.cancel()
        if dashboard_png is not None:
            await asyncio.sleep(2 * plan.scrape_interval)  # the last seconds scraped
            values = {
                "namespace": NAMESPACE,
                "model": MODEL,
                "job": CONTROL_PLANE_JOB,
                "__rate_interval": rate_interval(1.0, plan.scrape_interval, floor=2 * ENVOY_FLUSH_SECONDS),
            }
            await draw_dashboard(prom, dashboard_png, values, started, time.time())
    for row in rows:  # a second's requests may be reported before its in-flight average is taken
        if row["local_inflight"] is None and row["t"] in inflight.by_second:
            row["local_inflight"] = round(inflight.by_second[row["t"]], 2)
    return Run(plan, rows, dict(result.status_codes), sampler.changes)


async def run_demo(out_dir: Path, plan: DemoPlan | None = None) -> int:
    """Run the demo, write timeline.png / timeline.csv / summary.txt into out_dir; 0 if it behaved."""
    return await guarded(out_dir, lambda: _burst(Path(out_dir), plan or DemoPlan()))


async def guarded(out_dir: Path, work: Callable[[], Awaitable[int]]) -> int:
    """Run a demo in out_dir; a failure prints its reasons and where the logs are, not a traceback."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return await work()
    except Exception as exc:
        log.debug("demo failed", exc_info=True)
        reasons = exc.exceptions if isinstance(exc, ExceptionGroup) else [exc]
        for reason in reasons:
            print(f"demo FAILED: {type(reason).__name__}: {reason}", flush=True)
        print(f"logs: {out_dir} (logs/ of each run)", flush=True)
        return 1


async def _burst(out_dir: Path, plan: DemoPlan) -> int:
    run = await run_plan(out_dir, plan, dashboard_png=out_dir / "dashboard.png")
    summary = summarize(run.rows, plan, run.errors)
    write_csv(run.rows, out_dir / "timeline.csv")
    plot_timeline(run.rows, out_dir / "timeline.png", plan.threshold)
    lines = summary_lines(summary, plan)
    verdict = "demo OK" if summary.ok else "demo FAILED: " + "; ".join(summary.failures)
    (out_dir / "summary.txt").write_text("\n".join([*lines, verdict]) + "\n")
    print("\n".join(["", "summary:", *("  " + line for line in lines)]), flush=True)
    print(
        f"wrote {out_dir / 'timeline.png'}, {out_dir / 'timeline.csv'} and {out_dir / 'dashboard.png'}",
        flush=True,
    )
    print(verdict, flush=True)
    return 0 if summary.ok else 1
