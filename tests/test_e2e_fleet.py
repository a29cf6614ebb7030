"""End to end, xDS for a fleet: real Envoys over SotW and Delta, churn under load, weights over
RTDS, node scoping. Every response is counted at the client and at the backends."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import aiohttp
import pytest
from e2e_stack import SWITCH_BUDGET, Model, Stack, bootstrap_file, stack

from overspill.demo.procs import Envoy, free_port
from overspill.demo.sim import ModelServer

pytestmark = pytest.mark.e2e
PROTOCOLS = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
CYCLES = 50


def pushes(metrics: str) -> dict[str, float]:
    return {
        m[1]: float(m[2]) for m in re.finditer(r'overspill_xds_pushes_total\{type="(\w+)"\} (\S+)', metrics)
    }


async def routed(envoy: Envoy, model: Model, present: bool = True, timeout: float = 10) -> None:
    """Until the Envoy's routes do (or no longer) name the model's virtual host."""
    vhost = f'"{model.namespace}/{model.name}"'
    deadline = time.monotonic() + timeout
    while (vhost in await envoy.admin_get("/config_dump?resource=dynamic_route_configs")) != present:
        if time.monotonic() > deadline:
            raise AssertionError(f"{model.name}: route {'never arrived' if present else 'never left'}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def steady_load(s: Stack, model: Model, workers: int = 4):
    """Requests to `model` without pause for as long as the block runs; yields their status codes."""
    codes: list[int | str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:
                codes.append((await s.request(model.host))[0])
            except Exception as exc:  # a reset or timeout is a lost request too
                codes.append(type(exc).__name__)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        yield codes
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_fifty_cycles_of_adding_changing_and_deleting_models_lose_no_request(tmp_path, delta):
    stable = Model("stable", percentage=50)
    spare_local = ModelServer("stable-local-2", None, 0.0, "stable")
    spare_remote = ModelServer("stable-remote-2", None, 0.0, "stable-remote")
    await spare_local.start()
    await spare_remote.start()
    extra: list[ModelServer] = [spare_local, spare_remote]
    try:
        async with stack(tmp_path, stable, delta=delta) as s:
            s.knob.set("stable", 50)  # offloading on: both clusters carry traffic while they change
            await s.wait_phase(stable, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
            new_codes: list[int] = []
            async with steady_load(s, stable) as codes:
                previous: Model | None = None
                for i in range(CYCLES):
                    # Add a model and use it as soon as the Envoy has its route.
                    added = Model(f"churn-{i}")
                    for server in (added.local, added.remote):
                        await server.start()
                        extra.append(server)
                    added.write(s.manifests)
                    await routed(s.envoy, added)
                    new_codes += await s.send(added, 20, concurrency=4)
                    # Change the loaded model: endpoints, remote cluster, or weight, in turn.
                    if i % 3 == 0:
                        stable.local, spare_local = spare_local, stable.local
                    elif i % 3 == 1:
                        stable.remote, spare_remote = spare_remote, stable.remote
                    else:
                        stable.percentage = 30 if stable.percentage == 50 else 50
                    stable.write(s.manifests)
                    # Delete the model added in the cycle before.
                    if previous is not None:
                        (s.manifests / f"{previous.name}.yaml").unlink()
                        await routed(s.envoy, previous, present=False)
                    previous = added
                    await asyncio.sleep(0.1)
            non_2xx = [c for c in codes + new_codes if c != 200]
            print(
                f"{'delta' if delta else 'sotw'}: {CYCLES} cycles, {len(codes)} requests to the loaded model,"
                " "
                f"{len(new_codes)} to new models, non-2xx: {len(non_2xx)}"
            )
            assert len(codes) > 500 and len(new_codes) == 20 * CYCLES
            assert non_2xx == [], f"lost requests: {sorted(set(map(str, non_2xx)))} x{len(non_2xx)}"
            # Every backend the loaded model used took traffic: the changes really happened.
            assert spare_local.counts.total > 0 and spare_remote.counts.total > 0
            status = await s.control_plane.status()
            assert all(t["nack"] is None for n in status["nodes"] for t in n["types"].values())
    finally:
        for server in extra:
            await server.stop()


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_weight_change_is_one_runtime_push_and_no_route_or_cluster(tmp_path, delta):
    m = Model("gpt", percentage=40)
    async with stack(tmp_path, m, delta=delta) as s:
        await asyncio.sleep(1.0)
        before = pushes(await s.control_plane.metrics_text())
        s.knob.set("gpt", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        # The phase is the control plane's; Envoy holds the weight once its RTDS push lands.
        for _ in range(30):
            runtime = await s.envoy.admin_get("/runtime")
            if '"overspill.default.gpt"' in runtime and '"40"' in runtime.replace(" ", ""):
                break
            await asyncio.sleep(0.1)
        assert '"overspill.default.gpt"' in runtime and '"40"' in runtime.replace(" ", ""), runtime[:500]
        await asyncio.sleep(0.5)
        after = pushes(await s.control_plane.metrics_text())
        sent = {t: after.get(t, 0) - before.get(t, 0) for t in ("CDS", "EDS", "LDS", "RDS", "RTDS")}
        print(f"pushes for one weight change ({'delta' if delta else 'sotw'}): {sent}")
        assert sent == {"CDS": 0, "EDS": 0, "LDS": 0, "RDS": 0, "RTDS": 1}
        local, remote = m.local.counts.total, m.remote.counts.total
        await s.send(m, 1000)
        share = 100 * (m.remote.counts.total - remote) / 1000
        assert 35 <= share <= 45, share
        assert m.local.counts.total - local + m.remote.counts.total - remote == 1000


async def test_a_node_scoped_to_a_namespace_routes_only_its_models(tmp_path):
    mine, theirs = Model("mine", namespace="team-a"), Model("theirs", namespace="team-b")
    async with stack(tmp_path, mine, theirs) as s:
        port = free_port()
        scoped = bootstrap_file(tmp_path, delta=True, namespaces=["team-a"], listener_port=port)
        async with Envoy(s.control_plane.xds_port, node_id="sidecar-team-a", bootstrap=scoped) as sidecar:
            await sidecar.wait_listener(port, timeout=30)
            await routed(sidecar, mine)
            clusters = await sidecar.admin_get("/clusters")
            assert "overspill/team-a/mine/local" in clusters and "team-b" not in clusters
            assert "team-b/theirs" not in await sidecar.admin_get(
                "/config_dump?resource=dynamic_route_configs"
            )
            async with aiohttp.ClientSession() as session:
                for model, want in ((mine, 200), (theirs, 404)):
                    async with session.get(
                        f"http://127.0.0.1:{port}/v1/predict", headers={"Host": model.host}
                    ) as r:
                        assert r.status == want, model.name
            # The gateway still routes both.
            for model in (mine, theirs):
                assert (await s.send(model, 10)).count(200) == 10

            def sidecar_node(status: dict) -> dict:
                return next(n for n in status["nodes"] if n["id"] == "sidecar-team-a")

            before = sidecar_node(await s.control_plane.status())
            assert before["scope"] == f"namespaces=team-a listenerPort={port}"
            # A change outside its scope sends the sidecar nothing.
            s.knob.set("theirs", 50)
            await s.wait_phase(theirs, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
            await asyncio.sleep(0.5)
            assert sidecar_node(await s.control_plane.status())["types"] == before["types"]
            # One inside its scope does.
            s.knob.set("mine", 50)
            await s.wait_phase(mine, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
            await asyncio.sleep(0.5)
            assert sidecar_node(await s.control_plane.status())["types"]["RTDS"] != before["types"]["RTDS"]


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_every_service_name_reaches_its_model_and_other_hosts_get_a_404_that_says_so(tmp_path, delta):
    """Envoy picks a model's routes by the Host without its port (a routing scope per name). A
    Host no model serves, or a model's name with another port, gets the 404 with its reason."""
    gpt = Model("gpt", percentage=0)
    async with stack(tmp_path, gpt, delta=delta) as s:
        names = ("gpt", "gpt.default", "gpt.default.svc", "gpt.default.svc.cluster.local")
        for host in (h for n in names for h in (n, f"{n}:8080")):
            before = gpt.local.counts.total
            assert (await s.request(host))[0] == 200, host
            assert gpt.local.counts.total == before + 1, host
            assert gpt.local.counts.recent[-1].host == host  # the pods see the Host the client sent
        for host in ("nobody.default", "nobody.default.svc.cluster.local:8080", "gpt.default:9999"):
            assert await s.request(host) == (404, "overspill: no ModelDeployment serves this Host\n"), host

        # A model added while Envoy runs is answered by its own pods; deleted, its names get the 404.
        late = Model("late", percentage=0)
        await late.local.start()
        await late.remote.start()
        try:
            late.write(s.manifests)
            await routed(s.envoy, late)
            assert (await s.send(late, 20)).count(200) == 20
            assert late.local.counts.total == 20
            (s.manifests / "late.yaml").unlink()
            await routed(s.envoy, late, present=False)
            assert await s.request(late.host) == (404, "overspill: no ModelDeployment serves this Host\n")
            assert (await s.send(gpt, 20)).count(200) == 20
        finally:
            await late.local.stop()
            await late.remote.stop()
