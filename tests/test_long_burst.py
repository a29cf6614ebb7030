"""A burst longer than the buffer through a real Envoy, in Fixed and in Proportional mode.

The demo's parts: two simulated model servers (the local one with 8 slots, 80 rps), a real
Prometheus scraping the local in-flight gauge, the control plane as a process and a real Envoy;
the load is open loop, counted per second at the client and at the servers. The local in-flight
figures are the local server's own time average (`ServerCounts.area_now`), not the sampled gauge
the control plane reads.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from test_demo_parts import require_envoy, require_prometheus

from overspill.demo.long_burst import LONG_BURST, Figures, figures, judge, table
from overspill.demo.scenario import run_plan

# Shorter than the demo's: a 32 s burst over a 6 s buffer.
PLAN = dataclasses.replace(
    LONG_BURST, burst_start=8.0, burst_end=40.0, duration=58.0, buffer_seconds=6, settle_seconds=14.0
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Figures, list[dict]]]:
    require_prometheus()
    require_envoy()
    out = {}
    for mode in ("Fixed", "Proportional"):
        plan = dataclasses.replace(PLAN, mode=mode)
        run = asyncio.run(run_plan(tmp_path_factory.mktemp(mode.lower()), plan))
        out[mode] = (figures(run.rows, plan, run.changes), run.rows)
    print("\n".join(table([out["Fixed"][0], out["Proportional"][0]])))
    return out


def test_proportional_mode_holds_the_local_metric_at_target_through_a_long_burst(runs):
    fig, rows = runs["Proportional"]
    plan = dataclasses.replace(PLAN, mode="Proportional")
    assert judge(fig, plan) == [], "\n".join(table([fig]))
    # offloading went on once, inside the burst, and stayed on until after it
    on = [r["t"] for r in rows if r["offloading"]]
    assert plan.burst_start <= on[0] <= plan.burst_start + 3
    assert all(r["offloading"] for r in rows if on[0] <= r["t"] < plan.burst_end)
    assert not rows[-1]["offloading"], "offloading must end after the burst"
    # the remote got the excess, not the cap
    settled = [r for r in rows if plan.burst_start + plan.settle_seconds <= r["t"] < plan.burst_end]
    assert fig.remote_share_settled < plan.percentage - 5
    assert sum(r["remote_rps"] for r in settled) > 0.4 * sum(r["offered"] for r in settled)


def test_fixed_mode_releases_and_switches_on_again_during_the_same_burst(runs):
    """The seeds' rule on the same load: the cycle Proportional mode removes."""
    fixed, _ = runs["Fixed"]
    proportional, _ = runs["Proportional"]
    assert fixed.releases_in_burst >= 1
    assert fixed.switch_ons >= 2
    assert fixed.inflight_peak_burst > proportional.inflight_mean_settled * 3
