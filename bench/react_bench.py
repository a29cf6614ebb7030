"""How fast offloading reacts: the metric crosses its target -> Envoy applies the new weight.

`python -m bench.react_bench` (README, "Envoy's own load reports"; bench/README.md "Reaction
time"). One real `overspill serve` (`--evaluation-interval 1`), one real Envoy on the bootstrap
`overspill bootstrap` prints (its load reports every `--load-report-interval` 1 s), one real
Prometheus scraping every 1 s, and simulated model servers (`overspill.demo.sim.ModelServer`).
Two models side by side, the same but for their offloading metric:

* `react-lrs` reads `envoy:requests_in_flight` (Envoy's load reports, no Prometheus);
* `react-prom` reads its local server's `model_inflight_requests` gauge through Prometheus.

Both have a `Value` target, activation delay 0 and a short buffer. Each repetition, for each
model in turn, after a random pause (so the step falls anywhere in the evaluation and scrape
cycles), an open-loop load step goes through Envoy; each request is held `service_time`, so the
in-flight count climbs past the target. Then:

* t0: the send of the first request that puts the client's own in-flight count over the target
  (the moment the true metric crosses it);
* t1: the first request of the step that the model's remote server receives, i.e. when Envoy
  applies the new weight, seen by traffic (polled every few ms in this process);
* decided: the `event=offload_decision ... to=Offloading` line of the control plane's log (its
  wall clock, ms), confirmed by the model's phase on /status. decided - t0 is detection (reports
  or scrape, then evaluation); t1 - decided is the push (xDS to Envoy, and the next request).

The load is then dropped and the model must go back to Standby before the next step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import yaml

from bench.pipeline_workload import host_of, model_objects
from bench.xds_bench import machine, percentile
from overspill.demo.procs import ControlPlaneProcess, Envoy, Prometheus
from overspill.demo.sim import ModelServer

NAMESPACE = "default"
PATHS = {"lrs": "react-lrs", "prometheus": "react-prom"}  # path -> model name
DECISION = re.compile(
    r"^ts=(\S+ \S+) .*event=offload_decision model=(\S+) from=\S+ to=Offloading\b", re.MULTILINE
)


@dataclass(frozen=True)
class Plan:
    """The knobs; the step must put the in-flight count well over the target (rate x
    service_time = 10 against 5), and the rate must be high enough that the first remote request
    follows the new weight within a few tens of ms (50 rps x 50 % remote: 40 ms on average)."""

    repetitions: int = 10
    target: float = 5
    rate: float = 50.0
    service_time: float = 0.2
    percentage: int = 50
    buffer_seconds: int = 2
    evaluation_interval: float = 1.0
    scrape_interval: float = 1.0
    load_report_interval: float = 1.0
    step_timeout: float = 20.0  # a step whose remote sees nothing by then is a failure


@dataclass
class Sample:
    """One step of one path; times are wall-clock seconds (time.time()), comparable with the
    control plane's log on the same machine."""

    path: str
    t0: float
    t1: float
    decided: float | None
    latency: float = field(init=False)
    detection: float | None = field(init=False)
    push: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.latency = self.t1 - self.t0
        self.detection = None if self.decided is None else self.decided - self.t0
        self.push = None if self.decided is None else self.t1 - self.decided


def metric(path: str, model: str, target: float) -> dict:
    name = (
        {"name": "envoy:requests_in_flight"}
        if path == "lrs"
        else {"name": "model_inflight_requests", "selector": {"matchLabels": {"model": model}}}
    )
    return {
        "type": "External",
        "external": {"metric": name, "target": {"type": "Value", "value": f"{target:g}"}},
    }


def manifests(path: str, local: ModelServer, remote: ModelServer, plan: Plan) -> list[dict]:
    """One model's objects (`bench.pipeline_workload.model_objects`) with this path's metric."""
    model = PATHS[path]
    behavior = {
        "percentage": plan.percentage,
        "activationDelaySeconds": 0,
        "bufferDurationSeconds": plan.buffer_seconds,
    }
    assert local.port is not None and remote.port is not None
    return model_objects(
        model,
        NAMESPACE,
        local.port,
        remote.port,
        True,
        behavior=behavior,
        metric=metric(path, model, plan.target),
    )


