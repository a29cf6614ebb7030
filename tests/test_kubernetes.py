"""Kubernetes mode end to end: real `kubectl`, the real `kubernetes` client inside `overspill serve
--kubernetes`, a real Envoy, and backends that count what reaches them.

No kube-apiserver can be had here, so the API server is `overspill.testing.kubeapi.FakeApiServer`,
a double that speaks the Kubernetes REST wire protocol (discovery, list/watch with bookmarks and 410, status
subresource, Table output, merge patch, Leases, the metrics APIs) and is tested on its own in
`test_kubeapi.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml
from e2e_stack import bootstrap_file, missing
from seeds import SEED_001_MODEL

from overspill.demo.procs import ComponentMissing, ControlPlaneProcess, Envoy
from overspill.demo.sim import ModelServer
from overspill.testing.kubeapi import FakeApiServer, find_kubectl

ROOT = Path(__file__).resolve().parent.parent
CRDS = [ROOT / "manifests/crds/modeldeployments.yaml", ROOT / "manifests/crds/policies.yaml"]
HOST = "my-model.default.svc.cluster.local:8080"

# Seed 001's example as written; `workload` adds the Service, EndpointSlice and Deployment it names.
SEED = SEED_001_MODEL


def workload(local_port: int, ready: bool = True) -> str:
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "my-model", "namespace": "default"},
                "spec": {"selector": {"app": "my-model"}, "ports": [{"name": "http", "port": 8080}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "my-model-abcde",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "my-model"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
                "ports": [{"name": "http", "port": local_port, "protocol": "TCP"}],
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "my-model", "namespace": "default"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "my-model"}},
                    "template": {
                        "metadata": {"labels": {"app": "my-model"}},
                        "spec": {"containers": [{"name": "model", "image": "my-model:1"}]},
                    },
                },
            },
        ]
    )


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "my-model-1", "namespace": "default", "labels": {"app": "my-model"}},
    "spec": {
        "containers": [{"name": "model", "image": "my-model:1", "resources": {"requests": {"cpu": "500m"}}}]
    },
    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
}


@dataclass
class KubeStack:
    api: FakeApiServer
    local: ModelServer
    remote: ModelServer
    planes: list[ControlPlaneProcess]
    envoy: Envoy
    session: aiohttp.ClientSession
    listener_port: int

    async def send(self, n: int, concurrency: int = 8) -> list[int]:
        codes: list[int] = []
        todo = iter(range(n))
        url = f"http://127.0.0.1:{self.listener_port}/v1/predict"

        async def worker() -> None:
            for _ in todo:
                async with self.session.post(url, headers={"Host": HOST}, data=b"{}") as resp:
                    await resp.read()
                    codes.append(resp.status)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return codes

    def cpu(self, millicores: int) -> None:
        self.api.set_pod_metrics(
            "default", "my-model-1", {"model": {"cpu": f"{millicores}m", "memory": "1Gi"}}
        )

    def md_status(self, name: str = "my-model") -> dict:
        return (self.api.get("modeldeployments", name) or {}).get("status") or {}

    async def until(self, predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not within {timeout}s: {what}; status {self.md_status()}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    async def runtime_weight(self) -> float | None:
        body = await self.envoy.admin_get("/runtime")
        import json

        entry = (json.loads(body).get("entries") or {}).get("overspill.default.my-model")
        return None if entry is None else float(entry.get("final_value"))


@contextlib.asynccontextmanager
async def kube_stack(
    tmp_path: Path, replicas: int = 1, lease_seconds: float = 3.0, envoy_to: int = 0
) -> AsyncIterator[KubeStack]:
    try:
        find_kubectl()
    except Exception as exc:  # noqa: BLE001 - reported as a missing component
        missing(ComponentMissing(str(exc)))
    async with contextlib.AsyncExitStack() as es:
        api = es.enter_context(FakeApiServer(crds=CRDS, bookmark_interval=0.5))
        local = await es.enter_async_context(ModelServer("local", None, 0.0, "my-model"))
        remote = await es.enter_async_context(ModelServer("remote", None, 0.0, "my-model-remote"))
        (tmp_path / "seed.yaml").write_text(SEED)
        (tmp_path / "workload.yaml").write_text(workload(local.port))
        await api.kubectl("apply", "-f", str(tmp_path / "seed.yaml"), "-f", str(tmp_path / "workload.yaml"))
        api.create(POD)
        api.set_pod_metrics("default", "my-model-1", {"model": {"cpu": "100m", "memory": "1Gi"}})
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        planes = []
        for i in range(replicas):
            args = [
                "--kubernetes",
                "--kubeconfig",
                str(kubeconfig),
                "--default-remote",
                f"http://{remote.address}",
            ]
            args += [
                "--xds-address",
                "127.0.0.1",
                "--listener-address",
                "127.0.0.1",
                "--metrics-address",
                "127.0.0.1",
            ]
            if replicas > 1:
                args += ["--leader-elect", "--lease-namespace", "default", "--identity", f"replica-{i}"]
                args += ["--lease-seconds", f"{lease_seconds:g}"]
            try:
                plane = await es.enter_async_context(
                    ControlPlaneProcess(
                        None, evaluation_interval=0.5, extra_args=args, log_dir=tmp_path / f"cp{i}"
                    )
                )
            except ComponentMissing as exc:
                missing(exc)
            planes.append(plane)
            if i == 0 and replicas > 1:
                await asyncio.sleep(0.5)  # replica-0 takes the lease first
        listener_port = planes[0].listener_port
        try:
            envoy = await es.enter_async_context(
                Envoy(
                    planes[envoy_to].xds_port, bootstrap=bootstrap_file(tmp_path), log_dir=tmp_path / "envoy"
                )
            )
        except ComponentMissing as exc:
            missing(exc)
        listener_port = planes[envoy_to].listener_port
        await envoy.wait_listener(listener_port, timeout=30)
        session = await es.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
        yield KubeStack(api, local, remote, planes, envoy, session, listener_port)
        for plane in planes:  # every control plane lived through the test, but those killed on purpose
            if plane.proc is not None and plane.proc.returncode not in (None, -9):
                plane.check_alive("during the test")


async def test_kubectl_apply_of_seed_001_offloads_and_kubectl_get_shows_it(tmp_path):
    async with asyncio.timeout(120), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby written on status")
        codes = await k.send(100)
        assert codes == [200] * 100
        assert (k.local.counts.total, k.remote.counts.total) == (100, 0)

        k.cpu(480)  # 96 % of the 500m request: over 90
        waited = await k.until(lambda: k.md_status().get("phase") == "Offloading", 15, "Offloading")
        await asyncio.sleep(1.0)  # the weight reaches Envoy over RTDS
        before = k.remote.counts.total
        codes = await k.send(400)
        assert set(codes) == {200}
        share = (k.remote.counts.total - before) / 400
        assert 0.40 <= share <= 0.60, share
        status = k.md_status()
        assert status["remotePercent"] == 50 and status["offloadingStatus"] is True
        assert status["metric"] == "96/90"
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Offloading"]["status"] == "True"
        assert conditions["MetricsAvailable"]["status"] == "True"
        assert conditions["Ready"]["observedGeneration"] == 1

        _, table, _ = await k.api.kubectl("get", "md")
        header, row = table.splitlines()[:2]
        assert header.split() == ["NAME", "PHASE", "REMOTE%", "METRIC", "READY", "AGE"]
        assert row.split()[:5] == ["my-model", "Offloading", "50", "96/90", "1"]
        _, described, _ = await k.api.kubectl("describe", "md", "my-model")
        assert "OffloadingStarted" in described
        # The metrics API reads were timed, and the weight's way to Envoy too.
        text = await k.planes[0].metrics_text()
        reads = re.search(
            r'^overspill_metric_read_duration_seconds_count\{source="kubernetes"\} (\S+)$', text, re.M
        )
        assert reads is not None and float(reads[1]) >= 1, text
        acks = re.search(r"^overspill_weight_decision_to_ack_seconds_count (\S+)$", text, re.M)
        assert acks is not None and float(acks[1]) >= 1
        print(f"\noffloading on {waited:.1f}s after the metric crossed; remote share {share:.0%}")


async def test_bad_metric_input_shows_on_status_and_keeps_routing(tmp_path):
    async with asyncio.timeout(90), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        k.api.delete_pod_metrics("default", "my-model-1")
        await k.until(
            lambda: (
                {c["type"]: c["status"] for c in k.md_status().get("conditions", [])}.get("MetricsAvailable")
                == "False"
            ),
            10,
            "MetricsAvailable=False",
        )
        assert set(await k.send(50)) == {200}


async def test_a_status_conflict_is_retried(tmp_path):
    async with asyncio.timeout(90), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        k.api.conflict_status_writes("modeldeployments", "my-model", times=2)
        k.cpu(480)
        await k.until(lambda: k.md_status().get("phase") == "Offloading", 15, "Offloading despite two 409s")
        conflicts = [c for c in k.api.calls if c.subresource == "status" and c.code == 409]
        assert len(conflicts) == 2


async def test_watch_resume_and_410_relist_lose_no_update(tmp_path):
    async with asyncio.timeout(90), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        # The watches end (as they do every few minutes): the next ones resume, and see this.
        k.api.drop_watches()
        k.api.patch(
            "endpointslices",
            "my-model-abcde",
            {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]},
        )
        await k.until(lambda: k.md_status().get("phase") == "Outage", 10, "Outage after a resumed watch")
        # History compacted and every watch cut: a watch from an old version gets 410 and lists again.
        k.api.compact()
        k.api.drop_watches(abrupt=True)
        k.api.patch(
            "endpointslices",
            "my-model-abcde",
            {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
        )
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby after a relist")
        assert set(await k.send(40)) == {200}


async def test_scaled_to_zero_sends_everything_remote_and_deleting_the_cr_removes_only_its_routes(tmp_path):
    async with asyncio.timeout(90), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        k.api.patch("endpointslices", "my-model-abcde", {"endpoints": []})
        await k.until(lambda: k.md_status().get("phase") == "Outage", 10, "Outage")
        await asyncio.sleep(1.0)
        before = k.remote.counts.total
        assert set(await k.send(60)) == {200}
        assert k.remote.counts.total - before == 60

        # A second model on the same Envoy; deleting the first removes only the first's routes.
        other = dict(yaml.safe_load(SEED))
        other["metadata"] = {"name": "other", "namespace": "default"}
        other["spec"] = dict(other["spec"], serviceRef={"name": "other", "targetPort": 8080})
        await k.api.kubectl("apply", "-f", "-", input=yaml.safe_dump(other))
        k.api.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "other", "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 8080}]},
            }
        )
        await k.until(lambda: k.md_status("other").get("phase") is not None, 10, "other has status")
        await k.api.kubectl("delete", "md", "my-model")
        await asyncio.sleep(1.5)
        async with k.session.post(f"http://127.0.0.1:{k.listener_port}/", headers={"Host": HOST}) as resp:
            assert resp.status == 404  # no model serves that Host any more
        dump = await k.envoy.admin_get("/clusters")
        assert "overspill/default/other/local" in dump and "overspill/default/my-model/" not in dump


async def test_killing_the_leader_hands_over_without_a_failed_request_or_a_weight_change(tmp_path):
    lease = 3.0
    async with asyncio.timeout(150), kube_stack(tmp_path, replicas=2, lease_seconds=lease, envoy_to=1) as k:
        leader, follower = k.planes
        await k.until(
            lambda: (
                (k.api.get("leases", "overspill-leader") or {}).get("spec", {}).get("holderIdentity")
                == "replica-0"
            ),
            15,
            "replica-0 leads",
        )
        k.cpu(480)
        await k.until(lambda: k.md_status().get("phase") == "Offloading", 15, "Offloading")
        await asyncio.sleep(1.5)  # the follower serves the leader's weight
        assert await k.runtime_weight() == 50

        load = asyncio.create_task(k.send(1500, concurrency=4))
        await asyncio.sleep(0.5)
        leader.kill()
        took = await k.until(
            lambda: (
                (k.api.get("leases", "overspill-leader") or {}).get("spec", {}).get("holderIdentity")
                == "replica-1"
            ),
            lease + 5,
            "replica-1 takes the lease",
        )
        weights = []
        for _ in range(10):
            weights.append(await k.runtime_weight())
            await asyncio.sleep(0.2)
        codes = await load
        assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        assert set(weights) == {50.0}
        assert k.md_status().get("phase") == "Offloading"
        assert (await follower.status())["leader"] == {"leading": True, "holder": "replica-1"}
        print(
            f"\nleader killed; replica-1 led {took:.1f}s later (lease {lease:g}s); "
            f"{len(codes)} requests, all 200"
        )


async def test_a_cr_the_api_accepts_but_overspill_cannot_use_gets_its_error_on_status(tmp_path):
    """`a:b:c` passes the CRD's host pattern but is no IP address or DNS name."""
    async with asyncio.timeout(90), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        bad = yaml.safe_load(SEED)
        bad["metadata"]["name"] = "bad-model"
        bad["spec"]["offloadingConfig"]["remoteBackend"] = {"host": "a:b:c"}
        await k.api.kubectl("apply", "-f", "-", input=yaml.safe_dump(bad))
        await k.until(lambda: k.md_status("bad-model").get("phase") == "Invalid", 10, "bad-model Invalid")
        (error,) = k.md_status("bad-model")["errors"]
        assert error.startswith(
            "default/bad-model: spec.offloadingConfig.remoteBackend.host: must be a DNS name"
        )
        assert set(await k.send(40)) == {200}  # the good model is untouched
        _, table, _ = await k.api.kubectl("get", "md", "bad-model")
        assert "Invalid" in table


