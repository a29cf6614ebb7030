"""`make bench-kube`: Overspill in Kubernetes mode, as real processes, against the API server double.

Four measurements (bench/README.md, "Kubernetes mode"):

1. decision latency: 2 replicas with `--leader-elect`; M simulated Envoys on the follower; a model's
   pod metrics flip over and under its 90 % cpu target K times: metric change -> the leader's
   status write -> the last follower-connected Envoy holding the new weight;
2. failover: the leader SIGKILLed while the metric flips: kill -> the Lease changes hands -> the new
   leader's first status write with the new decision -> the Envoys on it serving that weight;
3. xDS fan-out: N models, M Envoys on 1 replica, then split over 2; CPU of each replica process
   (utime + stime from /proc) per weight change, against the same windows without a change;
4. watch of N ModelDeployments (+ a Service and an EndpointSlice each): `serve --kubernetes` from
   process start to /readyz 200, its RSS then, and what it does in the seconds after.

The API double (`overspill.testing.kubeapi.FakeApiServer`) runs on a thread of this process;
each replica is `python -m overspill serve --kubernetes` (`ControlPlaneProcess`); the simulated
Envoys are `bench.xds_bench`'s fleet processes (SimEnvoy, sotw). Everything stays on 127.0.0.1.
Times are `time.monotonic()`, one clock for every process on Linux: the fleets stamp the moment a
node has read the response carrying the new value; status writes are stamped as this process
reads them on a watch of the API double.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from api.crd import parse_time
from bench.xds_bench import Child, percentile
from overspill.demo.procs import ControlPlaneProcess
from overspill.testing.kubeapi import FakeApiServer

ROOT = Path(__file__).resolve().parent.parent
CRDS = [ROOT / "manifests/crds/modeldeployments.yaml", ROOT / "manifests/crds/policies.yaml"]
MODEL_API = "deployment.beamlit.com/v1alpha1"
MODELS_PATH = f"/apis/{MODEL_API}/modeldeployments"
LEASES_PATH = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
LEASE = "overspill-leader"
FLIP_NS, FLIP = "default", "bench-flip"  # the one model whose metric flips
RUNTIME_KEY = f"overspill.{FLIP_NS}.{FLIP}"
PERCENT = 50.0  # behavior.percentage of the flipping model
CPU = {True: "480m", False: "100m"}  # of a 500m request: 96 % (over the 90 % target) and 20 %
NAMESPACES = 8
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(text: str) -> None:
    print(text, flush=True)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def summary(values: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank, so p99 of 20 is the maximum) in ms, and how many."""
    finite = [v for v in values if math.isfinite(v)]
    return {
        "p50_ms": ms(percentile(finite, 50)),
        "p99_ms": ms(percentile(finite, 99)),
        "n": len(finite),
        "missed": len(values) - len(finite),
    }


# --- the objects in the API double ----------------------------------------------------------------


def model_objects(i: int, flip: bool = False) -> list[dict]:
    """A ModelDeployment with its Service and EndpointSlice (one ready pod). The flipping model also
    gets a Deployment, a Pod with a 500m cpu request and a cpu Utilization metric (target 90 %);
    the others have an offloadingConfig without metrics (only an outage would offload them), so
    the leader reads the metrics APIs for one model only."""
    ns, name = (FLIP_NS, FLIP) if flip else (f"team-{i % NAMESPACES}", f"model-{i:05d}")
    hi, lo = (i >> 8) & 255, i & 255
    offloading: dict[str, Any] = {"behavior": {"percentage": PERCENT, "bufferDurationSeconds": 0}}
    spec: dict[str, Any] = {"model": name, "serviceRef": {"name": name, "targetPort": 8000}}
    if flip:
        offloading["metrics"] = [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 90}},
            }
        ]
        spec["modelSourceRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    spec["offloadingConfig"] = offloading
    objects = [
        {"apiVersion": MODEL_API, "kind": "ModelDeployment", "metadata": {"name": name, "namespace": ns},
         "spec": spec},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
         "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8000}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-abcde", "namespace": ns,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [f"10.{hi}.{lo}.1"], "conditions": {"ready": True}}],
         "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]},
    ]  # fmt: skip
    if flip:
        labels = {"app": name}
        objects += [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
             "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                      "template": {"metadata": {"labels": labels},
                                   "spec": {"containers": [{"name": "model", "image": "m:1"}]}}}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{name}-1", "namespace": ns, "labels": labels},
             "spec": {"containers": [{"name": "model", "image": "m:1",
                                      "resources": {"requests": {"cpu": "500m"}}}]},
             "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
        ]  # fmt: skip
    return objects


def set_cpu(api: FakeApiServer, over: bool) -> None:
    api.set_pod_metrics(FLIP_NS, f"{FLIP}-1", {"model": {"cpu": CPU[over], "memory": "1Gi"}})