@dataclass
class Bench:
    """The running stack and what the steps need of it."""

    plan: Plan
    cp: ControlPlaneProcess
    servers: dict[str, tuple[ModelServer, ModelServer]]  # path -> (local, remote)
    session: aiohttp.ClientSession

    def url(self) -> str:
        return f"http://127.0.0.1:{self.cp.listener_port}/v1/predict"

    async def phase(self, path: str) -> str | None:
        return (await self.cp.status())["models"].get(f"{NAMESPACE}/{PATHS[path]}", {}).get("phase")

    async def wait_phase(self, path: str, phase: str, timeout: float) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while (last := await self.phase(path)) != phase:
            self.cp.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{PATHS[path]}: phase {last!r} after {timeout:g}s, wanted {phase}")
            await asyncio.sleep(0.1)

    async def wait_ready(self) -> None:
        """Both models decided with a value read: Envoy is routing and reporting its load."""
        deadline = time.monotonic() + 30
        for path in PATHS:
            key = f"{NAMESPACE}/{PATHS[path]}"
            while True:
                self.cp.check_alive()
                model = (await self.cp.status())["models"].get(key, {})
                if (
                    model.get("phase") == "Standby"
                    and (model.get("metrics") or [{}])[0].get("value") is not None
                ):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{key}: no metric value within 30s: {model}")
                await asyncio.sleep(0.1)

    async def restart(self) -> None:
        """A new control plane on the same ports: its evaluations start at a new moment, and
        Envoy's reports after it reconnects, so each repetition sees other phases between
        sampling (scrape or load report) and evaluation, which decide most of the latency."""
        successor = self.cp.successor()
        await self.cp.close()
        self.cp = await successor.__aenter__()
        await self.wait_ready()

    def decisions(self, path: str) -> list[float]:
        """Wall-clock times of the control plane's decisions to offload this model."""
        key = f"{NAMESPACE}/{PATHS[path]}"
        return [
            datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for ts, model in DECISION.findall(self.cp.log_text())
            if model == key
        ]

    async def step(self, path: str) -> Sample:
        """One load step on `path`'s model, measured; returns once the model is back in Standby."""
        plan, (_, remote) = self.plan, self.servers[path]
        host = host_of(PATHS[path], NAMESPACE)
        await self.wait_phase(path, "Standby", timeout=30)
        await asyncio.sleep(random.uniform(0, plan.evaluation_interval))  # any phase of the cycles
        known, remote_before = len(self.decisions(path)), remote.counts.total
        in_flight, t0 = 0, None

        async def one() -> None:
            nonlocal in_flight, t0
            in_flight += 1
            if t0 is None and in_flight > plan.target:
                t0 = time.time()
            try:
                async with self.session.post(self.url(), headers={"Host": host}, data=b"{}") as r:
                    await r.read()
            finally:
                in_flight -= 1

        async def load() -> None:
            start = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                for i in range(round(plan.rate * plan.step_timeout)):
                    await asyncio.sleep(max(0.0, start + i / plan.rate - time.monotonic()))
                    tg.create_task(one())

        sender = asyncio.create_task(load())
        try:
            deadline = time.monotonic() + plan.step_timeout
            while remote.counts.total == remote_before:
                if time.monotonic() > deadline or sender.done():
                    raise TimeoutError(
                        f"{PATHS[path]}: no request reached the remote in {plan.step_timeout:g}s"
                    )
                await asyncio.sleep(0.002)
            t1 = time.time()
            await self.wait_phase(path, "Offloading", timeout=10)  # the status agrees
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        assert t0 is not None
        decided = self.decisions(path)[known:]
        await self.wait_phase(path, "Standby", timeout=plan.buffer_seconds + 15)
        return Sample(path, t0, t1, decided[0] if decided else None)


