"""The Grafana dashboard: committed as generated, valid for Grafana, and every query proven against a
real Prometheus scraping the real control plane and a real Envoy through a burst."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_stack import (
    SCRAPE_INTERVAL,
    SWITCH_BUDGET,
    Model,
    Stack,
    delta,
    rejected_by_envoy,
    stack,
    totals,
)

from overspill.dashboard import (
    dashboard,
    legend,
    metric_names,
    queries,
    rate_interval,
    render,
    substitute,
    variable_queries,
)
from overspill.demo.board import draw_dashboard
from overspill.demo.procs import CONTROL_PLANE_JOB

ROOT = Path(__file__).resolve().parent.parent
BOARD = ROOT / "manifests" / "grafana" / "overspill-dashboard.json"
RULES = ROOT / "manifests" / "prometheus" / "overspill-rules.yaml"


def test_committed_dashboard_is_what_the_generator_prints():
    assert BOARD.read_text() == render(), "stale: regenerate it with `make dashboard`"


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_dashboard_keeps_grafanas_schema_rules():
    board = json.loads(BOARD.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} runs past the 24 grid columns"
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
    # Every datasource is the variable: importing into any Grafana asks for no uid.
    sources = [(path, value) for path, key, value in _walk(board) if key == "datasource"]
    assert sources and all(v == {"type": "prometheus", "uid": "${datasource}"} for _, v in sources), sources
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "model"} <= set(variables)
    titles = {p["title"] for p in panels}
    assert {"Fleet", "Model $namespace/$model", "Control plane"} <= titles
    for p in panels:
        if p["type"] != "row":
            assert p["targets"] and p["description"], p["title"]
    # The metric panel draws its target as a dashed line.
    metric = next(p for p in panels if p["title"] == "Offloading metric and target")
    assert [o["matcher"]["options"] for o in metric["fieldConfig"]["overrides"]] == ["B"]
    assert "metric_target" in metric["targets"][1]["expr"]


def test_the_cli_prints_the_dashboard(tmp_path):
    out = tmp_path / "board.json"
    result = subprocess.run(
        [sys.executable, "-m", "overspill", "dashboard", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == dashboard()


def test_configmap_carries_the_dashboard_for_grafanas_sidecar():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl (with kustomize) is needed to render manifests/grafana")
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(BOARD.parent)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    [configmap] = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"overspill-dashboard.json": BOARD.read_text()}


def test_substitute_replaces_grafana_variables_and_keeps_regex_groups():
    values = {"namespace": "ns", "model": "m", "__rate_interval": "5s"}
    assert (
        substitute('rate(x{namespace="$namespace",name="${model}"}[$__rate_interval]) "$1"', values)
        == 'rate(x{namespace="ns",name="m"}[5s]) "$1"'
    )
    with pytest.raises(KeyError, match=r"\$job"):
        substitute('x{job=~"$job"}', values)


def test_legend_and_rate_interval_as_grafana_makes_them():
    assert legend("p99 {{side}} {{ type }}", {"side": "local", "type": "CDS"}) == "p99 local CDS"
    assert legend("{{missing}}", {}) == ""
    assert rate_interval(1.0, 1.0) == "4s"  # four scrapes
    assert rate_interval(60.0, 15.0) == "75s"  # a step plus a scrape
    assert rate_interval(1.0, 1.0, floor=10.0) == "10s"


def test_metric_names_leave_out_functions_labels_and_keywords():
    expr = (
        'histogram_quantile(0.99, sum by (side, le) (rate(a_bucket{model="m(x)"}[5m]))) > 1e3 '
        "and on (x) b_total unless max_over_time(c[1m])"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


# --- the proof: every query against a real Prometheus after a burst ---------------------------


def _has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(v)) for series in result for _, v in series["values"])


def _values(result: list[dict], **labels: str) -> list[float]:
    return [
        float(v)
        for series in result
        if all(series["metric"].get(k) == want for k, want in labels.items())
        for _, v in series["values"]
        if not math.isnan(float(v))
    ]


async def _burst(s: Stack, burst: Model) -> None:
    """Baseline, a burst that switches offloading on, failures at the local pods, a config Envoy
    rejects, then the burst's end: something for every panel to show."""
    assert (await s.send(burst, 60)).count(200) == 60
    s.knob.set(burst.name, 50)
    await s.wait_phase(burst, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
    before = totals(burst)
    for _ in range(4):  # spread over a few scrapes so rate() sees it
        assert (await s.send(burst, 100)).count(200) == 100
        await asyncio.sleep(0.5)
    local, remote = delta(burst, before)
    assert 0.3 < remote / (local + remote) < 0.7, (local, remote)
    burst.local.status = 500
    codes: list[int] = []
    for _ in range(3):  # Envoy makes a 5xx stat at the first 5xx: rate() needs more after that
        codes += await s.send(burst, 20)
        await asyncio.sleep(1.0)
    burst.local.status = 200
    assert codes.count(500) > 0, codes
    _, docs = rejected_by_envoy(burst)
    (s.manifests / "tls.yaml").write_text(yaml.safe_dump_all(docs))
    await s.prometheus.wait_for_series("overspill_xds_nacks_total > 0", timeout=15)
    s.knob.set(burst.name, 0)
    await s.wait_phase(burst, {"Standby"}, timeout=burst.buffer_seconds + SWITCH_BUDGET + 2)
    assert (await s.send(burst, 60)).count(200) == 60
    await asyncio.sleep(3)  # the last scrapes


@pytest.mark.e2e
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    burst = Model("burst", percentage=50, threshold=10, buffer_seconds=3)
    # Its metric does not exist: every read is an error, as the read-errors panel shows.
    blind = Model(
        "blind",
        metrics=[
            {
                "type": "External",
                "external": {
                    "metric": {"name": "overspill_test_missing", "selector": {"matchLabels": {"m": "x"}}},
                    "target": {"type": "Value", "value": "10"},
                },
            }
        ],
    )
    async with asyncio.timeout(180), stack(tmp_path, burst, blind, scrape_components=True) as s:
        prom = s.prometheus
        await prom.wait_for_series('up{job="envoy"} == 1', timeout=15)
        await prom.wait_for_series(f'up{{job="{CONTROL_PLANE_JOB}"}} == 1', timeout=15)
        # Until Prometheus has scraped the knob once, the healthy model's reads fail too: the
        # panels are judged from one rate window after its metric is read.
        for _ in range(300):
            if (await s.model_status(burst)).get("metrics", [{}])[0].get("value") is not None:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the burst model's metric was never read")
        await asyncio.sleep(float(rate_interval(1.0, SCRAPE_INTERVAL).rstrip("s")) + SCRAPE_INTERVAL)
        start = time.time()
        await _burst(s, burst)
        end = time.time()

        board = json.loads(BOARD.read_text())
        values = {
            "namespace": burst.namespace,
            "model": burst.name,
            "job": CONTROL_PLANE_JOB,
            "__rate_interval": rate_interval(1.0, SCRAPE_INTERVAL),
        }
        for expr in variable_queries(board):
            assert await prom.query(substitute(expr, values)), f"variable query {expr!r} found nothing"

        names = await prom.metric_names()
        results: dict[tuple[str, str], list[dict]] = {}
        empty, missing = [], []
        for q in queries(board):
            expr = substitute(q.expr, values)
            result = await prom.query_range(expr, start, end, 1.0)  # raises on a query error
            results[q.panel, q.ref] = result
            if not _has_data(result):
                empty.append(f"{q.panel} ({q.ref}): {expr}")
            missing += [f"{q.panel}: {n}" for n in metric_names(q.expr) - names]
        assert not missing, f"metric names Prometheus does not have: {missing}"
        assert not empty, "queries that returned no data:\n" + "\n".join(empty)

        # What the panels show is what happened.
        decided = _values(results["Remote share: decided and served", "A"])
        served = _values(results["Remote share: decided and served", "B"])
        assert max(decided) == 50 and min(decided) == 0, decided
        assert any(30 < v < 70 for v in served), served
        assert 1.0 in _values(results["Phase", "A"], phase="Offloading")
        assert 1.0 in _values(results["Phase", "A"], phase="Standby")
        assert max(_values(results["Offloading metric and target", "B"])) == 10
        assert max(_values(results["Offloading metric and target", "A"])) == 50
        assert max(_values(results["Requests: local and remote", "A"], side="remote")) > 0
        assert max(_values(results["Errors", "A"], side="local", envoy_response_code_class="5")) > 0
        assert max(_values(results["NACKs", "A"], type="CDS")) > 0
        assert max(_values(results["NACKs", "B"], name="tls")) > 0
        assert max(_values(results["Metric read errors", "A"], name="blind")) > 0
        # The model whose metric is missing stands out; the healthy one may see a read time out
        # on a loaded machine, but never at the rate of one that cannot be read at all.
        burst_errors = _values(results["Metric read errors", "A"], name="burst")
        assert max(burst_errors) < max(_values(results["Metric read errors", "A"], name="blind")) / 2

        # The demo's picture, drawn from the same queries.
        png = await draw_dashboard(prom, tmp_path / "dashboard.png", values, start, end)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000

        # Every alert expression of the shipped rules is valid PromQL over metrics that exist, and
        # those about what happened here would fire (after their `for:`), the others not.
        rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
        firing = set()
        for rule in rules:
            if await prom.query(rule["expr"]):  # raises on a query error
                firing.add(rule["alert"])
            missing = metric_names(rule["expr"]) - names
            assert not missing, f"alert {rule['alert']} reads metrics Prometheus does not have: {missing}"
        assert len(rules) >= 8
        assert {"OverspillEnvoyRejectedConfig", "OverspillModelRejectedByEnvoy"} <= firing, firing
        assert not firing & {"OverspillControlPlaneDown", "OverspillNoEnvoyConnected", "OverspillOutage"}
