"""Envoy's own load reports end to end: a real Envoy (bootstrap from `overspill bootstrap`) reports
the traffic sent through it, and `envoy:` metrics drive offloading without any Prometheus query."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import pytest
from e2e_stack import SWITCH_BUDGET, Model, Stack, open_loop, stack

pytestmark = pytest.mark.e2e


def envoy_metric(name: str, value: float, target: str = "Value") -> dict:
    key = "value" if target == "Value" else "averageValue"
    return {
        "type": "External",
        "external": {"metric": {"name": name}, "target": {"type": target, key: str(value)}},
    }


async def load_of(s: Stack, model: Model) -> dict:
    return (await s.control_plane.status())["load"]["models"].get(f"{model.namespace}/{model.name}", {})


async def test_envoy_reports_the_requests_in_flight_and_the_rate_sent_through_it(tmp_path):
    """20 requests a second, each held 0.5 s by the backend: 10 in flight, 20 a second, and the
    ORCA value the pods return. Closing the Envoy's stream takes its report away."""
    model = Model(
        "llm",
        metrics=[
            envoy_metric("envoy:requests_in_flight", 1000),
            envoy_metric("envoy:request_rate", 1000),
            envoy_metric("envoy:orca:num_requests_waiting", 1000),
        ],
    )
    model.local.service_time = 0.5
    model.local.orca = {"num_requests_waiting": 3, "kv_cache_usage_perc": 0.25}
    async with stack(tmp_path, model) as s:
        traffic = asyncio.create_task(open_loop(s, model, rate=20, seconds=6))
        await asyncio.sleep(2.5)  # two reports of steady traffic
        exported = await s.control_plane.metrics_text()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "overspill", "status", "--url", s.control_plane.metrics_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        printed, _ = await asyncio.wait_for(proc.communicate(), 30)
        samples = []
        while not traffic.done():
            local = (await load_of(s, model)).get("local", {})
            metrics = {m["name"]: m["value"] for m in (await s.model_status(model))["metrics"]}
            samples.append((local.get("requests_in_flight"), local.get("request_rate"), metrics))
            await asyncio.sleep(0.5)
        codes = await traffic
        assert codes == [200] * 120
        assert model.local.counts.total == 120 and model.remote.counts.total == 0
        in_flight = statistics.median(x for x, _, _ in samples)
        rate = statistics.median(r for _, r, _ in samples)
        assert 7 <= in_flight <= 13, samples
        assert 15 <= rate <= 25, samples
        # The offloading metrics read the same sums (local + remote, the remote idle here).
        read = statistics.median(m["External/envoy:requests_in_flight"] for _, _, m in samples)
        assert 7 <= read <= 13, samples
        assert statistics.median(m["External/envoy:request_rate"] for _, _, m in samples) == pytest.approx(
            rate, rel=0.3
        )
        assert {m["External/envoy:orca:num_requests_waiting"] for _, _, m in samples[1:]} == {3.0}
        assert (await load_of(s, model))["local"]["orca"] == {
            "kv_cache_usage_perc": 0.25,
            "num_requests_waiting": 3.0,
        }
        # ... and so do the control plane's own metrics.
        [line] = [
            x
            for x in exported.splitlines()
            if x.startswith("overspill_envoy_requests_in_flight{")
            and 'name="llm"' in x
            and 'side="local"' in x
        ]
        assert 7 <= float(line.split()[-1]) <= 13, line
        assert "overspill_envoy_load_reporters 1.0" in exported
        # ... and `overspill status`.
        [row] = [
            x.split()
            for x in printed.decode().splitlines()
            if x.startswith("default/llm ") and " local " in x
        ]
        assert 7 <= int(row[2]) <= 13 and 15 <= float(row[3]) <= 25, row
        assert "ENVOY LOAD REPORTS (1 Envoys)" in printed.decode()
        # Every request was asked for its ORCA load on its way to the pods.
        assert model.local.counts.header_values("endpoint-load-metrics-format") == {"TEXT": 120}
        # The only Envoy goes away: its report goes with it, and the metric says why it has no value.
        await s.envoy.close()
        deadline = time.monotonic() + 10
        while (await s.control_plane.status())["load"]["reporting_envoys"]:
            assert time.monotonic() < deadline, "the closed stream still counts"
            await asyncio.sleep(0.1)
        assert await load_of(s, model) == {}
        await asyncio.sleep(1.5)  # an evaluation
        [first, *_] = (await s.model_status(model))["metrics"]
        assert first["value"] is None and "no Envoy is sending load reports" in first["error"]


async def test_requests_in_flight_over_target_offload_and_the_remote_gets_its_share(tmp_path):
    """The demand (local + remote in flight) crosses 6: half goes remote, counted at the backends,
    and it stays so, since spilling over does not lower the demand measured. When the burst ends,
    it comes back after the buffer."""
    model = Model(
        "burst", percentage=50, buffer_seconds=2, metrics=[envoy_metric("envoy:requests_in_flight", 6)]
    )
    model.local.service_time = model.remote.service_time = 0.4
    async with stack(tmp_path, model) as s:
        codes = await open_loop(s, model, rate=5, seconds=3)  # about 2 in flight
        assert (await s.model_status(model))["phase"] == "Standby"
        assert model.remote.counts.total == 0
        burst = asyncio.create_task(open_loop(s, model, rate=30, seconds=12))  # about 12 in flight
        switched = await s.wait_phase(model, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)  # Envoy has the weight
        local, remote = model.local.counts.total, model.remote.counts.total
        phases = set()
        while not burst.done():
            phases.add((await s.model_status(model))["phase"])
            await asyncio.sleep(0.2)
        codes += await burst
        share = (model.remote.counts.total - remote) / (
            model.remote.counts.total - remote + model.local.counts.total - local
        )
        assert phases == {"Offloading"}, phases
        assert 0.38 <= share <= 0.62, share
        await s.wait_phase(model, {"Standby"}, timeout=2 + 3 * SWITCH_BUDGET)
        await asyncio.sleep(0.5)
        remote = model.remote.counts.total
        codes += await open_loop(s, model, rate=5, seconds=2)
        assert model.remote.counts.total == remote  # all local again
        assert codes == [200] * len(codes)
        print(f"offloading {switched:.1f}s after the burst began; remote share {share:.2f}")
