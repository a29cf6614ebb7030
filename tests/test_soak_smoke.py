"""`make soak` in about 20 seconds, so it cannot rot: the real `overspill serve`, a real Prometheus,
simulated Envoys, a few churn cycles, and the figures it reports back where they started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_soak_churns_and_its_figures_come_back(tmp_path):
    out = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "bench.soak", "--seconds", "8", "--warmup", "4", "--settle", "3"]
    argv += ["--sample-every", "3", "--models", "10", "--envoys", "3", "--out", str(out)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("soak: PASS")
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["cycles"] >= 3
    assert set(summary["checks"]) == {"rss_mib", "fds", "tasks"}
    samples = summary["samples"]
    assert all(s["streams"] == 3 for s in samples)  # nodes churned, never more or fewer connected
    assert {s["models"] for s in samples} >= {10, 11}  # steady state, and a model added during churn
    assert all(s["tasks"] > 0 and s["fds"] > 0 and s["rss_mib"] > 0 for s in samples)
