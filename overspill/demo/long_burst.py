"""The long-burst demo: a burst longer than the buffer, in Fixed mode and then in Proportional mode.

The offloading metric is the local model's in-flight count, which offloading lowers. Fixed mode
sends `percentage` %, more than the excess, so the metric falls under its target, the buffer
runs out while the burst is still on, offloading releases, the local model is swamped and
offloading switches on again. Proportional mode sends the excess only (capped at `percentage`),
so the metric stays at its target and offloading stays on until the burst is over. Both runs
are the same load on fresh components; timeline.png draws them side by side, summary.txt holds
the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from overspill.demo.plot import plot_comparison
from overspill.demo.scenario import MODEL, Change, DemoPlan, Run, guarded, run_plan, write_csv

log = logging.getLogger(__name__)

# Local capacity 80 rps (8 slots x 0.1 s); the burst asks 150 rps: an in-flight target of 6
# (60 rps) means 60 % to the remote. Fixed sends the cap, 80 %, which leaves the local model
# at 3 in flight: under target, so the 8 s buffer runs out well inside the 40 s burst. The
# in-flight gauge is one sample of a count that jumps with every request: it is scraped every
# 0.25 s and read as its average over the last 2 s, every 0.5 s.
LONG_BURST = DemoPlan(
    baseline_rps=30.0,
    burst_rps=150.0,
    burst_start=10.0,
    burst_end=50.0,
    duration=70.0,
    threshold=6.0,
    percentage=80,
    buffer_seconds=8,
    local_concurrency=8,
    service_time=0.1,
    evaluation_interval=0.5,
    scrape_interval=0.25,
    settle_seconds=15.0,
    metric_query=f'avg_over_time(model_inflight_requests{{model="{MODEL}"}}[2s])',
)
METRIC_BAND = 0.2  # Proportional: the local in-flight average must stay within 20 % of target


@dataclass(frozen=True)
class Figures:
    """What one run showed, as the README's side-by-side table has it."""

    mode: str
    switch_ons: int  # offloading off -> on
    releases_in_burst: int  # offloading on -> off (or Releasing entered) while the burst was on
    state_changes: int  # every change of the control plane's state
    local_share_burst: float | None  # % of the burst's answers served locally
    remote_share_settled: float | None  # % served by the remote once settled
    inflight_mean_settled: float | None  # local in-flight average over the settled burst (backend)
    inflight_peak_burst: float | None  # highest per-second local in-flight average in the burst
    metric_peak_burst: float | None  # highest reading the control plane had during the burst
    seconds_in_band: float | None  # % of settled seconds with the local in-flight within the band
    p99_ms_max: float | None  # worst per-second p99 latency during the burst
    requests: int
    errors: int

    def row(self) -> list[str]:
        def f(v: float | None, fmt: str = "{:.1f}") -> str:
            return "n/a" if v is None else fmt.format(v)

        return [
            self.mode,
            str(self.switch_ons),
            str(self.releases_in_burst),
            str(self.state_changes),
            f(self.local_share_burst, "{:.0f}%"),
            f(self.remote_share_settled, "{:.0f}%"),
            f(self.inflight_mean_settled),
            f(self.seconds_in_band, "{:.0f}%"),
            f(self.inflight_peak_burst),
            f(self.metric_peak_burst, "{:.0f}"),
            f(self.p99_ms_max, "{:.0f}"),
            f"{self.errors}/{self.requests}",
        ]


HEADER = [
    "mode",
    "switch-ons",
    "releases in burst",
    "state changes",
    "served locally (burst)",
    "remote share (settled)",
    "local in-flight mean (settled)",
    "seconds within +-20%",
    "local in-flight peak",
    "metric peak (read)",
    "p99 max (ms)",
    "errors",
]


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def figures(rows: list[dict[str, Any]], plan: DemoPlan, changes: list[Change] | None = None) -> Figures:
    """The side-by-side figures of one run (rows and changes as `scenario.run_plan` makes them;
    without `changes`, the state in each row stands for that second)."""
    burst = [r for r in rows if plan.burst_start <= r["t"] < plan.burst_end]
    settled = [r for r in burst if r["t"] >= plan.burst_start + plan.settle_seconds]
    if changes is None:
        changes = [Change(r["t"], r["state"], r["offloading"]) for r in rows]
    switch_ons = releases = 0
    for before, after in zip(changes, changes[1:], strict=False):
        switch_ons += after.offloading and not before.offloading
        released = (before.offloading and not after.offloading) or (
            after.state == "Releasing" and before.state != "Releasing"
        )
        releases += plan.burst_start <= after.t < plan.burst_end and released
    inflight = [r["local_inflight"] for r in settled if r["local_inflight"] is not None]
    band = [abs(v - plan.threshold) <= METRIC_BAND * plan.threshold for v in inflight]
    served = sum(r["local_rps"] + r["remote_rps"] for r in burst)
    served_settled = sum(r["local_rps"] + r["remote_rps"] for r in settled)
    peaks = [r["local_inflight"] for r in burst if r["local_inflight"] is not None]
    metrics = [r["metric"] for r in burst if r["metric"] is not None]
    p99s = [r["p99_ms"] for r in burst if r["p99_ms"] is not None]
    return Figures(
        mode=plan.mode,
        switch_ons=switch_ons,
        releases_in_burst=releases,
        state_changes=sum(a.state != b.state for a, b in zip(changes, changes[1:], strict=False)),
        local_share_burst=_pct(sum(r["local_rps"] for r in burst), served),
        remote_share_settled=_pct(sum(r["remote_rps"] for r in settled), served_settled),
        inflight_mean_settled=sum(inflight) / len(inflight) if inflight else None,
        inflight_peak_burst=max(peaks, default=None),
        metric_peak_burst=max(metrics, default=None),
        seconds_in_band=_pct(sum(band), len(band)),
        p99_ms_max=max(p99s, default=None),
        requests=sum(r["offered"] for r in rows),
        errors=sum(r["errors"] for r in rows),
    )


