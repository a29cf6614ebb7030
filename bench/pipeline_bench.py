"""`make bench-pipeline`: the whole pipeline as users run it, with a real Envoy (bench/README.md,
"The pipeline with a real Envoy").

For N models kept in a manifests directory (one file per model, or all in one file), this starts
`overspill serve --manifests DIR` (the venv's console script) and a real Envoy with the bootstrap
`overspill bootstrap` prints (state of the world, then `--delta`), and measures:

* start: process start -> /readyz 200 (the directory loaded, decided and published, xDS served);
* Envoy converged: Envoy's start -> all clusters active, a sample of models answering 200 through
  Envoy's listener, and every model's runtime key in admin /runtime;
* an endpoint change, a new model and a weight change (an outage) made by editing files, each
  until Envoy shows it; idle CPU, RSS; xDS bytes per change;

and the same start and converge figures (and changes) for sovereign (python templates, REST) on
the same models, same backends and same Envoy binary. Loopback only; every process stopped at the
end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from api.crd import Behavior
from bench.pipeline_envoy import (
    EnvoyView,
    TimedEnvoy,
    cpu_seconds,
    idle_cpu,
    rss_mib,
    wait_for,
)
from bench.pipeline_workload import Backends, ManifestDir, ModelFile, ModelSet, Workload, write_models
from overspill.demo.procs import ControlPlaneProcess, ProcessFailed, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "pipeline_results.json"
VENV_BIN = Path(sys.executable).parent  # the venv's bin: its `overspill` and `envoy`
WEIGHT_ON, WEIGHT_OFF = "100", "0"  # an outage sends 100 % to the remote; back to 0 after it


def say(text: str) -> None:
    print(text, flush=True)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


STALE_AFTER = Behavior.metric_stale_after_seconds  # the default, which the bench's models keep

# --- Overspill ------------------------------------------------------------------------------------


class OverspillServe(ControlPlaneProcess):
    """`overspill serve --manifests DIR` as users run it: the venv's console script (the demo's
    harness runs `python -m overspill`), ready when /readyz answers 200."""

    spawned_at = 0.0
    ready_at = 0.0

    def _prepare(self, workdir: Path) -> list[str]:
        argv = super()._prepare(workdir)
        if argv[:3] != [sys.executable, "-m", "overspill"]:
            raise RuntimeError(f"unexpected control-plane command line {argv[:3]}")
        return [str(VENV_BIN / "overspill"), *argv[3:]]

    async def _spawn(self, argv: list[str]) -> None:
        self.spawned_at = time.monotonic()
        await super()._spawn(argv)

    async def _ready(self) -> bool:
        ok = await self._probe(f"{self.metrics_url}/readyz")
        if ok:
            self.ready_at = time.monotonic()
        return ok


async def sent_bytes(cp: OverspillServe) -> float | None:
    """Sum of `overspill_xds_sent_bytes` over every type (its /metrics); None if unreadable."""
    try:
        url = f"{cp.metrics_url}/metrics"
        async with cp.session.get(url, timeout=aiohttp.ClientTimeout(total=60)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("overspill_xds_sent_bytes_total")
    )


async def scrape_cost(cp: OverspillServe, times: int = 3) -> dict[str, float]:
    """The control plane's CPU for one Prometheus scrape of its /metrics (median of `times`), and
    its size: what a 15 s scrape interval adds to idle CPU."""
    assert cp.pid is not None
    costs, size = [], 0
    for _ in range(times):
        before = cpu_seconds([cp.pid])
        url, limit = f"{cp.metrics_url}/metrics", aiohttp.ClientTimeout(total=60)
        async with cp.session.get(url, timeout=limit) as resp:
            size = len(await resp.read())
        costs.append(cpu_seconds([cp.pid]) - before)
    return {"scrape_cpu_s": median(costs) or 0.0, "scrape_kib": size / 1024}


class OverspillRig:
    """One control plane and one Envoy fed by it over ADS (SotW or Delta)."""

    system = "overspill"

    def __init__(self, cfg: argparse.Namespace, protocol: str, model_set: ModelSet, workdir: Path) -> None:
        self.cfg = cfg
        self.protocol = protocol
        self.models = model_set
        self.workdir = workdir
        self.cp: OverspillServe | None = None
        self.detail: dict[str, Any] = {}

    @staticmethod
    def model_set(root: Path, workload: Workload, backends: Backends) -> ModelSet:
        return ManifestDir(root, workload, backends)

    @staticmethod
    def variant(workload: Workload) -> str:
        return workload.variant

    @property
    def listener_port(self) -> int:
        assert self.cp is not None
        return self.cp.listener_port

    async def start(self, stack: AsyncExitStack) -> float:
        """Start the control plane; seconds from its spawn to serving the full set."""
        cp = OverspillServe(
            self.models.root, evaluation_interval=self.cfg.evaluation_interval, log_dir=self.cfg.logs
        )
        cp.startup_timeout = self.cfg.start_timeout
        self.cp = await stack.enter_async_context(cp)
        start_s = cp.ready_at - cp.spawned_at
        start_cpu = cpu_seconds(self.pids())
        t = time.monotonic()
        status = await self.status()
        status_s = time.monotonic() - t
        models = status.get("models", {})
        phases: dict[str, int] = {}
        for entry in models.values():
            phases[entry.get("state", "?")] = phases.get(entry.get("state", "?"), 0) + 1
        self.detail = {
            "cpu_s": start_cpu,
            "status_s": round(status_s, 3),
            "models_in_status": len(models),
            "phases": phases,
            "rejected": len(status["rejected"]),
        }
        if len(models) != self.models.workload.n:
            raise RuntimeError(
                f"/readyz is 200 but /status has {len(models)} of {self.models.workload.n} models"
            )
        return start_s

    async def status(self) -> dict[str, Any]:
        """GET /status (the harness' own `status()` gives up after 5 s: too short at N=10,000)."""
        assert self.cp is not None
        url = f"{self.cp.metrics_url}/status"
        async with self.cp.session.get(url, timeout=aiohttp.ClientTimeout(total=120)) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    def bootstrap(self, admin_port: int) -> Path:
        """What `overspill bootstrap [--delta]` prints, for this control plane's ports."""
        assert self.cp is not None
        argv = [str(VENV_BIN / "overspill"), "bootstrap", "--xds-port", str(self.cp.xds_port)]
        argv += ["--admin-port", str(admin_port), "--delta" if self.protocol == "delta" else "--sotw"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
        path = self.workdir / f"bootstrap-{self.protocol}.yaml"
        path.write_text(out)
        return path

    def xds_port(self) -> int:
        assert self.cp is not None
        return self.cp.xds_port

    def pids(self) -> list[int]:
        assert self.cp is not None and self.cp.pid is not None
        return [self.cp.pid]

    async def sent_bytes(self) -> float | None:
        assert self.cp is not None
        return await sent_bytes(self.cp)

    def expected_clusters(self) -> int:
        return self.models.workload.clusters + 1  # and the static xds_cluster

    def runtime_keys(self, models: list[ModelFile]) -> list[str]:
        """The weights Envoy must hold: only a model offloading has a key, and none does at
        start (each has a ready endpoint, and its metric source does not answer)."""
        return []

    def quiet_after(self) -> float:
        """When nothing is due any more: no metric source answers here, so every model's metric
        goes stale once, metricStaleAfterSeconds (60 s) after start, and that is a change (every
        model decided again: about 1 CPU-s at 10,000), not idling."""
        assert self.cp is not None
        return self.cp.spawned_at + STALE_AFTER + 2 * self.cfg.evaluation_interval

    async def after(self) -> dict[str, Any]:
        """What the control plane says about its Envoy, and its log's warnings and errors."""
        assert self.cp is not None
        status = await self.status()
        lines = self.cp.log_text().splitlines()
        bad = [
            line for line in lines if "level=WARNING" in line or "level=ERROR" in line or "Traceback" in line
        ]
        expected = [line for line in bad if "event=metric_unavailable" in line]  # no metric source here
        others = [line for line in bad if "event=metric_unavailable" not in line]
        nacks = [
            {"id": n.get("id"), "types": {t: v for t, v in n.get("types", {}).items() if v.get("nack")}}
            for n in status.get("nodes", [])
            if any(v.get("nack") for v in n.get("types", {}).values())
        ]
        return await scrape_cost(self.cp) | {
            "log_lines": len(lines),
            "log_metric_unavailable": len(expected),
            "log_other_warnings_errors": len(others),
            "log_first_warnings": others[:5],
            "nacks": nacks,
        }


# --- one configuration ------------------------------------------------------------------------------


async def change_loop(
    label: str,
    count: int,
    make: Callable[[int], Awaitable[tuple[float, Callable[[], Awaitable[bool]]]]],
    rig: Any,
    envoy: TimedEnvoy,
    cfg: argparse.Namespace,
    poll: float,
    backoff: bool = True,
) -> dict[str, Any]:
    """`count` changes: `make(k)` edits and returns (visible-at stamp, check); each is timed until
    the check holds in Envoy; bytes on the wire (when the control plane counts them) per change."""
    times: list[float] = []
    sent: list[float] = []
    missed = 0
    for k in range(count):
        before = await rig.sent_bytes()
        stamp, check = await make(k)
        ok = await wait_for(
            check, cfg.change_timeout, poll, lambda: envoy.check_alive(f"during {label}"), backoff=backoff
        )
        took = time.monotonic() - stamp
        if ok:
            times.append(took)
        else:
            missed += 1
            say(f"    {label} #{k}: not seen in Envoy within {cfg.change_timeout:g}s")
        await asyncio.sleep(cfg.settle)  # the rest of this change's pushes, before counting bytes
        after = await rig.sent_bytes()
        if before is not None and after is not None:
            sent.append(after - before)
    result = {"median_s": median(times), "max_s": max(times) if times else None, "runs_s": times}
    result |= {"missed": missed, "bytes_median": median(sent), "bytes_runs": sent}
    say(
        f"    {label}: median {fmt_s(result['median_s'])} over {len(times)}"
        + (f", {missed} missed" if missed else "")
        + (f", {result['bytes_median']:.0f} B/change" if sent else "")
    )
    return result


async def measure_changes(
    rig: Any, view: EnvoyView, envoy: TimedEnvoy, cfg: argparse.Namespace, poll: float
) -> dict[str, Any]:
    models: ModelSet = rig.models
    backends = models.backends
    n = len(models.models)
    picks = [models.models[(k * 7919 + 13) % n] for k in range(3 * cfg.changes)]
    out: dict[str, Any] = {}

    async def endpoint(k: int) -> tuple[float, Callable[[], Awaitable[bool]]]:
        m = picks[k]
        step = 1
        while backends.local_port(m.index + step) == m.local_port:
            step += 1
        m.local_port = backends.local_port(m.index + step)
        want = {f"127.0.0.1:{m.local_port}"}
        cluster = m.cluster_local
        stamp = await asyncio.to_thread(models.rewrite, m)

        async def check() -> bool:
            return await view.cluster_hosts(cluster) == want

        return stamp, check

    out["endpoint_change"] = await change_loop(
        "endpoint change", cfg.changes, endpoint, rig, envoy, cfg, poll
    )

    async def new_model(k: int) -> tuple[float, Callable[[], Awaitable[bool]]]:
        m, stamp = await asyncio.to_thread(models.add_model)
        backend = backends.name_of_port(m.local_port)

        async def check() -> bool:
            return await view.request(m.host, timeout=2.0) == (200, backend)

        return stamp, check

    out["new_model"] = await change_loop("new model", cfg.changes, new_model, rig, envoy, cfg, poll)

    if not models.workload.remotes:
        out["weight_change"] = out["weight_back"] = None
        say("    weight change: n/a (no remotes: every model stays 100 % local)")
        return out
    flipped: list[ModelFile] = []

    def weight(ready: bool, value: str, seen: list[dict[str, float]]) -> Any:
        """The edit, and a check that notes when Envoy's traffic follows the new weight (at 100 %
        every request goes to the remote, at 0 % to the local pods: one request tells), then
        when admin /runtime shows the value. /runtime dumps every key in every layer on Envoy's
        main thread (seconds at N=10,000, while that thread applies the update), so it is read
        only once traffic follows, and again at most every twice its own duration."""

        async def make(k: int) -> tuple[float, Callable[[], Awaitable[bool]]]:
            m = picks[cfg.changes + k] if not ready else flipped[k]
            m.ready = ready
            if not ready:
                flipped.append(m)
            port = m.local_port if ready else m.remote_port
            backend = backends.name_of_port(port) if port is not None else ""
            stamp = await asyncio.to_thread(models.rewrite, m)
            marks = {"t0": stamp}
            seen.append(marks)
            next_runtime = 0.0

            async def check() -> bool:
                nonlocal next_runtime
                if "traffic" not in marks and await view.request(m.host, timeout=2.0) == (200, backend):
                    marks["traffic"] = time.monotonic()
                if "traffic" in marks and "runtime" not in marks and time.monotonic() >= next_runtime:
                    began = time.monotonic()
                    # Overspill leaves a model at 0 % out of its layer: the route's default applies.
                    if (await view.runtime()).get(m.runtime_key, WEIGHT_OFF) == value:
                        marks["runtime"] = time.monotonic()
                        marks["runtime_read"] = time.monotonic() - began
                    next_runtime = time.monotonic() + 2 * (time.monotonic() - began)
                return "traffic" in marks and "runtime" in marks

            return stamp, check

        return make

    def split(result: dict[str, Any], seen: list[dict[str, float]]) -> dict[str, Any]:
        runtime = [m["runtime"] - m["t0"] for m in seen if "runtime" in m]
        traffic = [m["traffic"] - m["t0"] for m in seen if "traffic" in m]
        reads = [m["runtime_read"] for m in seen if "runtime_read" in m]
        result |= {"median_s": median(traffic), "traffic_runs_s": traffic}
        result |= {"runtime_median_s": median(runtime), "runtime_runs_s": runtime, "runtime_read_s": reads}
        say(
            f"      traffic follows: {fmt_s(median(traffic))}; /runtime read then shows it: "
            f"{fmt_s(median(runtime))} (one read takes {fmt_s(median(reads))})"
        )
        return result

    # Outage: the model's only endpoint turns not ready -> 100 % remote; then ready again -> 0 %.
    for label, key, ready, value in (
        ("weight change (outage)", "weight_change", False, WEIGHT_ON),
        ("weight back (ready again)", "weight_back", True, WEIGHT_OFF),
    ):
        seen: list[dict[str, float]] = []
        make = weight(ready, value, seen)
        out[key] = split(
            await change_loop(label, cfg.changes, make, rig, envoy, cfg, poll, backoff=False), seen
        )
    return out


def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


async def run_config(
    rig_type: Any,
    cfg: argparse.Namespace,
    workload: Workload,
    protocol: str,
    backends: Backends,
    session: aiohttp.ClientSession,
) -> dict[str, Any]:
    """Repeats of (control plane start, Envoy converge); the changes, idle CPU and memory on the last."""
    row: dict[str, Any] = {
        "system": rig_type.system,
        "n": workload.n,
        "variant": rig_type.variant(workload),
        "protocol": protocol,
    }
    repeats = cfg.repeats if workload.n <= cfg.repeat_max_n else 1
    poll = cfg.poll if workload.n <= 1000 else cfg.poll_large
    row["poll_s"] = poll
    starts: list[float] = []
    start_cpus: list[float] = []
    converges: list[float] = []
    runs: list[dict[str, Any]] = []
    for r in range(repeats):
        last = r == repeats - 1
        with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
            workdir = Path(tmp)
            t = time.monotonic()
            model_set = await write_models(rig_type.model_set(workdir / "models", workload, backends))
            write_s = time.monotonic() - t
            rig = rig_type(cfg, protocol, model_set, workdir)
            run: dict[str, Any] = {"write_s": round(write_s, 3)}
            runs.append(run)
            async with AsyncExitStack() as stack:
                say(
                    f"  [{rig.system} {protocol} N={workload.n} {workload.variant}] "
                    f"run {r + 1}/{repeats}: starting"
                )
                try:
                    start_s = await rig.start(stack)
                except (ProcessFailed, RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
                    run["error"] = f"control plane did not start: {exc!r}"[:2000]
                    say(f"    {run['error'][:400]}")
                    break
                starts.append(start_s)
                start_cpus.append(rig.detail.get("cpu_s", 0.0))
                run |= {"start_s": start_s, **rig.detail}
                say(f"    start {fmt_s(start_s)} {rig.detail}")
                admin_port = free_port()
                envoy = TimedEnvoy(
                    rig.xds_port(),
                    admin_port,
                    node_id=f"bench-{protocol}",
                    bootstrap=rig.bootstrap(admin_port),
                    log_level="error",
                    log_dir=cfg.logs,
                )
                envoy.startup_timeout = cfg.converge_timeout
                try:
                    await stack.enter_async_context(envoy)
                except ProcessFailed as exc:
                    run["error"] = f"envoy not LIVE within {cfg.converge_timeout:g}s: {exc}"[:2000]
                    say(f"    {run['error'][:400]}")
                    continue
                view = EnvoyView(envoy, rig.listener_port, session)
                keys = rig.runtime_keys(model_set.models)
                conv = await view.wait_converged(
                    rig.expected_clusters(),
                    keys,
                    model_set.sample(cfg.sample),
                    workload.remotes,
                    cfg.converge_timeout,
                    poll,
                    say,
                )
                run["envoy"] = {
                    "live_s": conv.live_s,
                    "clusters_s": conv.clusters_s,
                    "routes_s": conv.routes_s,
                    "weights_s": conv.weights_s,
                    "last_seen": conv.last,
                }
                if not conv.done:
                    run["error"] = f"Envoy not converged within {cfg.converge_timeout:g}s: {conv.last}"
                    say(f"    {run['error']}")
                    continue
                converges.append(conv.converged_s or 0.0)
                say(
                    f"    envoy converged {fmt_s(conv.converged_s)} (LIVE {fmt_s(conv.live_s)}, "
                    f"clusters {fmt_s(conv.clusters_s)}, routes {fmt_s(conv.routes_s)}, "
                    f"weights {fmt_s(conv.weights_s)})"
                )
                if not last:
                    continue
                if cfg.changes > 0:
                    row |= await measure_changes(rig, view, envoy, cfg, poll)
                await asyncio.sleep(cfg.settle)
                wait = rig.quiet_after() - time.monotonic()
                if wait > 0 and not cfg.idle_now:
                    say(f"    idle: waiting {wait:.0f} s until the metrics have gone stale")
                    await asyncio.sleep(wait)
                row["idle_cpu"] = await idle_cpu(rig.pids, cfg.idle_seconds)
                row["envoy_idle_cpu"] = await idle_cpu(lambda e=envoy: [e.pid or 0], 2.0)
                row["cp_rss_mib"] = rss_mib(rig.pids())
                row["cp_cpu_total_s"] = cpu_seconds(rig.pids())
                row["envoy_rss_mib"] = rss_mib([envoy.pid or 0])
                row |= await rig.after()
                if "scrape_cpu_s" in row:
                    cost, size = row["scrape_cpu_s"], row["scrape_kib"]
                    say(f"    one /metrics scrape {cost:.3f} CPU-s, {size:.0f} KiB")
                say(
                    f"    idle {row['idle_cpu']:.3f} CPU-s/s; RSS control plane {row['cp_rss_mib']:.0f} MiB, "
                    f"Envoy {row['envoy_rss_mib']:.0f} MiB"
                )
    row["start_s"] = median(starts)
    row["start_cpu_s"] = median(start_cpus)
    row["converge_s"] = median(converges)
    row["runs"] = runs
    return row


# --- report -----------------------------------------------------------------------------------------


COLUMNS = [
    ("start", "start_s", "s"),
    ("start CPU", "start_cpu_s", "s"),
    ("converge", "converge_s", "s"),
    ("endpoint", "endpoint_change", "c"),
    ("new model", "new_model", "c"),
    ("weight", "weight_change", "c"),
    ("idle CPU", "idle_cpu", "f"),
    ("scrape CPU", "scrape_cpu_s", "f"),
    ("CP MiB", "cp_rss_mib", "m"),
    ("Envoy MiB", "envoy_rss_mib", "m"),
    ("B/new model", "new_model", "b"),
]


def cell(row: dict[str, Any], key: str, kind: str) -> str:
    value = row.get(key)
    if kind == "c":
        return fmt_s(value.get("median_s")) if isinstance(value, dict) else "-"
    if kind == "b":
        b = value.get("bytes_median") if isinstance(value, dict) else None
        return f"{b / 1024:.1f} KiB" if b is not None else "-"
    if value is None:
        return "-" if "error" not in json.dumps(row.get("runs", [])) else "FAIL"
    if kind == "s":
        return fmt_s(value)
    if kind == "f":
        return f"{value:.3f}"
    return f"{value:.0f}"


def numeric(row: dict[str, Any], key: str, kind: str) -> float | None:
    value = row.get(key)
    if kind == "c":
        return value.get("median_s") if isinstance(value, dict) else None
    if kind == "b":
        return value.get("bytes_median") if isinstance(value, dict) else None
    return value


def table(rows: list[dict[str, Any]]) -> str:
    head = ["system", "N", "variant", "xDS"] + [c[0] for c in COLUMNS]
    body = [
        [r["system"], f"{r['n']:,}", r["variant"], r["protocol"]] + [cell(r, k, t) for _, k, t in COLUMNS]
        for r in rows
    ]
    # Ratios: each Overspill row of the main variant against sovereign at the same N.
    for r in rows:
        if r["system"] != "overspill":
            continue
        s = next((x for x in rows if x["system"] == "sovereign" and x["n"] == r["n"]), None)
        if s is None or r["variant"] != Workload(r["n"]).variant:
            continue
        ratios = []
        for _, key, kind in COLUMNS:
            a, b = numeric(r, key, kind), numeric(s, key, kind)
            ratios.append(f"{a / b:.2f}x" if a is not None and b else "-")
        body.append(["overspill/sovereign", f"{r['n']:,}", r["variant"], f"{r['protocol']}/rest", *ratios])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, cfg: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    doc = {
        "bench": "pipeline",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline_bench", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: N=100, 1 run, 2 changes, no variants")
    size.add_argument("--full", action="store_true", help="add N=10,000 (about 15 more minutes)")
    p.add_argument("--models", help="colon-separated N (default 100:1000; --full 100:1000:10000)")
    p.add_argument("--protocol", choices=["sotw", "delta", "both"], default="both")
    p.add_argument(
        "--variants",
        default="one-file:no-remotes:no-metrics",
        help="extra workloads at --variant-models, colon-separated from one-file, no-remotes, "
        "no-metrics (default all; '' for none)",
    )
    p.add_argument("--variant-models", type=int, default=1000, help="N of the extra workloads (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="start+converge runs per configuration (default 3)")
    p.add_argument("--repeat-max-n", type=int, default=1000, help="above this N, one run (default 1000)")
    p.add_argument("--changes", type=int, default=5, help="changes of each kind (default 5)")
    p.add_argument(
        "--sample", type=int, default=20, help="models asked through Envoy's listener (default 20)"
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=30.0,
        help="idle CPU window (default 30: one period of the directory rescan, which a 10 s window "
        "catches or not)",
    )
    p.add_argument(
        "--idle-now",
        action="store_true",
        help="measure idle CPU right after the changes, not once the models' metrics (no source "
        "here) have gone stale 60 s after start",
    )
    p.add_argument(
        "--evaluation-interval", type=float, default=5.0, help="of `overspill serve` (its default 5)"
    )
    p.add_argument(
        "--poll", type=float, default=0.02, help="admin poll interval for N <= 1000 (default 0.02)"
    )
    p.add_argument(
        "--poll-large", type=float, default=0.1, help="admin poll interval above 1000 (default 0.1)"
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds after each change before counting bytes"
    )
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--converge-timeout", type=float, default=300.0)
    p.add_argument("--change-timeout", type=float, default=60.0)
    p.add_argument("--sovereign", choices=["yes", "no", "only"], default="yes", help="measure sovereign too")
    p.add_argument("--sovereign-venv", type=Path, default=ROOT / "out" / "sovereign-venv")
    p.add_argument(
        "--sovereign-workers", type=int, default=0, help="gunicorn workers (default: sovereign's own)"
    )
    p.add_argument(
        "--sovereign-refresh",
        type=float,
        default=1.0,
        help="Envoy REST refresh_delay and sovereign's source refresh, s",
    )
    p.add_argument("--logs", type=Path, help="keep the processes' logs here")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results JSON (default bench/pipeline_results.json)"
    )
    p.add_argument("--table", type=Path, metavar="JSON", help="only print the table of a results file")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.models = cfg.models or "100"
        cfg.repeats, cfg.changes, cfg.idle_seconds, cfg.variants, cfg.idle_now = 1, 2, 3.0, "", True
    cfg.sizes = [int(x) for x in (cfg.models or ("100:1000:10000" if cfg.full else "100:1000")).split(":")]
    cfg.protocols = ["sotw", "delta"] if cfg.protocol == "both" else [cfg.protocol]
    cfg.variant_list = [v for v in cfg.variants.split(":") if v]
    return cfg


def plan(cfg: argparse.Namespace) -> list[Workload]:
    workloads = [Workload(n) for n in cfg.sizes]
    for v in cfg.variant_list:
        if v == "one-file":
            workloads.append(Workload(cfg.variant_models, layout="one-file"))
        elif v == "no-remotes":
            workloads.append(Workload(cfg.variant_models, remotes=False))
        elif v == "no-metrics":
            workloads.append(Workload(cfg.variant_models, metrics=False))
        else:
            raise SystemExit(f"unknown variant {v!r}")
    return workloads


async def main_async(cfg: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.pipeline_sovereign import SovereignRig, SovereignUnavailable, ensure_sovereign

    rows: list[dict[str, Any]] = []
    sovereign_error = None
    if cfg.sovereign != "no":
        try:
            ensure_sovereign(cfg.sovereign_venv, say)
        except SovereignUnavailable as exc:
            sovereign_error = str(exc)
            say(f"sovereign unavailable, skipped: {exc}")
    started = time.monotonic()
    async with Backends() as backends, aiohttp.ClientSession() as session:
        for workload in plan(cfg):
            if cfg.sovereign != "only":
                for protocol in cfg.protocols:
                    rows.append(await run_config(OverspillRig, cfg, workload, protocol, backends, session))
                    write_json(cfg.out, cfg, rows)
            main_variant = workload == Workload(workload.n)
            if cfg.sovereign != "no" and sovereign_error is None and main_variant:
                rows.append(await run_config(SovereignRig, cfg, workload, "rest", backends, session))
                write_json(cfg.out, cfg, rows)
    if sovereign_error is not None:
        rows.append(
            {"system": "sovereign", "n": 0, "variant": "-", "protocol": "rest", "error": sovereign_error}
        )
        write_json(cfg.out, cfg, rows)
    say(f"\ndone in {time.monotonic() - started:.0f}s; results in {cfg.out}\n")
    return rows


PACKAGES = ("api", "metrics", "overspill", "reconciler", "xds")


def compile_project() -> None:
    """Byte-compile the control plane's modules, as `pip install` does for an installed package:
    start is then what users see. From an editable checkout (or with PYTHONDONTWRITEBYTECODE),
    every start would compile the project's sources again, about 0.1 s of it."""
    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.table is not None:
        rows = json.loads(cfg.table.read_text())["rows"]
        for row in rows:  # results written before the column existed
            runs = [r.get("cpu_s") for r in row.get("runs", []) if r.get("cpu_s") is not None]
            row.setdefault("start_cpu_s", median(runs))
        say(table([r for r in rows if r.get("n")]))
        return 0
    say(
        f"pipeline bench: N={cfg.sizes} protocols={cfg.protocols} variants={cfg.variant_list or '-'} "
        f"at N={cfg.variant_models}; repeats={cfg.repeats} changes={cfg.changes}; sovereign={cfg.sovereign}"
    )
    compile_project()
    try:
        rows = asyncio.run(main_async(cfg))
    except KeyboardInterrupt:
        say("interrupted; every process was stopped")
        return 130
    say(table([r for r in rows if r.get("n")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