@contextlib.asynccontextmanager
async def running(plan: Plan) -> AsyncIterator[Bench]:
    """The stack: model servers, Prometheus, `overspill serve`, Envoy; torn down on exit."""
    with tempfile.TemporaryDirectory(prefix="react-bench-") as tmp:
        work = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            servers = {}
            for path, model in PATHS.items():
                local = ModelServer(f"{model}-local", None, plan.service_time, model)
                remote = ModelServer(f"{model}-remote", None, plan.service_time, f"{model}-remote")
                for server in (local, remote):
                    await stack.enter_async_context(server)
                servers[path] = (local, remote)
                docs = manifests(path, local, remote, plan)
                (work / f"{model}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
            prom = await stack.enter_async_context(
                Prometheus([servers["prometheus"][0].address], scrape_interval=plan.scrape_interval)
            )
            await prom.wait_for_series(f'model_inflight_requests{{model="{PATHS["prometheus"]}"}}', 30)
            cp = await stack.enter_async_context(
                ControlPlaneProcess(
                    work,
                    evaluation_interval=plan.evaluation_interval,
                    prometheus_url=prom.url,
                    extra_args=("--load-report-interval", f"{plan.load_report_interval:g}"),
                )
            )
            # The bootstrap `overspill bootstrap` prints (the harness's default).
            envoy = await stack.enter_async_context(Envoy(cp.xds_port))
            await envoy.wait_listener(cp.listener_port, timeout=30)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            )
            bench = Bench(plan, cp, servers, session)
            try:
                await bench.wait_ready()
                yield bench
            finally:
                await bench.cp.close()  # the last successor (the first is closed by now)


@dataclass
class Summary:
    """One path's figures over the repetitions, in seconds."""

    path: str
    n: int
    mean: float
    p50: float
    p99: float
    min: float
    max: float
    detection_p50: float | None
    push_p50: float | None


def summarize(samples: list[Sample]) -> list[Summary]:
    out = []
    for path in PATHS:
        mine = [s for s in samples if s.path == path]
        latencies = [s.latency for s in mine]
        detection = [s.detection for s in mine if s.detection is not None]
        push = [s.push for s in mine if s.push is not None]
        out.append(
            Summary(
                path,
                len(mine),
                statistics.fmean(latencies),
                percentile(latencies, 50),
                percentile(latencies, 99),
                min(latencies),
                max(latencies),
                percentile(detection, 50) if detection else None,
                percentile(push, 50) if push else None,
            )
        )
    return out


def say(text: str) -> None:
    print(text, flush=True)


async def measure(plan: Plan, say: Callable[[str], None] = say) -> tuple[list[Sample], list[Summary]]:
    """K repetitions, the two paths alternating within each, on one stack."""
    samples: list[Sample] = []
    async with running(plan) as bench:
        for k in range(plan.repetitions):
            if k:
                await bench.restart()
            for path in PATHS:
                s = await bench.step(path)
                samples.append(s)
                say(
                    f"rep {k + 1}/{plan.repetitions} {path:<10} t1-t0 {s.latency:.3f}s"
                    f" detection {fmt(s.detection)} push {fmt(s.push)}"
                )
    return samples, summarize(samples)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


def table(summaries: list[Summary]) -> str:
    rows = [
        "| path | K | mean s | p50 s | p99 s | min s | max s | detection p50 s | push p50 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        rows.append(
            f"| {s.path} | {s.n} | {s.mean:.2f} | {s.p50:.2f} | {s.p99:.2f} | {s.min:.2f} | {s.max:.2f} |"
            f" {fmt(s.detection_p50).rstrip('s')} | {fmt(s.push_p50).rstrip('s')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.react_bench",
        description="Reaction time of offloading (metric over target -> Envoy applies the weight): "
        "Envoy's load reports against Prometheus, at 1 s scrape and 1 s evaluation.",
    )
    p.add_argument("--repetitions", "-k", type=int, default=10, help="load steps per path (default 10)")
    p.add_argument("--out", default="bench/react_results.json", help="JSON results file")
    p.add_argument(
        "--load-report-interval",
        type=float,
        default=1.0,
        help="seconds between Envoy's load reports (overspill serve --load-report-interval; default 1)",
    )
    p.add_argument(
        "--scrape-interval", type=float, default=1.0, help="Prometheus scrape interval, seconds (default 1)"
    )
    p.add_argument(
        "--evaluation-interval",
        type=float,
        default=1.0,
        help="overspill serve --evaluation-interval, seconds (default 1)",
    )
    args = p.parse_args(argv)
    plan = Plan(
        repetitions=args.repetitions,
        load_report_interval=args.load_report_interval,
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.evaluation_interval,
    )
    samples, summaries = asyncio.run(measure(plan))
    print(table(summaries))
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": machine(),
                "plan": asdict(plan),
                "summary": [asdict(s) for s in summaries],
                "samples": [asdict(s) for s in samples],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