async def test_a_steady_model_writes_no_status(tmp_path):
    async with asyncio.timeout(60), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("metric") == "20/90", 15, "the metric on status")
        await asyncio.sleep(1.0)

        def writes() -> int:
            return sum(1 for c in k.api.calls if c.subresource == "status" and c.name == "my-model")

        before = writes()
        await asyncio.sleep(3.0)  # six evaluations
        assert writes() == before


async def test_kill_9_of_the_only_replica_resumes_from_status_and_the_buffer_goes_on(tmp_path):
    """The restarted control plane reads each ModelDeployment's status (phase, triggeredAt,
    underSince...) before its first decision: a model releasing stays on through the rest of its
    buffer, counted from `underSince`, with no failed request and no weight change in Envoy."""
    buffer = 10.0
    async with asyncio.timeout(150), kube_stack(tmp_path) as k, contextlib.AsyncExitStack() as es:
        k.api.patch("modeldeployments", "my-model", {"spec": {"offloadingConfig": {"behavior": {
            "percentage": 50, "bufferDurationSeconds": buffer}}}})  # fmt: skip
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        k.cpu(480)
        await k.until(lambda: k.md_status().get("phase") == "Offloading", 15, "Offloading")
        k.cpu(100)
        await k.until(lambda: k.md_status().get("phase") == "Releasing", 15, "Releasing")
        under_since = datetime.datetime.fromisoformat(k.md_status()["underSince"].replace("Z", "+00:00"))
        for _ in range(50):  # the weight is in Envoy
            if await k.runtime_weight() == 50:
                break
            await asyncio.sleep(0.1)

        phases: list[tuple[float, str]] = []
        metrics: list[str] = []  # the metric column: a status written without readings shows "-"
        weights: list[tuple[float, float | None]] = []
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                status = k.md_status()
                phases.append((time.time(), status.get("phase")))
                metrics.append(status.get("metric"))
                weights.append((time.time(), await k.runtime_weight()))
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch())
        load = asyncio.create_task(k.send(3000, concurrency=4))
        await asyncio.sleep(2.0)
        old = k.planes[0]
        old.kill()
        assert old.proc is not None
        await asyncio.wait_for(old.proc.wait(), 10)
        await asyncio.sleep(1.0)
        new = await es.enter_async_context(old.successor(log_dir=tmp_path / "cp-restarted"))
        restarted = time.time()
        await k.until(
            lambda: k.md_status().get("phase") == "Standby", buffer + 10, "released after the buffer"
        )
        released = time.time()
        await asyncio.sleep(1.0)
        stop.set()
        await watcher
        codes = await load
        assert (await new.status())["nodes"], "Envoy reconnected to the restarted control plane"

    assert set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    seen = [p for t, p in phases if t < released - 0.5]
    assert set(seen) == {"Releasing"}, f"the status changed before the release: {sorted(set(seen))}"
    assert "-" not in metrics, "a status without readings was written"
    held = released - under_since.timestamp()
    print(
        f"\nbuffer {buffer:g}s; released {held:.1f}s after underSince, {released - restarted:.1f}s after "
        f"the restart; {len(codes)} requests, all 200"
    )
    assert buffer - 0.5 <= held <= buffer + 3.0  # from underSince, not from the restart
    assert {w for t, w in weights if t < released - 1.0} == {50.0}
    assert "event=offload_state_resumed count=1 names='default/my-model'" in new.log_text()
