"""What the pipeline benchmark reads from a real Envoy, through its admin API and its listener.

Shared by both control planes under test (Overspill and sovereign): the Envoy process is
`overspill.demo.procs.Envoy` (the venv's binary, patched bootstrap, bounded start, always
stopped), with the moment of its spawn recorded so that times run from process start.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.pipeline_workload import ModelFile
from overspill.demo.procs import Envoy

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


class TimedEnvoy(Envoy):
    """The demo's Envoy harness, remembering when its process was spawned."""

    spawned_at = 0.0

    async def _spawn(self, argv: list[str]) -> None:
        self.spawned_at = time.monotonic()
        await super()._spawn(argv)


# --- /proc ---------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """The process and all its living descendants (a gunicorn master and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime (all threads; 10 ms ticks) summed over `pids`, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_mib(pids: Iterable[int]) -> float:
    """VmRSS summed over `pids` (shared pages counted once per process, as `ps` does)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


async def idle_cpu(pids: Callable[[], list[int]], seconds: float) -> float:
    """CPU-seconds per second used by `pids` over `seconds` of wall time with nothing changing."""
    before_pids = pids()
    c0, t0 = cpu_seconds(before_pids), time.monotonic()
    await asyncio.sleep(seconds)
    c1, t1 = cpu_seconds(before_pids), time.monotonic()
    return (c1 - c0) / (t1 - t0)


# --- Envoy, as seen from outside -----------------------------------------------------------------


@dataclass
class Convergence:
    """When each part of the full set was first seen in Envoy (seconds from Envoy's spawn)."""

    live_s: float | None = None
    clusters_s: float | None = None
    routes_s: float | None = None
    weights_s: float | None = None
    last: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return None not in (self.clusters_s, self.routes_s, self.weights_s)

    @property
    def converged_s(self) -> float | None:
        parts = (self.clusters_s, self.routes_s, self.weights_s)
        return None if None in parts else max(p for p in parts if p is not None)


class EnvoyView:
    """Admin reads and requests through the listener of one running Envoy."""

    def __init__(self, envoy: TimedEnvoy, listener_port: int, session: aiohttp.ClientSession) -> None:
        self.envoy = envoy
        self.listener_port = listener_port
        self.session = session

    async def admin(self, path: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        url = f"{self.envoy.admin_url}{path}"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"envoy admin GET {path} -> {resp.status}: {body[:200]}")
            return body

    async def cluster_counts(self) -> tuple[int, int]:
        """(active, warming) clusters, from admin /stats (static ones included)."""
        q = urllib.parse.quote(r"^cluster_manager\.(active|warming)_clusters$")
        found = {"active": 0, "warming": 0}
        for line in (await self.admin(f"/stats?filter={q}")).splitlines():
            name, _, value = line.partition(": ")
            kind = name.rsplit(".", 1)[-1].split("_")[0]
            if kind in found and value.strip().isdigit():
                found[kind] = int(value)
        return found["active"], found["warming"]

    async def runtime(self) -> dict[str, str]:
        """Every runtime key Envoy holds and its final value (admin /runtime)."""
        doc = json.loads(await self.admin("/runtime"))
        return {k: v.get("final_value", "") for k, v in doc.get("entries", {}).items()}

    async def cluster_hosts(self, cluster: str) -> set[str]:
        """`ip:port` of the hosts admin /clusters lists for one cluster."""
        q = urllib.parse.quote(f"^{re.escape(cluster)}$")
        hosts = set()
        prefix = f"{cluster}::"
        for line in (await self.admin(f"/clusters?filter={q}")).splitlines():
            if line.startswith(prefix):
                parts = line[len(prefix) :].split("::")
                if len(parts) >= 2 and re.fullmatch(r"[\d.]+:\d+", parts[0]):
                    hosts.add(parts[0])
        return hosts

    async def request(self, host: str, timeout: float = 5.0) -> tuple[int, str]:  # noqa: ASYNC109
        """GET /v1/predict through the listener with this Host: (status, x-served-by or '')."""
        url = f"http://127.0.0.1:{self.listener_port}/v1/predict"
        try:
            async with self.session.get(
                url, headers={"Host": host}, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return resp.status, resp.headers.get("x-served-by", "")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return 0, type(exc).__name__

    async def routes_ok(self, models: list[ModelFile]) -> tuple[int, int]:
        """How many of `models` answer 200 from a backend through the listener."""
        results = await asyncio.gather(*(self.request(m.host) for m in models))
        return sum(1 for status, served in results if status == 200 and served), len(models)

    async def stat(self, name: str) -> int | None:
        """One counter or gauge from admin /stats (a regex filter: Envoy still walks every stat,
        about 1 s of its main thread with 20,000 clusters)."""
        q = urllib.parse.quote(f"^{re.escape(name)}$")
        for line in (await self.admin(f"/stats?filter={q}")).splitlines():
            key, _, value = line.partition(": ")
            if key == name and value.strip().lstrip("-").isdigit():
                return int(value)
        return None

    async def clusters_with_hosts(self, clusters: list[str]) -> int:
        """How many of `clusters` admin /clusters lists with at least one host (one filtered read)."""
        q = urllib.parse.quote("^(" + "|".join(re.escape(c) for c in clusters) + ")$")
        found = set()
        for line in (await self.admin(f"/clusters?filter={q}")).splitlines():
            name, _, rest = line.partition("::")
            if re.match(r"[\d.]+:\d+::", rest):
                found.add(name)
        return len(found & set(clusters))

    async def wait_converged(
        self,
        expected_clusters: int,
        runtime_keys: list[str],
        sample: list[ModelFile],
        remotes: bool,
        timeout: float,  # noqa: ASYNC109
        poll: float,
        on_progress: Callable[[str], None] | None = None,
    ) -> Convergence:
        """Poll until all `expected_clusters` are active (none warming), every sampled model answers
        200 through the listener, and every runtime key is present (with none wanted, LIVE
        stands for the layers: Envoy starts CDS only once its runtime is ready); bounded by `timeout` seconds
        from Envoy's spawn. Each part's time is when it was first seen complete.

        Admin reads that walk everything (/stats, /runtime) cost seconds of Envoy's main thread at
        N=10,000, the thread that is taking in the configuration, so they are not polled while a
        cheap read can tell: the sampled models' clusters (a filtered /clusters) and requests stand
        for the whole until then, and one full read confirms (`confirmed` in `last`; if it does not,
        the full read is polled, at most every twice its own duration, and times the part).
        """
        conv = Convergence(live_s=time.monotonic() - self.envoy.spawned_at)
        if not runtime_keys:  # no weight to wait for; Envoy asks for clusters once its layers are in
            conv.weights_s = conv.live_s
        deadline = self.envoy.spawned_at + timeout
        wanted = set(runtime_keys)
        sampled = [m.cluster_local for m in sample] + ([m.cluster_remote for m in sample] if remotes else [])
        full_clusters = full_weights = False  # cheap check passed, confirm with a full read next
        next_full = next_weights = clusters_at = weights_at = 0.0
        last_print = time.monotonic()
        while not conv.done:
            self.envoy.check_alive("while converging")
            began = time.monotonic()
            if began > deadline:
                break
            try:
                if conv.clusters_s is None:
                    if not full_clusters:
                        n = await self.clusters_with_hosts(sampled)
                        conv.last.update(sampled_clusters=f"{n}/{len(sampled)}")
                        if n == len(sampled):
                            full_clusters, clusters_at = True, time.monotonic()
                    if full_clusters and time.monotonic() >= next_full:
                        t = time.monotonic()
                        active, warming = await self.cluster_counts()
                        next_full = time.monotonic() + 2 * (time.monotonic() - t)
                        conv.last.update(active_clusters=active, warming_clusters=warming)
                        if active >= expected_clusters and warming == 0:
                            confirmed_first = "confirmed_clusters" not in conv.last
                            at = clusters_at if confirmed_first else time.monotonic()
                            conv.clusters_s = at - self.envoy.spawned_at
                        conv.last["confirmed_clusters"] = conv.clusters_s is not None
                if conv.routes_s is None:
                    ok, of = await self.routes_ok(sample)
                    conv.last.update(sample_answering=f"{ok}/{of}")
                    if ok == of:
                        conv.routes_s = time.monotonic() - self.envoy.spawned_at
                # Weights are polled on their own cadence: Envoy may hold them before its clusters.
                if conv.weights_s is None and time.monotonic() >= next_weights:
                    t = time.monotonic()
                    if not full_weights:
                        keys = await self.stat("runtime.num_keys") or 0
                        conv.last.update(runtime_num_keys=f"{keys}/{len(wanted)}")
                        if keys >= len(wanted):
                            full_weights, weights_at = True, time.monotonic()
                    if full_weights:
                        held = wanted & (await self.runtime()).keys()
                        conv.last.update(runtime_keys=f"{len(held)}/{len(wanted)}")
                        if len(held) == len(wanted):
                            confirmed_first = "confirmed_weights" not in conv.last
                            at = weights_at if confirmed_first else time.monotonic()
                            conv.weights_s = at - self.envoy.spawned_at
                        conv.last["confirmed_weights"] = conv.weights_s is not None
                    next_weights = time.monotonic() + 2 * (time.monotonic() - t)
            except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
                conv.last.update(admin_error=f"{type(exc).__name__}: {exc}"[:200])
            if on_progress is not None and time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                on_progress(f"    ... {time.monotonic() - self.envoy.spawned_at:.0f}s: {conv.last}")
            if not conv.done:
                await asyncio.sleep(poll)
        return conv


async def wait_for(
    check: Callable[[], Awaitable[bool]],
    timeout: float,  # noqa: ASYNC109
    poll: float,
    alive: Callable[[], None] = lambda: None,
    backoff: bool = True,
) -> bool:
    """Poll `check` until it returns True (then True) or `timeout` seconds pass (then False);
    with `backoff`, a check that took long is not repeated sooner than twice its duration."""
    deadline = time.monotonic() + timeout
    while True:
        alive()
        began = time.monotonic()
        try:
            if await check():
                return True
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError):
            pass
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(max(poll, 2 * (time.monotonic() - began)) if backoff else poll)
