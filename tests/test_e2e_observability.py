"""End to end: what an operator's Prometheus sees of a burst. A real Envoy's /stats/prometheus counts
each model's requests per side exactly as the backends did, the control plane's /metrics times the
decision to Envoy's ACK, and a real Prometheus scraping both (as the README's scrape config says)
joins decided and served shares the way the OverspillServedShareApart alert does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from e2e_stack import SWITCH_BUDGET, Model, Stack, missing, stack, totals

from overspill.demo.procs import ComponentMissing, Prometheus

pytestmark = pytest.mark.e2e
RULES = Path(__file__).resolve().parent.parent / "manifests" / "prometheus" / "overspill-rules.yaml"


class ScrapingPrometheus(Prometheus):
    """Prometheus scraping the control plane (job overspill) and Envoy's /stats/prometheus (job
    envoy), both with honor_labels, as in the README's scrape config."""

    def __init__(self, control_plane: str, envoy: str):
        super().__init__([control_plane], scrape_interval=1.0)
        self.envoy = envoy

    def _prepare(self, workdir: Path) -> list[str]:
        argv = super()._prepare(workdir)
        path = workdir / "prometheus.yml"
        config = yaml.safe_load(path.read_text())
        config["scrape_configs"][0]["honor_labels"] = True
        config["scrape_configs"].append(
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "honor_labels": True,
                "static_configs": [{"targets": [self.envoy]}],
            }
        )
        path.write_text(yaml.safe_dump(config))
        return argv


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> dict[tuple, float]:
    """Samples of `name` in a Prometheus text page, by their sorted label pairs: names exactly as
    Prometheus stores them (prometheus_client's parser would add `_total` to Envoy's counters)."""
    found = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and match[1] == name:
            found[tuple(sorted(LABEL.findall(match[2] or "")))] = float(match[3])
    return found


def one(text: str, name: str, **labels: str) -> float | None:
    """The sample of `name` with exactly `labels` (besides Envoy's cluster name tag)."""
    wanted = set(labels.items())
    found = [
        v
        for k, v in samples(text, name).items()
        if set(k) - {("envoy_cluster_name", dict(k).get("envoy_cluster_name"))} == wanted
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def envoy_counts(s: Stack, name: str, **labels: str) -> dict[str, float | None]:
    text = await s.envoy.admin_get("/stats/prometheus")
    return {side: one(text, name, namespace="default", model="llm", side=side, **labels) for side in SIDES}


SIDES = ("local", "remote")


async def runtime_weight(s: Stack) -> float | None:
    entry = (json.loads(await s.envoy.admin_get("/runtime")).get("entries") or {}).get(
        "overspill.default.llm"
    )
    return None if entry is None else float(entry["final_value"])


async def test_envoy_and_control_plane_numbers_as_prometheus_sees_them(tmp_path):
    m = Model("llm", percentage=30)
    async with stack(tmp_path, m) as s, contextlib.AsyncExitStack() as es:
        await s.send(m, 100)  # standby: all local
        s.knob.set("llm", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        deadline = time.monotonic() + 10
        while await runtime_weight(s) != 30:  # the phase is the control plane's; Envoy's comes a moment later
            assert time.monotonic() < deadline, await s.envoy.admin_get("/runtime")
            await asyncio.sleep(0.1)
        while m.remote.counts.total == 0:  # Envoy makes a cluster's stats at its first request
            await s.send(m, 10)
        try:
            prometheus = await es.enter_async_context(
                ScrapingPrometheus(
                    f"127.0.0.1:{s.control_plane.metrics_port}", f"127.0.0.1:{s.envoy.admin_port}"
                )
            )
        except ComponentMissing as exc:
            missing(exc)
        await prometheus.wait_for_series('envoy_cluster_upstream_rq_total{model="llm",side="remote"}')
        await prometheus.wait_for_series("overspill_model_remote_weight_percent")

        codes = await s.send(m, 900)
        assert codes.count(200) == 900
        local, remote = totals(m)

        # 1. Envoy's own numbers, labelled per model and side, equal what the backends counted.
        both = {"local": local, "remote": remote}
        assert await envoy_counts(s, "envoy_cluster_upstream_rq_total") == both
        assert await envoy_counts(s, "envoy_cluster_upstream_rq_xx", envoy_response_code_class="2") == both
        assert await envoy_counts(s, "envoy_cluster_upstream_rq_active") == {"local": 0, "remote": 0}
        deadline = time.monotonic() + 15  # histograms reach the admin page at Envoy's stats flush (5 s)
        while (found := await envoy_counts(s, "envoy_cluster_upstream_rq_time_count")) != both:
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.5)

        # 2. The control plane timed the decision to Envoy's ACK of the new weight (and the rest).
        text = await s.control_plane.metrics_text()
        taken = one(text, "overspill_weight_decision_to_ack_seconds_count")
        seconds = one(text, "overspill_weight_decision_to_ack_seconds_sum")
        assert taken is not None and taken >= 1 and seconds is not None
        assert 0 < seconds / taken < SWITCH_BUDGET, (seconds, taken)
        print(f"\ndecision -> Envoy ACK: {taken:.0f} sample(s), mean {1000 * seconds / taken:.1f} ms")
        assert (one(text, "overspill_xds_push_to_ack_seconds_count", type="RTDS") or 0) >= 1
        assert (one(text, "overspill_evaluation_duration_seconds_count") or 0) >= 1
        assert (one(text, "overspill_metric_read_duration_seconds_count", source="prometheus") or 0) >= 1
        assert one(text, "overspill_xds_connected_envoys", scope="all", protocol="sotw") == 1

        # 3. A real Prometheus scraping both joins decided and served shares as the alert does.
        await prometheus.wait_for_series(
            f'envoy_cluster_upstream_rq_total{{model="llm",side="remote"}} == {remote}'
        )
        await asyncio.sleep(1.5)  # and once more
        await served_share_as_the_alert_sees_it(prometheus)


async def served_share_as_the_alert_sees_it(prometheus: Prometheus) -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for name, alert in rules.items():  # every alert's expression runs on this Prometheus (none fires here)
        assert await prometheus.query(alert["expr"]) == [], name
    rule = rules["OverspillServedShareApart"]
    # The same expression with no threshold gives the model, named as the control plane names it,
    # about 0 points apart (the split is random per request).
    (apart,) = await prometheus.query(rule["expr"].replace(") > 20", ") > -1"))
    assert apart["metric"] == {"namespace": "default", "name": "llm"}
    assert float(apart["value"][1]) < 8, apart
    print(f"decided and served remote shares {float(apart['value'][1]):.1f} points apart")