def ideal_remote_share(plan: DemoPlan) -> float:
    """The share that leaves the local model exactly its target, by Little's law (no queueing)."""
    demand = plan.burst_rps * plan.service_time  # in-flight the whole burst would hold locally
    return min(100.0 * (1 - plan.threshold / demand), plan.percentage)


def judge(fig: Figures, plan: DemoPlan) -> list[str]:
    """What Proportional mode promises over a burst longer than the buffer; [] when it kept it."""
    failures = []
    if fig.switch_ons != 1:
        failures.append(f"offloading switched on {fig.switch_ons} times, want once")
    if fig.releases_in_burst:
        failures.append(f"offloading released {fig.releases_in_burst} times during the burst")
    mean = fig.inflight_mean_settled
    if mean is None or abs(mean - plan.threshold) > METRIC_BAND * plan.threshold:
        failures.append(f"local in-flight averaged {mean} over the settled burst, target {plan.threshold:g}")
    ideal = ideal_remote_share(plan)
    share = fig.remote_share_settled
    if share is None or not ideal - 20 <= share <= ideal + 10:  # queueing adds to the excess
        failures.append(f"remote served {share}% of the settled burst, the excess is about {ideal:.0f}%")
    if fig.errors:
        failures.append(f"{fig.errors} requests failed")
    return failures


def table(figs: list[Figures]) -> list[str]:
    """A Markdown table, one column per run."""
    lines = ["| | " + " | ".join(f.mode for f in figs) + " |", "|---" * (len(figs) + 1) + "|"]
    columns = [f.row() for f in figs]
    for i, name in enumerate(HEADER[1:], start=1):
        lines.append(f"| {name} | " + " | ".join(c[i] for c in columns) + " |")
    return lines


async def run_long_burst(out_dir: Path, plan: DemoPlan = LONG_BURST) -> int:
    """Run `plan` in Fixed then Proportional mode; write timeline.png (both), one CSV per mode
    and summary.txt into out_dir; 0 if Proportional kept its promises."""
    return await guarded(out_dir, lambda: _compare(Path(out_dir), plan))


async def _compare(out_dir: Path, plan: DemoPlan) -> int:
    runs: list[Run] = []
    for mode in ("Fixed", "Proportional"):
        print(f"\n--- {mode} mode ---", flush=True)
        runs.append(await run_plan(out_dir / mode.lower(), replace(plan, mode=mode)))
    figs = [figures(r.rows, r.plan, r.changes) for r in runs]
    for run in runs:
        write_csv(run.rows, out_dir / f"timeline-{run.plan.mode.lower()}.csv")
    plot_comparison(
        [(f"{r.plan.mode} (percentage {r.plan.percentage}%)", r.rows) for r in runs],
        out_dir / "timeline.png",
        plan.threshold,
        spans=[(plan.burst_start, plan.burst_end)],
    )
    failures = judge(figs[1], replace(plan, mode="Proportional"))
    lines = [
        f"burst {plan.burst_rps:g} rps from t={plan.burst_start:g}s to t={plan.burst_end:g}s over "
        f"{plan.baseline_rps:g} rps; local capacity {plan.local_concurrency / plan.service_time:g} rps; "
        f"target {plan.threshold:g} in flight; buffer {plan.buffer_seconds}s; settled from "
        f"t={plan.burst_start + plan.settle_seconds:g}s",
        *table(figs),
    ]
    verdict = "demo OK" if not failures else "demo FAILED: " + "; ".join(failures)
    (out_dir / "summary.txt").write_text("\n".join([*lines, verdict]) + "\n")
    print("\n".join(["", *lines]), flush=True)
    print(f"wrote {out_dir / 'timeline.png'}", flush=True)
    print(verdict, flush=True)
    return 0 if not failures else 1
