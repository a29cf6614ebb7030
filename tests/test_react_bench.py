"""`python -m bench.react_bench` in short, so it cannot rot: a load step on each path (Envoy's
load reports, Prometheus) offloads, seen at the remote backend, within the switch budget."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_stack import SWITCH_BUDGET, envoy_binary, missing

from overspill.demo.procs import PROMETHEUS_HINT, ComponentMissing, find_binary

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_a_load_step_reaches_the_remote_within_the_budget_on_both_paths(tmp_path):
    envoy_binary()
    try:
        find_binary("prometheus", PROMETHEUS_HINT, after=[Path("/usr/bin/prometheus")])
    except ComponentMissing as exc:
        missing(exc)
    out = tmp_path / "react.json"
    argv = [sys.executable, "-m", "bench.react_bench", "--repetitions", "2", "--out", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    samples = results["samples"]
    assert sorted(s["path"] for s in samples) == ["lrs", "lrs", "prometheus", "prometheus"]
    for s in samples:
        # Sampled every 1 s (report or scrape), evaluated every 1 s, then pushed: under 2 s plus
        # slack on a busy machine; never before the crossing.
        assert 0 < s["latency"] < SWITCH_BUDGET, s
        # The control plane logged its decision between the crossing and the first remote request.
        assert s["decided"] is not None and 0 < s["detection"] < s["latency"], s
    for summary in results["summary"]:
        assert summary["n"] == 2 and math.isfinite(summary["p50"]), summary
        assert summary["p50"] <= summary["p99"] < SWITCH_BUDGET, summary
    assert "| lrs | 2 |" in run.stdout and "| prometheus | 2 |" in run.stdout  # the table printed
