"""Soak: `overspill serve` as a real process over a manifests directory, churned for minutes,
must come back to where it was: its memory (RSS), open files and asyncio tasks.

Around it, on loopback: the models' backends, a metrics exporter scraped by a real Prometheus
(the source the control plane reads, as in the demo), and simulated Envoys (`SimEnvoy`, SotW
and Delta) on ADS. Each churn cycle (about two evaluation intervals):

* models: one added, one edited (its endpoint turns ready or unready: an outage and back),
  the one added the cycle before removed, and a bad file (broken YAML, an alias bomb, an
  invalid model) written or removed;
* weights: every model's metric takes a new value, over or under its target of 8;
* metric sources: every 4th cycle the exporter answers nothing for a cycle (every model's
  reading fails), every 6th Prometheus hangs (SIGSTOP) for two cycles: the control plane's
  queries time out, its connections wait, then it answers again (SIGCONT);
* Envoy connections: one node disconnects and a new one connects (alternating SotW and Delta).

The figures are taken in a steady state, the same configuration each time (the N models, the
same number of nodes, Prometheus up, the metrics at their first values): the baseline after a
warm-up of churn (first-time costs such as imports, caches and the allocator's arenas are
in it), the end after the churn. `python -m bench.soak --minutes 30` for a long run; exits 1
when a figure did not come back within its tolerance (see `Tolerance`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiohttp import web

from bench.pipeline_workload import Backends, ManifestDir, ModelFile, Workload, write_atomic
from overspill.demo.procs import ControlPlaneProcess, Prometheus, free_port
from overspill.sim.envoy import SimEnvoy
from xds.types import LISTENER

TARGET = 8.0  # the models' metric target (`bench.pipeline_workload.model_objects`)
BAD_FILES = [
    "apiVersion: v1\nkind: [unclosed\n",
    "apiVersion: deployment.beamlit.com/v1alpha1\nkind: ModelDeployment\nmetadata: {name: bad}\n"
    "spec: {serviceRef: {name: nowhere}, offloadingConfig: {behavior: {percentage: 150}}}\n",
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)),
    "a: " + "[" * 200 + "]" * 200 + "\n",
]


@dataclass(frozen=True)
class Tolerance:
    """How far above its baseline a figure may end, and why that much.

    * RSS: 16 MiB or 10 %, whichever is larger. CPython's allocator keeps freed arenas, and
      gRPC, aiohttp and the xDS body memo (`xds.wire._Bodies`) keep buffers whose size
      depends on what was last in flight; a leak of one object per change (a stream, a
      model, a task) grows without bound and passes this within minutes.
    * open files: 4. The same nodes and the same Prometheus are connected at both points;
      aiohttp keeps a few idle keep-alive connections to Prometheus for 15 s.
    * asyncio tasks: 4. Reads in flight at the moment of sampling (an evaluation, a probe).
    """

    rss_mib: float = 16.0
    rss_fraction: float = 0.10
    fds: int = 4
    tasks: int = 4

    def rss_limit(self, baseline: float) -> float:
        return baseline + max(self.rss_mib, self.rss_fraction * baseline)


@dataclass
class Sample:
    """One look at the control plane: `/proc/PID` and its `/metrics`."""

    t: float
    rss_mib: float
    fds: int
    tasks: int
    streams: int
    models: int


def proc_figures(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(f"{name} not on /metrics")


class Exporter:
    """The models' queue depth as a Prometheus target: `model_inflight_requests{model, namespace}`."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}
        self.silent = False  # answer no series: every model's reading fails
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _: web.Request) -> web.Response:
        lines = [
            f'model_inflight_requests{{model="{m}",namespace="{ns}"}} {v}'
            for (ns, m), v in self.values.items()
        ]
        if self.silent:
            lines = []
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def __aenter__(self) -> Exporter:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Soak:
    """The churn and the samples; `run` returns the summary."""

    models: int
    envoys: int
    seconds: float
    warmup: float
    sample_every: float
    settle: float = 35.0  # a 30 s buffer releases every offload: all models back in Standby
    evaluation_interval: float = 1.0
    tolerance: Tolerance = field(default_factory=Tolerance)
    rng: random.Random = field(default_factory=lambda: random.Random(2026))
    samples: list[Sample] = field(default_factory=list)
    cycles: int = 0

    async def run(self) -> dict:
        with tempfile.TemporaryDirectory(prefix="overspill-soak-") as tmp:
            root = Path(tmp) / "manifests"
            async with Backends(4, 2) as backends, Exporter() as exporter:
                self.dir = ManifestDir(root, Workload(self.models), backends)
                await asyncio.to_thread(self.dir.write)
                self.exporter = exporter
                self.first_values = {(m.namespace, m.name): self._value() for m in self.dir.models}
                exporter.values = dict(self.first_values)
                self.prometheus = Prometheus([f"127.0.0.1:{exporter.port}"], 1.0)
                await self.prometheus.__aenter__()
                try:
                    async with ControlPlaneProcess(
                        root, evaluation_interval=self.evaluation_interval, prometheus_url=self.prometheus.url
                    ) as plane:
                        self.plane = plane
                        return await self._soak()
                finally:
                    self._hang_prometheus(False)
                    await self.prometheus.close()

    async def _soak(self) -> dict:
        self.target = f"127.0.0.1:{self.plane.xds_port}"
        self.nodes: list[SimEnvoy] = []
        self.added: list[ModelFile] = []
        self.bad: Path | None = None
        self.unready: list[ModelFile] = []
        self._serial = 0
        try:
            for _ in range(self.envoys):
                await self._connect()
            start = time.monotonic()
            self.start = start
            print(f"soak: {self.models} models, {self.envoys} nodes, pid {self.plane.pid}", flush=True)
            await self._churn_until(start + self.warmup)
            baseline = await self._steady("baseline")
            await self._churn_until(time.monotonic() + self.seconds)
            end = await self._steady("end")
        finally:
            for node in self.nodes:
                await node.stop()
        return self._summary(baseline, end)

    # --- churn ---

    async def _churn_until(self, deadline: float) -> None:
        next_sample = time.monotonic()
        while time.monotonic() < deadline:
            await self._cycle()
            if time.monotonic() >= next_sample:
                self._print(await self._sample())
                next_sample = time.monotonic() + self.sample_every

    async def _cycle(self) -> None:
        self.cycles += 1
        n = self.cycles
        # models: add one, remove the one added before, edit one (ready <-> unready), a bad file
        if self.added:
            os.remove(self.dir.root / f"{self.added.pop(0).name}.yaml")
        added, _ = self.dir.add_model()
        self.added.append(added)
        self.exporter.values[(added.namespace, added.name)] = self._value()
        edited = self.rng.choice(self.dir.models)
        edited.ready = not edited.ready
        self.dir.rewrite(edited)
        if self.bad is not None:
            os.remove(self.bad)
            self.bad = None
        else:
            self.bad = self.dir.root / "bad.yaml"
            write_atomic(self.bad, self.rng.choice(BAD_FILES))
        # weights
        for key in self.exporter.values:
            self.exporter.values[key] = self._value()
        # metric sources
        self.exporter.silent = n % 4 == 0
        self._hang_prometheus(n % 6 in (0, 5) and n > 1)
        # Envoy connections
        await self._disconnect(self.nodes.pop(0))
        await self._connect()
        await asyncio.sleep(2 * self.evaluation_interval)

    async def _connect(self) -> None:
        self._serial += 1
        node = SimEnvoy(
            self.target, node_id=f"soak-{self._serial}", delta=self._serial % 2 == 0, record=False
        )
        await node.start()
        await node.wait(lambda c: bool(c.held[LISTENER]), 30)
        self.nodes.append(node)

    @staticmethod
    async def _disconnect(node: SimEnvoy) -> None:
        """Close the node's connection, as an Envoy going away does. grpc.aio's call objects sit in
        reference cycles, so the socket closes only when a collection frees them; collected here,
        or every departed node would stay connected on the control plane's side too."""
        await node.stop()
        del node
        gc.collect()

    def _hang_prometheus(self, hang: bool) -> None:
        pid = self.prometheus.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP if hang else signal.SIGCONT)

    def _value(self) -> float:
        return float(self.rng.randrange(0, int(2 * TARGET) + 1))

    # --- steady state ---

    async def _steady(self, label: str) -> Sample:
        """Back to the first configuration, settled; the median of three samples."""
        for m in self.added:
            os.remove(self.dir.root / f"{m.name}.yaml")
            self.exporter.values.pop((m.namespace, m.name), None)
        self.added = []
        if self.bad is not None:
            os.remove(self.bad)
            self.bad = None
        for m in self.dir.models:
            if not m.ready:
                m.ready = True
                self.dir.rewrite(m)
        self.exporter.silent = False
        self._hang_prometheus(False)
        self.exporter.values = dict(self.first_values)
        await asyncio.sleep(self.settle)
        samples = []
        for _ in range(3):
            samples.append(await self._sample())
            await asyncio.sleep(1)
        median = Sample(
            samples[-1].t,
            statistics.median(s.rss_mib for s in samples),
            int(statistics.median(s.fds for s in samples)),
            int(statistics.median(s.tasks for s in samples)),
            samples[-1].streams,
            samples[-1].models,
        )
        print(f"soak: {label}: {self._line(median)}", flush=True)
        return median

    async def _sample(self) -> Sample:
        self.plane.check_alive("during the soak")
        pid = self.plane.pid
        assert pid is not None
        rss, fds = proc_figures(pid)
        text = await self.plane.metrics_text()
        sample = Sample(
            round(time.monotonic() - self.start, 1),
            round(rss, 1),
            fds,
            int(metric(text, "overspill_asyncio_tasks")),
            int(metric(text, "overspill_xds_streams")),
            sum(1 for line in text.splitlines() if line.startswith("overspill_model_remote_weight_percent{")),
        )
        self.samples.append(sample)
        return sample

    @staticmethod
    def _line(s: Sample) -> str:
        return f"rss={s.rss_mib:.1f}MiB fds={s.fds} tasks={s.tasks} streams={s.streams} models={s.models}"

    def _print(self, s: Sample) -> None:
        print(f"soak: t={s.t:.0f}s cycles={self.cycles} {self._line(s)}", flush=True)

    def _summary(self, baseline: Sample, end: Sample) -> dict:
        tol = self.tolerance
        churn = [s for s in self.samples if s.t > baseline.t]
        checks = {
            "rss_mib": (baseline.rss_mib, end.rss_mib, round(tol.rss_limit(baseline.rss_mib), 1)),
            "fds": (baseline.fds, end.fds, baseline.fds + tol.fds),
            "tasks": (baseline.tasks, end.tasks, baseline.tasks + tol.tasks),
        }
        return {
            "models": self.models,
            "envoys": self.envoys,
            "churn_seconds": self.seconds,
            "cycles": self.cycles,
            "peak_during_churn": {
                "rss_mib": max((s.rss_mib for s in churn), default=None),
                "fds": max((s.fds for s in churn), default=None),
                "tasks": max((s.tasks for s in churn), default=None),
            },
            "checks": {
                k: {"baseline": b, "end": e, "limit": lim, "ok": e <= lim}
                for k, (b, e, lim) in checks.items()
            },
            "ok": all(e <= lim for b, e, lim in checks.values()),
            "tolerance": asdict(tol),
            "samples": [asdict(s) for s in self.samples],
        }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--minutes", type=float, default=3.0, help="churn after the baseline (default %(default)s)"
    )
    p.add_argument("--seconds", type=float, help="churn in seconds instead (a smoke run)")
    p.add_argument(
        "--warmup", type=float, default=30.0, help="churn before the baseline, seconds (default %(default)s)"
    )
    p.add_argument("--models", type=int, default=50, help="models in the directory (default %(default)s)")
    p.add_argument(
        "--envoys", type=int, default=6, help="simulated Envoys kept connected (default %(default)s)"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=35.0,
        help="seconds in the first configuration before the baseline and end samples: the models' "
        "30 s buffer releases every offload (default %(default)s)",
    )
    p.add_argument(
        "--sample-every",
        type=float,
        default=10.0,
        help="seconds between progress lines (default %(default)s)",
    )
    p.add_argument("--out", type=Path, help="write the summary and every sample as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * args.minutes
    soak = Soak(args.models, args.envoys, seconds, args.warmup, args.sample_every, args.settle)
    summary = asyncio.run(soak.run())
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    peak = summary["peak_during_churn"]
    print(f"soak: {summary['cycles']} cycles over {seconds:.0f} s of churn, peak during churn {peak}")
    for name, c in summary["checks"].items():
        verdict = "ok" if c["ok"] else "NOT BACK"
        print(f"soak: {name}: baseline {c['baseline']} -> end {c['end']} (limit {c['limit']}): {verdict}")
    print("soak: " + ("PASS" if summary["ok"] else "FAIL"), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