async def populate(api: FakeApiServer, models: int, flip: bool = True, batch: int = 3000) -> float:
    """`models` models (the first one the flipping model when `flip`), created straight into the
    double's store (no HTTP), a batch at a time; returns the seconds it took."""
    t0 = time.monotonic()
    todo = [o for i in range(models) for o in model_objects(i, flip=flip and i == 0)]
    for start in range(0, len(todo), batch):
        for obj in todo[start : start + batch]:
            api.create(obj)
        await asyncio.sleep(0)
    if flip:
        set_cpu(api, False)
    return time.monotonic() - t0


# --- processes ------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads, living and dead), in seconds (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, float]:
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return {"rss_mib": found["VmRSS"], "peak_rss_mib": found["VmHWM"]}


class Remote:
    """The standby copy as the replicas' probe sees it: a TCP port that accepts (and closes)."""

    async def __aenter__(self) -> Remote:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


class Cluster:
    """The API double, a remote that accepts, and the replicas started against them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, name: str):
        self.args, self.name = args, name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stack = contextlib.AsyncExitStack()
        self.replicas: dict[str, ControlPlaneProcess] = {}
        self.serial = 0

    async def __aenter__(self) -> Cluster:
        await self.stack.__aenter__()
        self.api = await self.stack.enter_async_context(FakeApiServer(crds=CRDS, bookmark_interval=1.0))
        self.remote = await self.stack.enter_async_context(Remote())
        self.kubeconfig = self.api.kubeconfig(self.dir / "kubeconfig")
        self.session = await self.stack.enter_async_context(aiohttp.ClientSession())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for replica in self.replicas.values():  # a stuck replica is killed, not waited for
            if replica.proc is not None and replica.proc.returncode is None:
                replica.proc.send_signal(signal.SIGTERM)
        await self.stack.__aexit__(None, None, None)

    async def start(
        self, leader_elect: bool, evaluation_interval: float, ready_timeout: float = 120.0
    ) -> tuple[str, ControlPlaneProcess, float]:
        """One more replica (`replica-<serial>`): started, then waited for until /readyz says 200.
        Returns its identity, the harness and the seconds from spawn to ready."""
        identity = f"replica-{self.serial}"
        self.serial += 1
        extra = ["--kubernetes", "--kubeconfig", str(self.kubeconfig)]
        extra += ["--default-remote", f"http://127.0.0.1:{self.remote.port}"]
        if leader_elect:
            extra += ["--leader-elect", "--lease-namespace", "default", "--identity", identity]
            extra += ["--lease-seconds", f"{self.args.lease_seconds:g}"]
        plane = ControlPlaneProcess(
            None, evaluation_interval=evaluation_interval, extra_args=extra, log_dir=self.dir / identity
        )
        t0 = time.monotonic()
        await self.stack.enter_async_context(plane)
        self.replicas[identity] = plane
        await self.wait_ready(plane, ready_timeout)
        return identity, plane, time.monotonic() - t0

    async def wait_ready(self, plane: ControlPlaneProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            plane.check_alive("before /readyz")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.get(
                    f"{plane.metrics_url}/readyz", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{plane.name} not ready within {timeout:g} s")
            await asyncio.sleep(0.05)

    def holder(self) -> str:
        lease = self.api.get("leases", LEASE) or {}
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout:g} s: {what}")
            await asyncio.sleep(0.05)

    async def fleet(self, plane: ControlPlaneProcess, count: int, models: int, prefix: str) -> Child:
        """`count` SimEnvoys (bench.xds_bench's fleet role, sotw) on one replica's xDS port; the
        fleet's stderr goes to a file beside the replicas' logs (`fleet_error` reads it)."""
        parallel = max(1, min(100, (128 << 20) // (1300 * models)))
        argv = ["--role", "fleet", "--target", f"127.0.0.1:{plane.xds_port}", "--protocol", "sotw"]
        argv += ["--count", str(count), "--models", str(models), "--prefix", prefix]
        argv += ["--parallel", str(parallel)]
        with open_log(self.dir / f"{prefix}.log") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.xds_bench",
                *argv,
                cwd=ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                limit=1 << 24,
                start_new_session=True,  # as `Child.spawn`: the coordinator decides when it ends
            )
        child = Child(proc, prefix)
        Child.running.append(child)
        return child

    def fleet_error(self, fleet: Child) -> str:
        """The last line a fleet wrote to stderr (why it exited), or ""."""
        path = self.dir / f"{fleet.name}.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return lines[-1] if lines else ""


def open_log(path: Path) -> BinaryIO:
    return open(path, "wb")


class Watcher:
    """A watch on the API double from this process (as a replica's watch sees it): every event is
    stamped on arrival; the events of the objects `keep` selects are kept."""

    def __init__(self, cluster: Cluster, path: str, keep: Callable[[dict], bool] = lambda o: True):
        self.cluster, self.path, self.keep = cluster, path, keep
        self.events: list[tuple[float, str, dict]] = []
        self.count = 0  # every event, kept or not
        self.with_status: set[tuple[str, str]] = set()  # objects seen with a status phase
        self.last_at = time.monotonic()
        self.changed = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> Watcher:
        rv = self.cluster.api.resource_version
        self.task = asyncio.create_task(self._run(rv))
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self, rv: int) -> None:
        url = f"{self.cluster.api.url}{self.path}"
        params = {"watch": "true", "resourceVersion": str(rv), "timeoutSeconds": "3600"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.cluster.session.get(url, params=params, timeout=timeout) as resp:
            resp.raise_for_status()
            while line := await resp.content.readline():
                at = time.monotonic()
                event = json.loads(line)
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                self.count += 1
                self.last_at = at
                if (obj.get("status") or {}).get("phase"):
                    self.with_status.add((meta.get("namespace", ""), meta.get("name", "")))
                if self.keep(obj):
                    self.events.append((at, event.get("type", ""), obj))
                self.changed.set()

    def mark(self) -> int:
        return len(self.events)

    async def wait(self, predicate: Callable[[dict], bool], since: int, timeout: float) -> tuple[float, dict]:
        """The first kept event at index >= `since` whose object satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        index = since
        while True:
            while index < len(self.events):
                at, _, obj = self.events[index]
                if predicate(obj):
                    return at, obj
                index += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching event on {self.path} within {timeout:g} s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def is_flip(obj: dict) -> bool:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace"), meta.get("name")) == (FLIP_NS, FLIP)


def decided(over: bool) -> Callable[[dict], bool]:
    """The flipping model's status says the decision for `over`: Offloading at 50 %, or Standby."""
    phase, percent = ("Offloading", PERCENT) if over else ("Standby", 0.0)

    def check(obj: dict) -> bool:
        status = obj.get("status") or {}
        return status.get("phase") == phase and float(status.get("remotePercent") or 0) == percent

    return check


def held_by(identity: str) -> Callable[[dict], bool]:
    return lambda lease: (lease.get("spec") or {}).get("holderIdentity") == identity


def phase_of(api: FakeApiServer) -> str | None:
    return ((api.get("modeldeployments", FLIP, namespace=FLIP_NS) or {}).get("status") or {}).get("phase")


def to_monotonic(rfc3339: str | None) -> float:
    """A wall-clock timestamp the control plane wrote, on this process's monotonic clock."""
    wall = parse_time(rfc3339)
    return math.nan if wall is None else wall - (time.time() - time.monotonic())


async def expect(fleets: list[Child], over: bool, timeout: float) -> list[float]:
    """Ask every fleet when its nodes got the flipping model's new weight; all their times."""
    for fleet in fleets:
        fleet.send(
            {"cmd": "expect", "key": RUNTIME_KEY, "value": PERCENT if over else 0.0, "timeout": timeout}
        )
    replies = await asyncio.gather(*(f.recv(timeout + 30) for f in fleets))
    return [t for r in replies for t in r["times"]]


async def synced(fleets: list[Child], timeout: float) -> float | None:
    """Seconds until every fleet's nodes hold everything; None if one failed or took longer."""
    t0 = time.monotonic()
    try:
        for fleet in fleets:
            await fleet.recv(max(0.1, t0 + timeout - time.monotonic()))
    except (TimeoutError, RuntimeError):
        return None
    return time.monotonic() - t0


# --- 1 and 2: decision latency, and failover ------------------------------------------------------


async def latency_and_failover(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    n, m = args.latency_models, args.envoys
    tag = "[1 decision→served]"
    async with Cluster(args, workdir, "latency") as c:
        created = await populate(c.api, n)
        _, r0, up0 = await c.start(True, args.evaluation_interval)
        await c.until(lambda: c.holder() == "replica-0", 15, "replica-0 holds the lease")
        follower_id, r1, up1 = await c.start(True, args.evaluation_interval)
        await c.until(lambda: phase_of(c.api) == "Standby", 30, "the leader's first status")
        models = Watcher(c, MODELS_PATH, keep=is_flip).start()
        leases = Watcher(c, LEASES_PATH).start()
        fleet = await c.fleet(r1, m, n, "latency")
        sync_s = await synced([fleet], args.sync_timeout)
        if sync_s is None:
            raise RuntimeError(f"{m} SimEnvoys not synced on the follower within {args.sync_timeout:g} s")
        planes = [(i, p) for i, p in c.replicas.items()]
        idle = await idle_probe(c, planes, models, args.probe)
        say(
            f"{tag} {n} models created in {created:.2f} s; replicas ready in {up0:.1f} / {up1:.1f} s; "
            f"{m} SimEnvoys on the follower synced in {sync_s:.1f} s; with nothing changing: "
            f"{idle['status_writes_per_s']:.0f} status writes/s, CPU "
            + ", ".join(f"{i} {v:.0%}" for i, v in idle["cpu_share"].items())
            + f"; {args.flips} flips ..."
        )
        rng = random.Random(1)
        rows = []
        over = True
        try:
            for _ in range(args.flips):
                mark = models.mark()
                t0 = time.monotonic()
                set_cpu(c.api, over)
                for_fleet = asyncio.create_task(expect([fleet], over, 15))
                t_status, obj = await models.wait(decided(over), mark, 15)
                t_decision = to_monotonic((obj.get("status") or {}).get("lastTransitionTime"))
                times = await for_fleet
                t_served = max(times) if len(times) == m else math.inf
                rows.append(
                    {
                        "over": over,
                        "metric_to_decision": t_decision - t0,
                        "metric_to_status": t_status - t0,
                        "metric_to_served": t_served - t0,
                        "decision_to_served": t_served - t_decision,
                        "status_to_served": t_served - t_status,
                        "received": len(times),
                    }
                )
                over = not over
                await asyncio.sleep(rng.uniform(0.2, 0.2 + args.evaluation_interval))
            s1 = {
                key: summary([r[key] for r in rows])
                for key in (
                    "metric_to_decision",
                    "metric_to_status",
                    "metric_to_served",
                    "decision_to_served",
                    "status_to_served",
                )
            }
            results["latency"] = {
                "models": n,
                "envoys": m,
                "flips": len(rows),
                "evaluation_interval_s": args.evaluation_interval,
                "idle": idle,
                "summary": s1,
                "rows": rows,
            }
            say(
                f"{tag} metric→status p50 {s1['metric_to_status']['p50_ms']:.0f} / "
                f"p99 {s1['metric_to_status']['p99_ms']:.0f} ms; metric→all {m} serving "
                f"p50 {s1['metric_to_served']['p50_ms']:.0f} / "
                f"p99 {s1['metric_to_served']['p99_ms']:.0f} ms; "
                f"status→served p50 {s1['status_to_served']['p50_ms']:.0f} / "
                f"p99 {s1['status_to_served']['p99_ms']:.0f} ms"
            )
            await fleet.close()
            await failover(args, c, models, leases, results, over)
        finally:
            await models.stop()
            await leases.stop()
            for child in list(Child.running):
                await child.close()


async def failover(
    args: argparse.Namespace, c: Cluster, models: Watcher, leases: Watcher, results: dict, over: bool
) -> None:
    """Kill the leader (SIGKILL) and flip the metric at once: how long until the Lease moves, the new
    leader writes the new decision, and the Envoys on it (they were on the follower) serve it."""
    tag = "[2 failover]"
    m, n, lease = args.envoys, args.latency_models, args.lease_seconds
    rows = []
    for f in range(args.failovers):
        leader_id = c.holder()
        follower_id = next(i for i, p in c.replicas.items() if i != leader_id and p.proc.returncode is None)
        leader, follower = c.replicas[leader_id], c.replicas[follower_id]
        fleet = await c.fleet(follower, m, n, f"failover-{f}")
        if await synced([fleet], args.sync_timeout) is None:
            raise RuntimeError(f"{m} SimEnvoys not synced on {follower_id} within {args.sync_timeout:g} s")
        await asyncio.sleep(random.Random(f).uniform(0, lease / 5))  # any point of the renewal period
        mark, lease_mark, writes0 = models.mark(), leases.mark(), models.count
        t_kill = time.monotonic()
        leader.kill()
        await leader.proc.wait()
        set_cpu(c.api, over)
        for_fleet = asyncio.create_task(expect([fleet], over, lease + 20))
        t_lease, _ = await leases.wait(held_by(follower_id), lease_mark, lease + 10)
        t_status, obj = await models.wait(decided(over), mark, lease + 15)
        firsts = [(t, o) for t, _, o in models.events[mark:] if t >= t_lease]
        first_metric = ((firsts[0][1].get("status") or {}).get("metric")) if firsts else None
        times = await for_fleet
        t_served = max(times) if len(times) == m else math.inf
        await asyncio.sleep(1.0)
        row = {
            "kill_to_lease": t_lease - t_kill,
            "kill_to_status": t_status - t_kill,
            "kill_to_served": t_served - t_kill,
            "lease_to_status": t_status - t_lease,
            "status_writes_of_flip_model": len(firsts),
            "first_status_metric_after_takeover": first_metric,
            "model_events_during": models.count - writes0,
            "received": len(times),
        }
        rows.append(row)
        say(
            f"{tag} {f + 1}/{args.failovers}: {leader_id} killed; {follower_id} held the lease after "
            f"{row['kill_to_lease']:.2f} s, wrote the new decision after {row['kill_to_status']:.2f} s, "
            f"its {m} Envoys served it after {row['kill_to_served']:.2f} s (lease {lease:g} s; "
            f"first status it wrote said metric={first_metric!r})"
        )
        over = not over
        await fleet.close()
        await leader.close()
        del c.replicas[leader_id]
        if f + 1 < args.failovers:
            await c.start(True, args.evaluation_interval)
    bound = lease + 2.0
    results["failover"] = {
        "lease_seconds": lease,
        "renew_every_s": max(0.5, lease / 5),
        "evaluation_interval_s": args.evaluation_interval,
        "bound_s": bound,
        "kill_to_lease_max_s": max(r["kill_to_lease"] for r in rows),
        "kill_to_status_max_s": max(r["kill_to_status"] for r in rows),
        "kill_to_served_max_s": max(r["kill_to_served"] for r in rows),
        "within_bound": all(r["kill_to_status"] <= bound for r in rows),
        "rows": rows,
    }


# --- 3: fan-out over 1 and 2 replicas ------------------------------------------------------------


async def fanout(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    n, m = args.fanout_models, args.fanout_envoys
    out: dict[str, Any] = {"models": n, "envoys": m, "window_s": args.window, "configs": {}}
    results["fanout"] = out
    for count in (1, 2):
        tag = f"[3 fan-out, {count} replica{'s' if count > 1 else ''}]"
        async with Cluster(args, workdir, f"fanout-{count}") as c:
            out["configs"][str(count)] = await fanout_config(args, c, count, tag)
    one = out["configs"]["1"].get("per_replica", {}).get("leader")
    two = out["configs"]["2"].get("per_replica", {})
    if one and two:
        out["ratio"] = {
            r: v["net_ms"] / one["net_ms"] if one["net_ms"] > 0 else math.nan for r, v in two.items()
        }
        out["ratio_gross"] = {
            r: v["gross_ms"] / one["gross_ms"] if one["gross_ms"] > 0 else math.nan for r, v in two.items()
        }


async def fanout_config(args: argparse.Namespace, c: Cluster, count: int, tag: str) -> dict:
    """N models, `count` replicas, M SimEnvoys split over them; CPU per weight change per replica."""
    n, m = args.fanout_models, args.fanout_envoys
    created = await populate(c.api, n)
    models = Watcher(c, MODELS_PATH, keep=is_flip).start()
    cfg: dict[str, Any] = {"replicas": count}
    try:
        t0 = time.monotonic()
        planes: list[tuple[str, ControlPlaneProcess]] = []
        for i in range(count):
            identity, plane, _ = await c.start(True, args.evaluation_interval)
            planes.append((identity, plane))
            if i == 0:
                await c.until(lambda: c.holder() == "replica-0", 15, "replica-0 holds the lease")
        await c.until(lambda: len(models.with_status) >= n, args.timeout, f"a status on all {n} models")
        cfg["statuses_written_s"] = time.monotonic() - t0
        cfg["quiet"] = await settle(models, quiet=2.0, timeout=args.settle)
        cfg["idle"] = idle = await idle_probe(c, planes, models, args.probe)
        say(
            f"{tag} {n} models created in {created:.2f} s; a status on all {n} "
            f"{cfg['statuses_written_s']:.1f} s after the first replica started; then, with nothing "
            f"changing: {idle['status_writes_per_s']:.0f} status writes/s, CPU "
            + ", ".join(f"{i} {v:.0%}" for i, v in idle["cpu_share"].items())
        )
        fleets = []
        for p in range(2):
            _, plane = planes[p % count]
            fleets.append(await c.fleet(plane, m // 2 + (p < m % 2), n, f"fan-{count}-{p}"))
        cfg["fleet_sync_s"] = sync_s = await synced(fleets, args.sync_timeout)
        if sync_s is None:
            opened = {i: p.log_text().count("event=stream_opened") for i, p in planes}
            errors = sorted({e for f in fleets if (e := c.fleet_error(f))})
            cfg["failed"] = (
                f"{m} SimEnvoys not synced within {args.sync_timeout:g} s; streams opened {opened}"
                + (f"; a fleet ended with {'; '.join(errors)}" if errors else "")
            )
            say(f"{tag} {cfg['failed']}: no CPU per change measured")
            await asyncio.gather(*(f.close() for f in fleets))
            return cfg
        mem = {i: proc_mem(p.pid) for i, p in planes}
        say(
            f"{tag} {m} SimEnvoys synced in {sync_s:.1f} s; RSS "
            + ", ".join(f"{i} {v['rss_mib']:.0f} MiB" for i, v in mem.items())
        )
        pids = {i: p.pid for i, p in planes}
        rng = random.Random(3)
        idle_windows, events_idle = [], []
        for _ in range(args.idle_windows):
            before, count0 = {i: proc_cpu(pid) for i, pid in pids.items()}, models.count
            await asyncio.sleep(args.window)
            idle_windows.append({i: proc_cpu(pid) - before[i] for i, pid in pids.items()})
            events_idle.append(models.count - count0)
            await asyncio.sleep(rng.uniform(0, args.evaluation_interval))
        rows, over = [], phase_of(c.api) != "Offloading"
        for _ in range(args.fanout_flips):
            before = {i: proc_cpu(pid) for i, pid in pids.items()}
            mark, count0 = models.mark(), models.count
            t0 = time.monotonic()
            set_cpu(c.api, over)
            for_fleets = asyncio.create_task(expect(fleets, over, 30))
            await asyncio.sleep(max(0.0, t0 + args.window - time.monotonic()))
            cpu = {i: proc_cpu(pid) - before[i] for i, pid in pids.items()}
            events = models.count - count0
            times = await for_fleets
            t_status, _ = await models.wait(decided(over), mark, 30)
            t_served = max(times) if len(times) == m else math.inf
            rows.append(
                {
                    "cpu_s": cpu,
                    "metric_to_served": t_served - t0,
                    "status_to_served": t_served - t_status,
                    "received": len(times),
                    "late": t_served - t0 > args.window,
                    "model_events": events,
                }
            )
            over = not over
            await asyncio.sleep(rng.uniform(0, args.evaluation_interval))
        await asyncio.gather(*(f.close() for f in fleets))
    finally:
        await models.stop()
    ids = [i for i, _ in planes]
    roles = {ids[0]: "leader", **({ids[1]: "follower"} if count > 1 else {})}
    per = {}
    for i in ids:
        gross = statistics.median(r["cpu_s"][i] for r in rows)
        base = statistics.median(w[i] for w in idle_windows) if idle_windows else 0.0
        per[roles[i]] = {
            "gross_ms": ms(gross),
            "idle_ms": ms(base),
            "net_ms": ms(gross - base),
            "gross_p99_ms": ms(percentile([r["cpu_s"][i] for r in rows], 99)),
            "rss_mib": mem[i]["rss_mib"],
        }
    cfg.update(
        per_replica=per,
        latency=summary([r["metric_to_served"] for r in rows]),
        status_to_served=summary([r["status_to_served"] for r in rows]),
        late_windows=sum(r["late"] for r in rows),
        status_writes_per_idle_window=statistics.median(events_idle) if events_idle else 0,
        rows=rows,
        idle_windows=idle_windows,
    )
    say(
        f"{tag} CPU per change (window {args.window:g} s, median of {len(rows)}; minus the median of "
        f"{len(idle_windows)} windows without one): "
        + "; ".join(
            f"{role} {v['gross_ms']:.0f} - {v['idle_ms']:.0f} = {v['net_ms']:.0f} ms"
            for role, v in per.items()
        )
        + f"; metric→all {m}: p50 {cfg['latency']['p50_ms']:.0f} ms, p99 {cfg['latency']['p99_ms']:.0f} ms"
        + (f" ({cfg['late_windows']} changes not served within the window)" if cfg["late_windows"] else "")
    )
    return cfg


async def idle_probe(
    c: Cluster, planes: list[tuple[str, ControlPlaneProcess]], models: Watcher, seconds: float
) -> dict:
    """With nothing changing: each replica's CPU share, and status writes per second."""
    cpu0, events0, t0 = {i: proc_cpu(p.pid) for i, p in planes}, models.count, time.monotonic()
    await asyncio.sleep(seconds)
    span = time.monotonic() - t0
    return {
        "seconds": span,
        "cpu_share": {i: (proc_cpu(p.pid) - cpu0[i]) / span for i, p in planes},
        "status_writes_per_s": (models.count - events0) / span,
    }


async def settle(watcher: Watcher, quiet: float, timeout: float) -> bool:
    """Wait until no event has come for `quiet` seconds; False if it never got quiet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if time.monotonic() - watcher.last_at >= quiet:
            return True
        await asyncio.sleep(0.1)
    return False


# --- 4: watch of N ModelDeployments ---------------------------------------------------------------


async def watch_scale(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    results["watch"] = rows = []
    for n in args.watch_models:
        tag = f"[4 watch N={n:,}]"
        async with Cluster(args, workdir, f"watch-{n}") as c:
            created = await populate(c.api, n, flip=False)
            say(
                f"{tag} {n:,} ModelDeployments + Services + EndpointSlices created in the double "
                f"in {created:.1f} s"
            )
            double0 = time.process_time()  # this process is mostly the double meanwhile
            t0 = time.monotonic()
            row: dict[str, Any] = {"models": n, "create_s": created}
            try:
                _, plane, ready_s = await c.start(False, args.watch_evaluation_interval, args.ready_timeout)
            except TimeoutError:
                plane = next(iter(c.replicas.values()))
                row.update(ready_s=math.inf, cp_cpu_to_ready_s=proc_cpu(plane.pid), **proc_mem(plane.pid))
                plane.kill()
                say(f"{tag} NOT ready within {args.ready_timeout:g} s")
                rows.append(row)
                continue
            row.update(
                ready_s=ready_s,
                cp_cpu_to_ready_s=proc_cpu(plane.pid),
                double_cpu_to_ready_s=time.process_time() - double0,
                **{f"ready_{k}": v for k, v in proc_mem(plane.pid).items()},
            )
            say(
                f"{tag} start → /readyz 200 in {ready_s:.1f} s "
                f"(control plane CPU {row['cp_cpu_to_ready_s']:.1f} s, "
                f"API double {row['double_cpu_to_ready_s']:.1f} s); RSS {row['ready_rss_mib']:.0f} MiB, "
                f"peak {row['ready_peak_rss_mib']:.0f} MiB"
            )
            cpu0, rv0, t1 = proc_cpu(plane.pid), c.api.resource_version, time.monotonic()
            await asyncio.sleep(args.after_ready)
            span = time.monotonic() - t1
            with_status = sum(
                1 for o in c.api.list("modeldeployments") if (o.get("status") or {}).get("phase")
            )
            row.update(
                after_s=span,
                after_cpu_share=(proc_cpu(plane.pid) - cpu0) / span,
                after_api_writes_per_s=(c.api.resource_version - rv0) / span,
                after_with_status=with_status,
                **{f"after_{k}": v for k, v in proc_mem(plane.pid).items()},
                since_start_s=time.monotonic() - t0,
            )
            plane.kill()  # a busy process would take its 5 s SIGTERM grace
            rows.append(row)
            say(
                f"{tag} the {span:.0f} s after ready: CPU {row['after_cpu_share']:.0%} of a core, "
                f"{row['after_api_writes_per_s']:.0f} API writes/s, statuses written {with_status:,}/{n:,}; "
                f"RSS {row['after_rss_mib']:.0f} MiB, peak {row['after_peak_rss_mib']:.0f} MiB"
            )


# --- the run --------------------------------------------------------------------------------------


def machine() -> dict:
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "reconciler", "xds", "overspill", "metrics", "api"],
        capture_output=True,
        text=True,
    ).stdout
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit.strip() + (" (modified)" if dirty.strip() else ""),
        "load_average_at_start": os.getloadavg(),
    }


def table(results: dict) -> str:
    """One row per figure: what was measured and its value."""

    def f(v: Any, fmt: str = ".0f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def idle(probe: dict) -> str:
        shares = ", ".join(f"{i} {v:.0%}" for i, v in probe["cpu_share"].items())
        return f"{probe['status_writes_per_s']:.0f} status writes/s; CPU {shares}"

    lines = ["| # | figure | value |", "|---|---|---|"]
    if lat := results.get("latency"):
        s = lat["summary"]
        lines.append(
            f"| 1 | setting | {lat['models']} models, {lat['envoys']} SimEnvoys on the follower, "
            f"evaluation every {lat['evaluation_interval_s']:g} s, {lat['flips']} flips |"
        )
        lines.append(f"| 1 | with nothing changing | {idle(lat['idle'])} |")
        for key, label in (
            ("metric_to_decision", "metric → decision (the leader's lastTransitionTime)"),
            ("metric_to_status", "metric → status written (seen on a watch of the double)"),
            ("metric_to_served", "metric → the last follower Envoy serving the weight"),
            ("decision_to_served", "decision → the last follower Envoy serving the weight"),
            ("status_to_served", "status written → the last follower Envoy serving the weight"),
        ):
            missed = f" ({s[key]['missed']} missed)" if s[key]["missed"] else ""
            lines.append(
                f"| 1 | {label} | p50 {f(s[key]['p50_ms'])} ms, p99 {f(s[key]['p99_ms'])} ms{missed} |"
            )
    if fo := results.get("failover"):
        rows = fo["rows"]

        def span(key: str) -> str:
            values = [r[key] for r in rows]
            return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"

        lines += [
            f"| 2 | kill → Lease taken (lease {fo['lease_seconds']:g} s, renewed every "
            f"{fo['renew_every_s']:g} s; {len(rows)} failovers) | {span('kill_to_lease')} |",
            f"| 2 | kill → the new leader's status write with the new decision | {span('kill_to_status')} |",
            f"| 2 | kill → its Envoys serving that weight | {span('kill_to_served')} |",
            f"| 2 | kill → decision within lease + 2 s = {fo['bound_s']:g} s | "
            f"{'yes' if fo['within_bound'] else 'NO'} |",
        ]
    if fan := results.get("fanout"):
        where = f"{fan['models']:,} models, {fan['envoys']:,} SimEnvoys"
        for count, cfg in sorted(fan.get("configs", {}).items()):
            if "idle" in cfg:
                lines.append(
                    f"| 3 | {count} replica(s), {where}: with nothing changing | {idle(cfg['idle'])} |"
                )
            if "failed" in cfg:
                lines.append(f"| 3 | {count} replica(s): FAILED | {cfg['failed']} |")
                continue
            for role, v in cfg["per_replica"].items():
                lines.append(
                    f"| 3 | {count} replica(s), {role}: CPU per change | {f(v['net_ms'])} ms "
                    f"({f(v['gross_ms'])} in the window - {f(v['idle_ms'])} without a change) |"
                )
            lat = cfg["latency"]
            lines.append(
                f"| 3 | {count} replica(s): metric → all {fan['envoys']:,} serving | "
                f"p50 {f(lat['p50_ms'])} ms, "
                f"p99 {f(lat['p99_ms'])} ms |"
            )
        for role, ratio in (fan.get("ratio") or {}).items():
            gross = fan["ratio_gross"][role]
            lines.append(
                f"| 3 | CPU per change: 2-replica {role} / 1 replica | {f(ratio, '.2f')} "
                f"({f(gross, '.2f')} before subtracting idle) |"
            )
    for row in results.get("watch") or []:
        n = f"{row['models']:,}"
        lines.append(f"| 4 | N={n}: created in the double | {row['create_s']:.1f} s |")
        lines.append(
            f"| 4 | N={n}: start → /readyz 200 | {f(row['ready_s'], '.1f')} s (CPU: control plane "
            f"{f(row.get('cp_cpu_to_ready_s'), '.1f')} s, "
            f"double {f(row.get('double_cpu_to_ready_s'), '.1f')} s) |"
        )
        if "ready_rss_mib" in row:
            lines.append(
                f"| 4 | N={n}: RSS at ready (peak) | {row['ready_rss_mib']:.0f} MiB "
                f"({row['ready_peak_rss_mib']:.0f} MiB) |"
            )
        if "after_s" in row:
            lines.append(
                f"| 4 | N={n}: the {row['after_s']:.0f} s after ready | CPU {row['after_cpu_share']:.0%}, "
                f"{row['after_api_writes_per_s']:.0f} API writes/s, "
                f"statuses on {row['after_with_status']:,}; "
                f"RSS {row['after_rss_mib']:.0f} MiB ({row['after_peak_rss_mib']:.0f} MiB) |"
            )
    for name, error in (results.get("errors") or {}).items():
        lines.append(f"| {name} | FAILED | {error} |")
    return "\n".join(lines)


def write(path: str, results: dict) -> None:
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


async def run(args: argparse.Namespace) -> dict:
    results: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(args).items()}}
    say(
        f"scenarios {','.join(map(str, args.scenarios))}; lease {args.lease_seconds:g} s, evaluation "
        f"{args.evaluation_interval:g} s; {results['machine']['cpus']} cores"
    )
    with tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp:
        workdir = Path(args.logs) if args.logs else Path(tmp)
        took = results["seconds"] = {}
        for wanted, name, scenario in (
            ({1, 2}, "1+2", latency_and_failover),
            ({3}, "3", fanout),
            ({4}, "4", watch_scale),
        ):
            if wanted & set(args.scenarios):
                t0 = time.monotonic()
                try:
                    await scenario(args, workdir, results)
                except Exception as exc:  # noqa: BLE001 - reported; the other scenarios still run
                    results.setdefault("errors", {})[name] = repr(exc)
                    say(f"[{name}] FAILED: {exc!r}")
                    await asyncio.gather(*(child.close() for child in list(Child.running)))
                took[name] = time.monotonic() - t0
                write(args.out, results)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x.replace("_", "").replace(",", "")) for x in text.split(":") if x]

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every scenario (< 1 min)")
    ap.add_argument("--scenarios", type=ints, default=[1, 2, 3, 4], help="which, colon-separated (1:2:3:4)")
    ap.add_argument("--lease-seconds", type=float, default=3.0)
    ap.add_argument("--evaluation-interval", type=float, default=0.5, help="of the replicas in 1-3")
    ap.add_argument("--envoys", type=int, default=20, help="M SimEnvoys in 1 and 2")
    ap.add_argument("--latency-models", type=int, default=100, help="models in 1 and 2 (one flips)")
    ap.add_argument("--flips", type=int, default=20, help="K metric flips in 1")
    ap.add_argument("--failovers", type=int, default=3, help="leader kills in 2")
    ap.add_argument("--fanout-models", type=int, default=1000, help="N in 3")
    ap.add_argument("--fanout-envoys", type=int, default=1000, help="M in 3, split over the replicas")
    ap.add_argument("--fanout-flips", type=int, default=20, help="K weight changes per configuration in 3")
    ap.add_argument("--idle-windows", type=int, default=10, help="windows without a change in 3")
    ap.add_argument("--window", type=float, default=1.5, help="seconds of CPU counted per change in 3")
    ap.add_argument(
        "--watch-models", "--models", type=ints, default=[1000], help="N values in 4 (1000:10000)"
    )
    ap.add_argument("--full", action="store_true", help="4 with N=10,000 too (6 to 7 more minutes)")
    ap.add_argument("--watch-evaluation-interval", type=float, default=5.0, help="the replica's in 4")
    ap.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /readyz in 4")
    ap.add_argument("--after-ready", type=float, default=10.0, help="seconds watched after /readyz in 4")
    ap.add_argument("--sync-timeout", type=float, default=90, help="seconds SimEnvoys may take to sync")
    ap.add_argument("--settle", type=float, default=20, help="seconds to wait for status writes to stop in 3")
    ap.add_argument("--probe", type=float, default=5.0, help="seconds of idle CPU and status writes measured")
    ap.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    ap.add_argument("--logs", help="keep the replicas' logs under this directory")
    ap.add_argument("--out", default=str(ROOT / "bench" / "kube_results.json"))
    args = ap.parse_args(argv)
    if args.full and 10_000 not in args.watch_models:
        args.watch_models = [*args.watch_models, 10_000]
    if args.quick:
        args.envoys, args.latency_models, args.flips, args.failovers = 5, 10, 4, 1
        args.fanout_models, args.fanout_envoys, args.fanout_flips = 50, 10, 3
        args.idle_windows, args.window, args.watch_models, args.after_ready = 2, 1.0, [200], 2.0
        args.probe, args.settle = 1.5, 3.0
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        results = asyncio.run(run(args))
    except KeyboardInterrupt:
        say("interrupted")
        sys.exit(130)
    finally:
        Child.kill_all()
    say(f"\n{table(results)}\n")
    took = ", ".join(f"{k}: {v:.0f} s" for k, v in results.get("seconds", {}).items())
    say(f"results in {args.out}; {time.monotonic() - started:.0f} s in all ({took})")


if __name__ == "__main__":
    main()
