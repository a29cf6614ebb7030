"""End to end: real Envoy, real Prometheus, the real control plane; requests counted at the backends."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yaml
from e2e_stack import (
    EVALUATION_INTERVAL,
    SWITCH_BUDGET,
    Model,
    bootstrap_file,
    delta,
    rejected_by_envoy,
    stack,
    totals,
    wait_until,
)

from overspill.demo.procs import ControlPlaneProcess, Envoy
from xds.resources import NOT_SERVED

pytestmark = pytest.mark.e2e


async def test_split_matches_percentage_at_the_backends(tmp_path):
    m = Model("llm", percentage=30)
    async with stack(tmp_path, m) as s:
        codes = await s.send(m, 200)
        assert codes.count(200) == 200
        assert m.remote.counts.total == 0, "no offloading while the metric is under its target"

        s.knob.set("llm", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)  # the route update is in Envoy
        before = totals(m)
        codes = await s.send(m, 1500)
        local, remote = delta(m, before)
        assert codes.count(200) == 1500
        share = 100 * remote / (local + remote)
        print(f"split: {remote}/{local + remote} to the remote = {share:.1f}% (want 30 ± 5)")
        assert 25 <= share <= 35

        # The remote side got the path prefix, its own Host and the configured header.
        seen = m.remote.counts.recent[-1]
        assert seen.path == "/standby/v1/predict"
        assert seen.host == m.remote.address
        assert seen.headers.get("x-offloaded-by") == "overspill"
        assert "x-offloaded-by" not in m.local.counts.recent[-1].headers
        assert m.local.counts.recent[-1].path == "/v1/predict"

        # `overspill bootstrap`'s Envoy takes the weight over RTDS and is not flagged.
        assert "overspill.default.llm" in await s.envoy.admin_get("/runtime")
        assert "overspill_xds_streams_without_weight_layers{" not in await s.control_plane.metrics_text()
        (node,) = (await s.control_plane.status())["nodes"]
        assert node["weightLayers"] is True and node["warnings"] == [], node


async def test_offload_switches_on_in_time_holds_for_buffer_and_releases(tmp_path):
    m = Model("bert", percentage=50, buffer_seconds=4)
    async with stack(tmp_path, m) as s:
        first_remote: list[float] = []
        codes: list[int] = []
        stop = asyncio.Event()

        async def trickle() -> None:
            # Steady traffic the whole time: switches must lose nothing.
            while not stop.is_set():
                before = m.remote.counts.total
                codes.append((await s.request(m.host))[0])
                if m.remote.counts.total > before and not first_remote:
                    first_remote.append(time.monotonic())
                await asyncio.sleep(0.01)

        load = asyncio.create_task(trickle())
        try:
            await asyncio.sleep(1.5)
            assert m.remote.counts.total == 0

            crossed = time.monotonic()
            s.knob.set("bert", 50)
            await wait_until(lambda: bool(first_remote), SWITCH_BUDGET + 3, "the first offloaded request")
            on_after = first_remote[0] - crossed
            print(f"offload on {on_after:.2f}s after the metric crossed (budget {SWITCH_BUDGET:.1f}s)")
            assert on_after <= SWITCH_BUDGET

            released = time.monotonic()
            s.knob.set("bert", 1)
            # Through the buffer duration it stays on (counted from when the reading drops).
            await asyncio.sleep(m.buffer_seconds - 0.5)
            phase = (await s.model_status(m))["phase"]
            assert phase in ("Offloading", "Releasing"), phase
            before = totals(m)
            await asyncio.sleep(0.3)
            assert delta(m, before)[1] > 0, "still offloading during the buffer"

            await s.wait_phase(m, {"Standby"}, timeout=SWITCH_BUDGET + 2)
            off_after = time.monotonic() - released
            print(f"offload off {off_after:.2f}s after the metric dropped (buffer {m.buffer_seconds}s)")
            assert m.buffer_seconds <= off_after <= m.buffer_seconds + SWITCH_BUDGET
            await asyncio.sleep(0.5)
            before = totals(m)
            await asyncio.sleep(1.0)
            local, remote = delta(m, before)
            assert remote == 0 and local > 0, "all local again after release"
            # At 0 % the model has no runtime key: the route's default (0) applies.
            assert "overspill.default.bert" not in await s.envoy.admin_get("/runtime")
        finally:
            stop.set()
            await load
        assert codes and all(c == 200 for c in codes), f"requests lost during switches: {set(codes)}"
        print(f"{len(codes)} requests across on/off switches, all 200")


async def test_outage_sends_everything_to_the_remote(tmp_path):
    m = Model("whisper", percentage=20)
    async with stack(tmp_path, m) as s:
        m.ready = False
        m.write(s.manifests)
        await s.wait_phase(m, {"Outage"}, timeout=2)
        await asyncio.sleep(0.5)
        before = totals(m)
        codes = await s.send(m, 200)
        assert codes.count(200) == 200
        assert delta(m, before) == (0, 200)

        m.ready = True
        m.write(s.manifests)
        await s.wait_phase(m, {"Standby"}, timeout=2)
        await asyncio.sleep(0.5)
        before = totals(m)
        await s.send(m, 100)
        assert delta(m, before) == (100, 0)


async def test_invalid_files_leave_other_models_serving(tmp_path):
    good, edited = Model("good"), Model("edited")
    async with stack(tmp_path, good, edited) as s:
        (s.manifests / "broken.yaml").write_text("apiVersion: v1\nkind: [unclosed\n")
        bad = Model("bad", percentage=150)
        bad.local.port = bad.remote.port = 1
        bad.write(s.manifests)
        # A valid model turned invalid keeps serving its last valid version.
        text = (s.manifests / "edited.yaml").read_text().replace("percentage: 50", "percentage: 250")
        (s.manifests / "edited.yaml").write_text(text)
        await asyncio.sleep(1.0)

        status = await s.control_plane.status()
        errors = [e for r in status["rejected"] for e in r["errors"]]
        assert any(
            "default/bad: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150" in e
            for e in errors
        ), errors
        assert any("broken.yaml: malformed YAML" in e for e in errors), errors
        assert "default/bad" not in status["models"]
        assert any("got 250" in e for e in status["models"]["default/edited"]["errors"])

        for model in (good, edited):
            codes = await s.send(model, 50)
            assert codes.count(200) == 50, model.name
        metrics = await s.control_plane.metrics_text()
        assert 'overspill_invalid_objects{origin="' in metrics
        invalid = [
            line
            for line in metrics.splitlines()
            if line.startswith("overspill_invalid_objects{") and not line.endswith(" 0.0")
        ]
        assert len(invalid) == 3, invalid

        code, body = await s.request("nobody.default.svc.cluster.local")
        assert code == 404 and "no ModelDeployment" in body


async def test_metric_source_outage_keeps_the_last_decision(tmp_path):
    m = Model("t5", buffer_seconds=2)
    async with stack(tmp_path, m) as s:
        s.knob.set("t5", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await s.prometheus.close()  # the metric source goes away mid-offload
        await asyncio.sleep(3 * EVALUATION_INTERVAL + m.buffer_seconds)
        st = await s.model_status(m)
        assert st["phase"] == "Offloading", st
        assert st["metrics"][0]["error"] and "prometheus unreachable" in st["metrics"][0]["error"]
        metrics = await s.control_plane.metrics_text()
        errors = [
            line for line in metrics.splitlines() if line.startswith("overspill_metric_read_errors_total{")
        ]
        assert errors and float(errors[0].split()[-1]) >= 2
        before = totals(m)
        codes = await s.send(m, 200)
        assert codes.count(200) == 200
        local, remote = delta(m, before)
        assert 60 <= remote <= 140, (local, remote)
        assert "event=metric_unavailable" in s.control_plane.log_text()


async def test_envoy_nack_is_reported_and_other_models_keep_serving(tmp_path):
    good = Model("good")
    async with stack(tmp_path, good) as s:
        # Valid to the control plane, refused by Envoy: the CA file does not exist on the Envoy host.
        bad, docs = rejected_by_envoy(good)
        (s.manifests / "tls.yaml").write_text(yaml.safe_dump_all(docs))
        deadline = time.monotonic() + 10
        nack = None
        while time.monotonic() < deadline and not nack:
            nodes = (await s.control_plane.status())["nodes"]
            nack = next((t["nack"] for n in nodes for t in n["types"].values() if t["nack"]), None)
            await asyncio.sleep(0.1)
        assert nack and "/nonexistent/ca.pem" in nack, nack
        codes = await s.send(good, 50)
        assert codes.count(200) == 50

        # Held, not resent: other changes go on, the rejected version is never sent again.
        s.knob.set("good", 50)
        await s.wait_phase(good, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(1.0)
        metrics = await s.control_plane.metrics_text()
        assert 'overspill_xds_nacks_total{type="CDS"} 1.0' in metrics
        assert 'overspill_model_xds_nacks_total{name="tls",namespace="default",type="CDS"} 1.0' in metrics
        assert 'overspill_model_xds_rejections{name="tls",namespace="default"} 1.0' in metrics  # it stands
        assert 'overspill_model_xds_rejections{name="good",namespace="default"} 0.0' in metrics
        assert (
            "event=nack" in s.control_plane.log_text() and "models=default/tls" in s.control_plane.log_text()
        )
        # Tied to the model that produced it, on its status and in `overspill status`.
        errors = (await s.model_status(bad))["errors"]
        assert any("rejected CDS" in e and "/nonexistent/ca.pem" in e for e in errors), errors
        printed = await s.overspill_status()
        assert "default/good" in printed and "Offloading" in printed
        assert "NACK CDS" in printed and "models: default/tls" in printed, printed

        # The next different version goes out normally and is taken.
        docs[-1]["spec"]["offloadingConfig"]["remoteBackend"] = {"host": "standby.invalid", "scheme": "http"}
        (s.manifests / "tls.yaml").write_text(yaml.safe_dump_all(docs))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and nack:
            nodes = (await s.control_plane.status())["nodes"]
            nack = next((t["nack"] for n in nodes for t in n["types"].values() if t["nack"]), None)
            await asyncio.sleep(0.1)
        assert nack is None
        assert "overspill/default/tls/remote" in await s.envoy.admin_get("/clusters")
        rejections = 'overspill_model_xds_rejections{name="tls",namespace="default"} 0.0'
        assert rejections in await s.control_plane.metrics_text()  # taken back


@pytest.mark.parametrize("delta_xds", [False, True], ids=["sotw", "delta"])
async def test_an_envoy_of_an_empty_directory_goes_live_at_once_and_routes_the_first_model(
    tmp_path, delta_xds
):
    """A fresh install, before any ModelDeployment: Envoy is sent its whole configuration (no
    model, every weight layer empty) and goes live in about a second, not after its 15 s
    initial fetch timeout; its listener says no model serves the Host, and the first model
    written routes through it."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    model = Model("first")
    for server in (model.local, model.remote):
        await server.start()
    try:
        async with (
            ControlPlaneProcess(manifests, extra_args=("--listener-address", "127.0.0.1")) as cp,
            aiohttp.ClientSession() as session,
        ):
            envoy = Envoy(cp.xds_port, bootstrap=bootstrap_file(tmp_path, delta_xds))
            envoy.startup_timeout = 10.0  # LIVE or fail: 15 s would be the initial fetch timeout
            started = time.monotonic()
            async with envoy:
                live = time.monotonic() - started
                await envoy.wait_listener(cp.listener_port, timeout=10)
                url = f"http://127.0.0.1:{cp.listener_port}/v1/predict"
                async with session.post(url, headers={"Host": model.host}, data=b"{}") as resp:
                    assert (resp.status, await resp.text()) == (404, NOT_SERVED)
                model.write(manifests)

                async def routed() -> bool:
                    async with session.post(url, headers={"Host": model.host}, data=b"{}") as resp:
                        return resp.status == 200

                deadline = time.monotonic() + 10
                while not await routed():
                    assert time.monotonic() < deadline, "the first model never routed"
                    await asyncio.sleep(0.1)
    finally:
        for server in (model.local, model.remote):
            await server.stop()
    print(f"\nempty directory, {'delta' if delta_xds else 'sotw'}: Envoy LIVE after {live:.2f} s")
    assert live < 5
    assert model.local.counts.total > 0
