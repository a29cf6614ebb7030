"""`make bench`: N synthetic models x M simulated xDS clients over loopback gRPC, SotW and Delta.

Three kinds of process, so each one's CPU and memory are its own:

* the control plane (`--role server`): `Translator` + `XdsServer` (production's `XdsEvents`) on
  127.0.0.1:0, nothing else;
* fleets (`--role fleet`): asyncio loops of `SimEnvoy`s (`overspill.sim.envoy`), each on its own
  TCP connection;
* the coordinator (no role): starts the others, asks for weight changes, joins the timings.

They talk JSON lines over stdin/stdout. Latency is measured with `time.monotonic()`, one clock
for every process on Linux: from just before the server's `translator.apply(...)` to the moment
each client has read the response carrying the new value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import gc
import io
import itertools
import json
import math
import os
import platform
import pstats
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prometheus_client import Counter

from api.crd import RemoteBackend
from api.desired import ModelRoute, service_domains
from metrics.instruments import Instruments
from overspill.events import XdsEvents
from overspill.plane import bulk_load
from overspill.sim import envoy as sim
from overspill.sim.envoy import SimEnvoy
from reconciler.controller import Controller
from reconciler.store import ObjectStore
from xds import runtime
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.stream import Stream
from xds.types import CLUSTER, ENDPOINT, ROUTE, RUNTIME, SCOPED_ROUTE, SHORT

ROOT = Path(__file__).resolve().parent.parent
NAMESPACES = 8
FULL_GRID = ([100, 1_000, 10_000], [1, 100, 1_000])
LARGEST = (10_000, 1_000)  # only with --full
BYTES_IN_FLIGHT = 128 << 20  # how much initial state fleets may be pulling at once (server memory)


# --- synthetic models ---------------------------------------------------------------------------


def synthetic_models(n: int) -> list[ModelRoute]:
    """`n` models over a few namespaces, each with two pods and an https remote by IP (the
    heaviest cluster kind: TLS context and SAN check), as a fleet of hosted models would be."""
    return [synthetic_model(i) for i in range(n)]


def synthetic_model(i: int) -> ModelRoute:
    ns, name = f"team-{i % NAMESPACES}", f"model-{i:05d}"
    hi, lo = (i >> 8) & 255, i & 255
    remote = RemoteBackend(f"192.168.{hi}.{lo}", 8443, "https", "/v1", (("x-api-key", "bench"),))
    pods = ((f"10.{hi}.{lo}.1", 8000), (f"10.{hi}.{lo}.2", 8000))
    return ModelRoute(ns, name, service_domains(name, ns, 8000), pods, (remote,), 0.0)


# --- JSON lines between processes -----------------------------------------------------------------


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Inbox:
    """The coordinator's commands on a child's stdin. EOF means the coordinator is gone: the
    child's main task is cancelled and the process ends within seconds, whatever it was doing."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict] = asyncio.Queue()

    async def open(self) -> Inbox:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        main = asyncio.current_task()
        assert main is not None

        async def pump() -> None:
            while line := await reader.readline():
                self.queue.put_nowait(json.loads(line))
            loop.call_later(5, os._exit, 1)
            main.cancel()

        self._pump = asyncio.create_task(pump())
        return self

    async def get(self) -> dict:
        return await self.queue.get()


class Child:
    """A child process of this script with a role, spoken to in JSON lines."""

    running: list[Child] = []  # every child not yet reaped, killed on the way out
    MODULE = "bench.xds_bench"  # what the child runs (other benchmarks reuse this class)

    def __init__(self, proc: asyncio.subprocess.Process, name: str):
        self.proc, self.name = proc, name

    @classmethod
    async def spawn(cls, name: str, *args: str, module: str | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module or cls.MODULE,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 24,
            start_new_session=True,  # Ctrl-C reaches the coordinator only; it ends the children
        )
        child = cls(proc, name)
        cls.running.append(child)
        return child

    def send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())

    async def recv(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"{self.name} exited (code {await self.proc.wait()})")
        return json.loads(line)

    async def ask(self, message: dict, timeout: float = 60.0) -> dict:
        self.send(message)
        return await self.recv(timeout)

    async def close(self, grace: float = 5.0) -> None:
        """Ask it to stop; then close its stdin (a child still syncing takes that as the end);
        then kill it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ConnectionError):
                self.send({"cmd": "stop"})
            for step in ("eof", "kill"):
                try:
                    await asyncio.wait_for(self.proc.wait(), grace)
                    break
                except TimeoutError:
                    if step == "eof":
                        self.proc.stdin.close()
                    else:
                        self.proc.kill()
                        await self.proc.wait()
        if self in Child.running:
            Child.running.remove(self)

    @classmethod
    def kill_all(cls) -> None:
        """Last resort, after the event loop is gone (an error or Ctrl-C): SIGKILL by pid."""
        for child in cls.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signal.SIGKILL)
        cls.running.clear()


# --- the control plane process ------------------------------------------------------------------


def memory_mib() -> dict[str, float]:
    """Current and peak resident memory (VmRSS, VmHWM) of this process."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return {"rss_mib": found["VmRSS"], "peak_rss_mib": found["VmHWM"]}


def reset_peak_memory() -> None:
    """Start a new peak: writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    The heap the previous point freed goes back to the system first (glibc keeps it otherwise),
    so that a point's peak is its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _profile_text(profile: cProfile.Profile, limit: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)  # where the time is spent, not just passed through
    return out.getvalue()


def total(counter: Counter, kind: str | None = None) -> float:
    """A counter's value for one `type` label, or summed over all. `collect()` on the one counter
    costs about 40 us (a registry lookup 300 us), so polling it barely shows in the CPU figures."""
    return sum(
        s.value
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total") and kind in (None, s.labels.get("type"))
    )


async def poll(condition: Callable[[], bool], timeout: float, interval: float) -> None:
    """The server's counters have no event to wait on: look again every `interval` seconds."""
    for _ in range(math.ceil(timeout / interval)):
        if condition():
            return
        await asyncio.sleep(interval)


GC_TIME = [0.0]  # seconds this process has spent in the cyclic garbage collector


def _time_gc() -> None:
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            GC_TIME[0] += time.thread_time() - started[0]

    gc.callbacks.append(callback)


class RuntimeSends(XdsEvents):
    """Production's events, plus when each stream was sent each runtime version (during a storm)."""

    def __init__(self, instruments: Instruments, controller: Controller):
        super().__init__(instruments, controller)
        self.sends: dict[int, list[tuple[int, float]]] | None = None  # stream -> [(view version, time)]

    def response_sent(self, stream: Stream, type_url: str, size: int) -> None:
        super().response_sent(stream, type_url, size)
        if self.sends is not None and type_url == RUNTIME:
            self.sends.setdefault(stream.sid, []).append(
                (stream.types[RUNTIME].sent_version, time.monotonic())
            )


class ServerRole:
    """The control plane under test, and the few counters the coordinator asks for."""

    def __init__(self, translator: Translator, instruments: Instruments, routes: list[ModelRoute]):
        self.translator, self.instruments, self.routes = translator, instruments, routes
        # The server's events as production wires them (`overspill.plane`): counters, and a controller
        # that hears of every ACK (it has no models, so nothing else).
        controller = Controller(ObjectStore(), publish=lambda changes: None)
        self.events = RuntimeSends(instruments, controller)
        self.xds = XdsServer(translator.cache, self.events)
        self.profile: cProfile.Profile | None = None
        self.flushes: list[tuple[float, int]] | None = None  # (time, runtime version) during a storm
        # When the views change: at a flush (or, in a tree from before coalescing, at each commit).
        hook = "flush" if hasattr(translator.cache, "flush") else "commit"
        flush = getattr(translator.cache, hook)

        def recorded_flush() -> None:
            flush()
            if self.flushes is not None and translator.cache.views:
                view = next(iter(translator.cache.views.values()))  # the bench's nodes share one scope
                self.flushes.append((time.monotonic(), view.version_of(RUNTIME)))

        setattr(translator.cache, hook, recorded_flush)

    def stats(self) -> dict:
        return {
            "cpu": time.process_time(),
            "gc": GC_TIME[0],
            "loop_cpu": time.thread_time(),  # the event loop's thread: Python; the rest is gRPC's threads
            "bytes": total(self.instruments.xds_bytes),
            "rtds_acks": total(self.instruments.xds_acks, "RTDS"),
            "rtds_pushes": total(self.instruments.xds_pushes, "RTDS"),
            "streams": len(self.xds.streams),
            "tasks": len(asyncio.all_tasks()),  # with no stream open, more than at start is a leak
            **memory_mib(),
        }

    def change(self, i: int) -> dict:
        """Decide a new weight for one model; the clock starts just before the translator sees it."""
        index = (i * 7919) % len(self.routes)  # 7919 is prime: consecutive changes hit different models
        route = self.routes[index]
        percent = float(i % 99 + 1)
        if percent == route.remote_percent:
            percent = percent % 99 + 1
        self.routes[index] = new = replace(route, remote_percent=percent)
        before = self.stats()
        cpu0, t0 = time.process_time(), time.monotonic()
        self.translator.apply({(new.namespace, new.name): new})
        apply_cpu = time.process_time() - cpu0
        return {"key": new.runtime_key, "value": percent, "t0": t0, "cpu0": cpu0, "apply_cpu": apply_cpu,
                "before": before}  # fmt: skip

    async def structural(self, i: int, add: bool, timeout: float) -> dict:
        """Add model `i` (or remove it again) and wait until every stream has answered all it was
        sent and nothing more comes: bytes per type, seconds until then, server CPU."""
        model = synthetic_model(i)
        kinds = list(SHORT.values())
        before = {k: total(self.instruments.xds_bytes, k) for k in kinds}
        cpu0, t0 = time.process_time(), time.monotonic()
        self.translator.apply({(model.namespace, model.name): model if add else None})
        sent, done = total(self.instruments.xds_bytes), None
        while time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.005)
            now = total(self.instruments.xds_bytes)
            busy = now != sent or any(
                sub.pending for stream in self.xds.streams.values() for sub in stream.types.values()
            )
            sent = now
            if busy:
                done = None
            elif done is None:
                done = (time.monotonic(), time.process_time())
            elif time.monotonic() - done[0] > 0.3:  # quiet: the removal's second round is not coming
                break
        at, cpu = done or (math.inf, math.inf)
        return {
            "bytes": {k: total(self.instruments.xds_bytes, k) - before[k] for k in kinds},
            "seconds": at - t0,
            "cpu": cpu - cpu0,
        }

    async def settle(self, rtds_acks: float, timeout: float) -> dict:
        """Wait until the server has read `rtds_acks` RTDS ACKs in all: the change's work is done."""
        await poll(lambda: total(self.instruments.xds_acks, "RTDS") >= rtds_acks, timeout, 0.005)
        return self.stats()

    async def storm(self, rate: float, seconds: float, seed: int) -> dict:
        """Weight changes of random models at `rate` per second for `seconds`, each its own
        `translator.apply`, as decisions arriving one by one would be. Each value is new for its
        model within the storm, so a client's receipt of (key, value) names exactly one change."""
        rng = random.Random(seed)
        self.flushes, self.events.sends = [], {}
        before = self.stats()
        count = max(1, round(rate * seconds))
        taken: dict[int, set[float]] = {}
        changes = []
        t0 = time.monotonic()
        for i in range(count):
            if (wait := t0 + i / rate - time.monotonic()) > 0:  # on schedule; late ones go at once
                await asyncio.sleep(wait)
            index = rng.randrange(len(self.routes))
            route = self.routes[index]
            used = taken.setdefault(index, {route.remote_percent})
            percent = rng.choice([p for p in range(1, 100) if float(p) not in used])
            used.add(float(percent))
            self.routes[index] = new = replace(route, remote_percent=float(percent))
            at = time.monotonic()
            self.translator.apply({(new.namespace, new.name): new})
            changes.append((new.runtime_key, float(percent), at))
        return {"changes": changes, "before": before, "after": self.stats()}

    async def quiet(self, timeout: float) -> dict:
        """Wait until no stream has a runtime response unanswered: the storm's work is done."""

        def answered() -> bool:
            return not any(
                (sub := s.types.get(RUNTIME)) is not None and sub.pending for s in self.xds.streams.values()
            )

        await poll(answered, timeout, 0.005)
        return self.stats()

    def sent(self, changes: list) -> dict:
        """When the server had sent each storm change to every stream: the first flush after the
        change holds it, and each stream has it once sent that runtime version or a later one."""
        flushes, sends = self.flushes or [], self.events.sends or {}
        self.flushes = self.events.sends = None
        sent_all: dict[int, float] = {}  # runtime version -> when the last stream was sent it (or later)
        for _, version in flushes:
            firsts = [next((t for v, t in s if v >= version), math.inf) for s in sends.values()]
            sent_all[version] = max(firsts, default=math.inf)
        lags = []
        for _, _, at in changes:
            version = next((v for t, v in flushes if t >= at), None)
            lags.append(sent_all[version] - at if version is not None else math.inf)
        return {"lags": lags, "flushes": len(flushes)}

    async def wait_streams(self, count: int, timeout: float) -> dict:
        await poll(lambda: len(self.xds.streams) == count, timeout, 0.01)
        return self.stats()

    def toggle_profile(self, on: bool) -> dict:
        if on:
            self.profile = cProfile.Profile()
            self.profile.enable()
            return {}
        assert self.profile is not None
        self.profile.disable()
        text, self.profile = _profile_text(self.profile), None
        return {"profile": text}


async def server_role(models: int, profile_cold: bool, shards: int = runtime.SHARDS) -> None:
    profile = cProfile.Profile() if profile_cold else None
    t0, c0 = time.monotonic(), time.process_time()
    if profile:
        profile.enable()
    _time_gc()
    with bulk_load():  # as `overspill serve` loads its models: then frozen out of the collector's way
        routes = synthetic_models(models)
        translator = Translator("0.0.0.0", 10000, shards=shards)
        translator.publish(routes)
    instruments = Instruments()
    role = ServerRole(translator, instruments, routes)
    server, port = await start_server(role.xds, "127.0.0.1", 0)
    if profile:
        profile.disable()
    inbox = await Inbox().open()
    ready = {"seconds": time.monotonic() - t0, "cpu": time.process_time() - c0, **memory_mib()}
    emit({"event": "ready", "port": port, **ready, "profile": _profile_text(profile) if profile else ""})
    try:
        while True:
            cmd = await inbox.get()
            match cmd["cmd"]:
                case "stats":
                    emit(role.stats())
                case "reset_peak":
                    reset_peak_memory()
                    emit(role.stats())
                case "change":
                    emit(role.change(cmd["i"]))
                case "settle":
                    emit(await role.settle(cmd["rtds_acks"], cmd["timeout"]))
                case "structural":
                    emit(await role.structural(cmd["i"], cmd["add"], cmd["timeout"]))
                case "wait_streams":
                    emit(await role.wait_streams(cmd["count"], cmd["timeout"]))
                case "storm":
                    emit(await role.storm(cmd["rate"], cmd["seconds"], cmd["seed"]))
                case "quiet":
                    emit(await role.quiet(cmd["timeout"]))
                case "sent":
                    emit(role.sent(cmd["changes"]))
                case "profile":
                    emit(role.toggle_profile(cmd["on"]))
                case "stop":
                    return
    finally:
        await server.stop(None)


# --- the fleet processes ------------------------------------------------------------------------


async def fleet_role(
    target: str,
    delta: bool,
    count: int,
    models: int,
    prefix: str,
    parallel: int,
    shards: int = runtime.SHARDS,
) -> None:
    """`count` SimEnvoys; at most `parallel` of them pulling their initial state at once."""
    armed = False
    seen: dict[tuple[str, float], list[float]] = defaultdict(list)
    complete: dict[tuple[str, float], asyncio.Event] = defaultdict(asyncio.Event)
    arrivals: list[dict[tuple[str, float], float]] = [{} for _ in range(count)]  # per node, for storms
    storm = Storm()

    def on_runtime(i: int, key: str, value: float, at: float) -> None:
        if armed:  # the initial values are no weight change
            times = seen[(key, value)]
            times.append(at)
            if len(times) == count:
                complete[(key, value)].set()
            arrivals[i][(key, value)] = at
            storm.arrived(i, key, value)

    envoys = [
        SimEnvoy(
            target,
            node_id=f"{prefix}-{i}",
            delta=delta,
            record=False,
            layers=tuple(runtime.layer_names(shards)),
            on_runtime=lambda key, value, at, i=i: on_runtime(i, key, value, at),
        )
        for i in range(count)
    ]
    t0, c0 = time.monotonic(), time.process_time()
    inbox = await Inbox().open()
    try:
        await join_all(envoys, models, parallel)
        received = sum(e.received_bytes for e in envoys)
        emit({"event": "synced", "seconds": time.monotonic() - t0, "cpu": time.process_time() - c0})
        armed, mark = True, time.process_time()
        while (cmd := await inbox.get())["cmd"] != "stop":
            if cmd["cmd"] == "storm":  # the storm is over: wait for its last values, then tell
                await storm.wait(envoys, cmd["changes"], cmd["timeout"])
                bytes_now, cpu = sum(e.received_bytes for e in envoys), time.process_time()
                lags = storm.lags(arrivals, cmd["changes"])
                emit({**lags, "cpu": cpu - mark, "bytes": bytes_now - received})
                received, mark = bytes_now, cpu
                for a in arrivals:
                    a.clear()
                continue
            for a in arrivals:
                a.clear()
            key = (cmd["key"], cmd["value"])
            try:
                await asyncio.wait_for(complete[key].wait(), cmd["timeout"])
            except TimeoutError:
                pass
            bytes_now = sum(e.received_bytes for e in envoys)
            emit({"times": seen.pop(key, []), "cpu": time.process_time(), "bytes": bytes_now - received})
            received = bytes_now
            complete.pop(key, None)
    finally:
        await asyncio.gather(*(e.stop() for e in envoys), return_exceptions=True)


async def join_all(envoys: list[SimEnvoy], models: int, parallel: int) -> None:
    """Start every node, at most `parallel` of them pulling their initial state at once; return once
    each holds the whole state."""
    gate = asyncio.Semaphore(parallel)

    async def join(envoy: SimEnvoy) -> None:
        async with gate:
            await envoy.start()
            await envoy.wait(lambda e: holds(e, models), timeout=3600)

    await asyncio.gather(*(join(e) for e in envoys))


class Storm:
    """A fleet's view of a storm: when each of its nodes held the latest value of every changed key,
    and how long each change took to reach each node (a change counts as arrived once the node holds
    its value or a later one of the same key: intermediate values may rightly never be sent)."""

    def __init__(self) -> None:
        self.final: dict[str, float] = {}
        self.missing: list[int] = []
        self.done = asyncio.Event()

    def arrived(self, i: int, key: str, value: float) -> None:
        if self.final.get(key) == value and self.missing:
            self.missing[i] -= 1
            if self.missing[i] == 0 and not any(self.missing):
                self.done.set()

    async def wait(self, envoys: list[SimEnvoy], changes: list, timeout: float) -> None:
        self.final = {key: value for key, value, _ in changes}
        self.missing = [sum(e.runtime_values.get(k) != v for k, v in self.final.items()) for e in envoys]
        self.done.clear()
        if any(self.missing):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), timeout)

    def lags(self, arrivals: list[dict[tuple[str, float], float]], changes: list) -> dict:
        per_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for key, value, at in changes:
            per_key[key].append((value, at))
        lags, converged = [], -math.inf
        for node in arrivals:
            for key, history in per_key.items():
                first = math.inf  # the earliest receipt of this value or a later one
                for value, at in reversed(history):
                    first = min(first, node.get((key, value), math.inf))
                    lags.append(first - at)
                converged = max(converged, node.get((key, history[-1][0]), math.inf))
        finite = sorted(x for x in lags if x != math.inf)
        return {
            "missing": sum(1 for m in self.missing if m),
            "converged_at": converged,
            "lag_max": max(lags, default=math.nan),
            "lag_p50": percentile(finite, 50),
            "lag_p99": percentile(finite, 99),
        }


# --- the coordinator ----------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 20 samples is their maximum, nothing interpolated."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Point:
    """One grid point's figures (times in seconds unless named otherwise)."""

    models: int
    clients: int
    protocol: str
    cold_start_s: float
    cold_start_cpu_s: float
    cold_start_rss_mib: float
    fleet_sync_s: float = math.nan  # all M clients, at most `parallel` syncing at once
    fleet_rss_mib: float = math.nan  # control plane RSS once the M clients hold everything
    sync_s: float = math.nan  # one new SimEnvoy (raw bytes) while the M are connected
    sync_server_cpu_s: float = math.nan
    sync_bytes: int = 0
    decoding_sync_s: float | None = None  # one new SimEnvoy(decode=True): pydantic messages
    changes: int = 0
    missed: int = 0  # client receipts that never came within the timeout
    latency_all_p50_ms: float = math.nan  # decision -> the last of the M clients has it
    latency_all_p99_ms: float = math.nan
    latency_client_p50_ms: float = math.nan  # decision -> one client has it, over every client
    latency_client_p99_ms: float = math.nan
    apply_cpu_ms: float = math.nan  # median: translator.apply alone
    server_cpu_ms: float = math.nan  # median: apply + pushing to all M + reading their ACKs
    server_cpu_p99_ms: float = math.nan
    bytes_per_change: float = math.nan  # median, all clients, from overspill_xds_sent_bytes
    bytes_per_change_per_client: float = math.nan
    client_bytes_per_change: float = math.nan  # as the clients counted them (cross-check)
    client_cpu_ms: float = math.nan  # median, all fleet processes together
    # Adding one model, then removing it (medians over `--structural` of each): bytes sent per
    # client and per type, ms until every client has answered all it was sent, server CPU ms.
    add_bytes_per_client: float = math.nan
    remove_bytes_per_client: float = math.nan
    add_bytes_by_type: dict = field(default_factory=dict)
    remove_bytes_by_type: dict = field(default_factory=dict)
    add_all_ms: float = math.nan
    remove_all_ms: float = math.nan
    add_server_cpu_ms: float = math.nan
    remove_server_cpu_ms: float = math.nan
    peak_rss_mib: float = math.nan  # control plane VmHWM during this point (reset before it)
    leaked_tasks: int = 0  # asyncio tasks left in the server once every stream closed, over its start
    profile: str = field(default="", repr=False)


def holds(envoy: SimEnvoy, models: int) -> bool:
    """The whole state of `models` models with a remote each: clusters, endpoints, scopes (four
    Host names each), routes, and every weight layer (a layer comes whole, so its weights too)."""
    held = envoy.held
    return (
        len(held[CLUSTER]) == 2 * models
        and len(held[ENDPOINT]) == models
        and len(held[SCOPED_ROUTE]) == 4 * models
        and len(held[ROUTE]) == models
        and len(held[RUNTIME]) == len(envoy.layers)
    )


async def sync_one(
    target: str, delta: bool, models: int, decoding: bool, timeout: float, shards: int = runtime.SHARDS
) -> float:
    """Seconds until one new node holds every cluster, endpoint set, route and runtime layer."""
    t0 = time.monotonic()
    sim.forget()  # it parses everything, as a new Envoy does
    name = "newcomer-decoding" if decoding else "newcomer"
    layers = tuple(runtime.layer_names(shards))
    envoy = SimEnvoy(target, node_id=name, delta=delta, decode=decoding, record=False, layers=layers)
    await envoy.start()
    try:
        await envoy.wait(lambda e: holds(e, models), timeout=timeout)
    finally:
        await envoy.stop()
    return time.monotonic() - t0


def say(text: str) -> None:
    print(text, flush=True)


async def spawn_fleets(
    fleets: list[Child], target: str, protocol: str, n: int, m: int, args: argparse.Namespace
) -> None:
    """M clients in `--client-procs` fleet processes (appended to `fleets` as they start, so the
    caller can close them whatever happens); returns once every one holds the whole state."""
    procs = min(args.client_procs, m)
    parallel = max(1, min(100, BYTES_IN_FLIGHT // (1300 * n * procs)))
    for p in range(procs):
        count = m // procs + (p < m % procs)
        fleets.append(
            await Child.spawn(
                f"fleet-{p}",
                *("--role", "fleet", "--target", target, "--protocol", protocol),
                *("--count", str(count), "--models", str(n), "--prefix", f"{protocol}-{m}-{p}"),
                *("--parallel", str(parallel), "--shards", str(args.shards)),
            )
        )
    for f in fleets:
        await f.recv(args.timeout)


async def run_point(
    server: Child, port: int, point: Point, args: argparse.Namespace, decoding: bool, counter: itertools.count
) -> Point:
    tasks_at_start = (await server.ask({"cmd": "stats"}))["tasks"]
    n, m, delta = point.models, point.clients, point.protocol == "delta"
    label = f"[N={n} M={m} {point.protocol}]"
    target = f"127.0.0.1:{port}"
    await server.ask({"cmd": "reset_peak"})
    fleets: list[Child] = []
    try:
        t0 = time.monotonic()
        await spawn_fleets(fleets, target, point.protocol, n, m, args)
        point.fleet_sync_s = time.monotonic() - t0
        before = await server.ask({"cmd": "stats"})
        point.fleet_rss_mib = before["rss_mib"]
        say(
            f"{label} {m} clients synced in {point.fleet_sync_s:.1f} s ({len(fleets)} processes), "
            f"control plane RSS {point.fleet_rss_mib:.0f} MiB"
        )

        point.sync_s = await sync_one(target, delta, n, False, args.timeout, args.shards)
        after = await server.ask({"cmd": "wait_streams", "count": m, "timeout": 30})
        point.sync_server_cpu_s = after["cpu"] - before["cpu"]
        point.sync_bytes = int(after["bytes"] - before["bytes"])
        say(
            f"{label} full sync of one new client: {point.sync_s:.2f} s, {point.sync_bytes / 2**20:.1f} MiB, "
            f"server CPU {point.sync_server_cpu_s:.2f} s"
        )
        if decoding:
            point.decoding_sync_s = await sync_one(target, delta, n, True, args.timeout, args.shards)
            await server.ask({"cmd": "wait_streams", "count": m, "timeout": 30})
            say(f"{label} full sync of one new decoding SimEnvoy: {point.decoding_sync_s:.2f} s")

        if args.profile:
            await server.ask({"cmd": "profile", "on": True})
        rows = []
        all_latencies: list[float] = []
        for _ in range(args.changes):
            change = await server.ask({"cmd": "change", "i": next(counter)})
            for f in fleets:
                f.send({"cmd": "expect", "key": change["key"], "value": change["value"], "timeout": 60})
            seen = [await f.recv(120) for f in fleets]
            done = await server.ask(
                {"cmd": "settle", "rtds_acks": change["before"]["rtds_acks"] + m, "timeout": 30}, timeout=60
            )
            times = [t for s in seen for t in s["times"]]
            latencies = [t - change["t0"] for t in times]
            all_latencies += latencies
            rows.append(
                {
                    "latency_all": max(latencies) if len(latencies) == m else math.inf,
                    "missed": m - len(latencies),
                    "apply_cpu": change["apply_cpu"],
                    "server_cpu": done["cpu"] - change["cpu0"],
                    "bytes": done["bytes"] - change["before"]["bytes"],
                    "client_bytes": sum(s["bytes"] for s in seen),
                    "client_cpu": sum(s["cpu"] for s in seen),
                }
            )
            await asyncio.sleep(args.spacing)
        if args.profile:
            point.profile = (await server.ask({"cmd": "profile", "on": False}))["profile"]
        structural: dict[str, list[dict]] = {"add": [], "remove": []}
        for _ in range(args.structural):
            i = n + next(counter)  # a model none of the N is
            for kind in ("add", "remove"):
                cmd = {"cmd": "structural", "i": i, "add": kind == "add", "timeout": 60}
                structural[kind].append(await server.ask(cmd, timeout=90))
                await asyncio.sleep(args.spacing)
        client_cpu = [b["client_cpu"] - a["client_cpu"] for a, b in itertools.pairwise(rows)]
        stats = await server.ask({"cmd": "stats"})
    finally:
        await asyncio.gather(*(f.close() for f in fleets))
    closed = await server.ask({"cmd": "wait_streams", "count": 0, "timeout": 60}, timeout=90)
    point.leaked_tasks = closed["tasks"] - tasks_at_start

    ms = 1000.0
    point.changes = len(rows)
    point.missed = sum(r["missed"] for r in rows)
    point.latency_all_p50_ms = percentile((r["latency_all"] for r in rows), 50) * ms
    point.latency_all_p99_ms = percentile((r["latency_all"] for r in rows), 99) * ms
    point.latency_client_p50_ms = percentile(all_latencies, 50) * ms
    point.latency_client_p99_ms = percentile(all_latencies, 99) * ms
    point.apply_cpu_ms = statistics.median(r["apply_cpu"] for r in rows) * ms
    point.server_cpu_ms = statistics.median(r["server_cpu"] for r in rows) * ms
    point.server_cpu_p99_ms = percentile((r["server_cpu"] for r in rows), 99) * ms
    point.bytes_per_change = statistics.median(r["bytes"] for r in rows)
    point.bytes_per_change_per_client = point.bytes_per_change / m
    point.client_bytes_per_change = statistics.median(r["client_bytes"] for r in rows)
    point.client_cpu_ms = statistics.median(client_cpu) * ms if client_cpu else math.nan
    point.peak_rss_mib = stats["peak_rss_mib"]
    for kind, runs in structural.items():
        if not runs:
            continue
        by_type = {t: statistics.median(r["bytes"][t] for r in runs) / m for t in runs[0]["bytes"]}
        setattr(point, f"{kind}_bytes_by_type", {t: b for t, b in by_type.items() if b})
        per_client = statistics.median(sum(r["bytes"].values()) for r in runs) / m
        setattr(point, f"{kind}_bytes_per_client", per_client)
        setattr(point, f"{kind}_all_ms", statistics.median(r["seconds"] for r in runs) * ms)
        setattr(point, f"{kind}_server_cpu_ms", statistics.median(r["cpu"] for r in runs) * ms)
    if structural["add"]:
        say(
            f"{label} add a model: {point.add_bytes_per_client / 1024:.1f} KiB/client "
            f"({', '.join(f'{t} {b:,.0f}' for t, b in point.add_bytes_by_type.items())}), all answered in "
            f"{point.add_all_ms:.0f} ms; remove: {point.remove_bytes_per_client / 1024:.1f} KiB/client, "
            f"{point.remove_all_ms:.0f} ms"
        )
    say(
        f"{label} weight change -> all {m}: p50 {point.latency_all_p50_ms:.1f} ms, "
        f"p99 {point.latency_all_p99_ms:.1f} ms; server CPU {point.server_cpu_ms:.1f} ms "
        f"(apply {point.apply_cpu_ms:.2f} ms); {point.bytes_per_change_per_client / 1024:.2f} KiB/client; "
        f"peak RSS {point.peak_rss_mib:.0f} MiB"
        + (f"; {point.missed} receipts MISSED" if point.missed else "")
    )
    return point


@dataclass
class StormPoint:
    """One grid point under a storm of weight changes (medians over `--storm-repeat` storms)."""

    models: int
    clients: int
    protocol: str
    rate: float  # weight changes per second asked for
    seconds: float
    cold_start_s: float
    fleet_sync_s: float = math.nan
    changes: int = 0  # per storm
    achieved_rate: float = math.nan  # changes per second the server's loop actually made
    cpu_per_change_ms: float = math.nan  # server CPU from the storm's start until every ACK is in, / changes
    loop_cpu_per_change_ms: float = math.nan  # the part of it in the event loop's thread (the rest: gRPC's)
    converged_ms: float = math.nan  # last change -> every client holds the latest value of every key
    lag_p50_ms: float = math.nan  # change -> a client holds it (or a later value of its key)
    lag_p99_ms: float = math.nan
    lag_max_ms: float = math.nan
    sent_lag_p50_ms: float = math.nan  # change -> the server has sent it to every client (median run)
    sent_lag_max_ms: float = math.nan  # (the worst of all runs)
    rtds_per_client: float = math.nan  # runtime responses each client received per storm
    kib_per_client: float = math.nan  # bytes each client received per storm
    client_cpu_ms_per_change: float = math.nan  # all fleet processes together
    missing: int = 0  # clients that never held the latest values (within the timeout)
    peak_rss_mib: float = math.nan
    runs: list[dict] = field(default_factory=list)
    profile: str = field(default="", repr=False)


async def run_storm(
    server: Child, port: int, point: StormPoint, args: argparse.Namespace, seed: int
) -> StormPoint:
    """M clients synced, then `--storm-repeat` storms of `--storm` changes per second for
    `--storm-seconds`, each followed by a wait until every client holds the latest values and the
    server has every ACK; a second's pause between storms."""
    n, m = point.models, point.clients
    label = f"[N={n} M={m} {point.protocol} storm {point.rate:g}/s]"
    await server.ask({"cmd": "reset_peak"})
    fleets: list[Child] = []
    try:
        t0 = time.monotonic()
        await spawn_fleets(fleets, f"127.0.0.1:{port}", point.protocol, n, m, args)
        point.fleet_sync_s = time.monotonic() - t0
        say(f"{label} {m} clients synced in {point.fleet_sync_s:.1f} s")
        if args.profile:
            await server.ask({"cmd": "profile", "on": True})
        for r in range(args.storm_repeat):
            await asyncio.sleep(1.0)
            storm = await server.ask(
                {"cmd": "storm", "rate": point.rate, "seconds": point.seconds, "seed": seed + r},
                timeout=point.seconds * 10 + 60,
            )
            changes, before = storm["changes"], storm["before"]
            for f in fleets:
                f.send({"cmd": "storm", "changes": changes, "timeout": 60})
            seen = [await f.recv(120) for f in fleets]
            done = await server.ask({"cmd": "quiet", "timeout": 30}, timeout=60)
            sent = await server.ask({"cmd": "sent", "changes": changes}, timeout=60)
            first, last = changes[0][2], changes[-1][2]
            run = {
                "changes": len(changes),
                "achieved_rate": (len(changes) - 1) / (last - first) if last > first else math.nan,
                "cpu_per_change": (done["cpu"] - before["cpu"]) / len(changes),
                "loop_cpu_per_change": (done["loop_cpu"] - before["loop_cpu"]) / len(changes),
                "gc_per_change": (done["gc"] - before["gc"]) / len(changes),
                "cpu_during_storm": storm["after"]["cpu"] - before["cpu"],
                "converged": max(s["converged_at"] for s in seen) - last,
                "sent_lag_p50": percentile(sent["lags"], 50),
                "sent_lag_max": max(sent["lags"]),
                "flushes": sent["flushes"],
                "lag_p50": statistics.median(s["lag_p50"] for s in seen),
                "lag_p99": max(s["lag_p99"] for s in seen),
                "lag_max": max(s["lag_max"] for s in seen),
                "rtds_per_client": (done["rtds_pushes"] - before["rtds_pushes"]) / m,
                "bytes_per_client": (done["bytes"] - before["bytes"]) / m,
                "client_cpu": sum(s["cpu"] for s in seen),  # since the previous storm (or the sync)
                "missing": sum(s["missing"] for s in seen),
            }
            point.runs.append(run)
            say(
                f"{label} run {r + 1}: {run['changes']} changes at {run['achieved_rate']:.0f}/s; "
                f"server CPU {run['cpu_per_change'] * 1000:.2f} ms per change "
                f"({run['loop_cpu_per_change'] * 1000:.2f} in the event loop, "
                f"{run['gc_per_change'] * 1000:.2f} in the garbage collector); all {m} clients hold the "
                f"latest {run['converged'] * 1000:.0f} ms after the last change; lag p99 "
                f"{run['lag_p99'] * 1000:.0f} ms, max {run['lag_max'] * 1000:.0f} ms; "
                f"{run['rtds_per_client']:.1f} RTDS responses per client ({run['flushes']} flushes); "
                f"server had sent each change to all: p50 {run['sent_lag_p50'] * 1000:.0f} ms, "
                f"max {run['sent_lag_max'] * 1000:.0f} ms"
                + (f"; {run['missing']} clients MISSING the latest" if run["missing"] else "")
            )
        if args.profile:
            point.profile = (await server.ask({"cmd": "profile", "on": False}))["profile"]
        stats = await server.ask({"cmd": "stats"})
    finally:
        await asyncio.gather(*(f.close() for f in fleets))
    await server.ask({"cmd": "wait_streams", "count": 0, "timeout": 60}, timeout=90)

    def med(key: str, scale: float = 1.0) -> float:
        return statistics.median(r[key] for r in point.runs) * scale

    ms = 1000.0
    point.changes = round(med("changes"))
    point.achieved_rate = med("achieved_rate")
    point.cpu_per_change_ms = med("cpu_per_change", ms)
    point.loop_cpu_per_change_ms = med("loop_cpu_per_change", ms)
    point.converged_ms = med("converged", ms)
    point.lag_p50_ms = med("lag_p50", ms)
    point.lag_p99_ms = med("lag_p99", ms)
    point.lag_max_ms = max(r["lag_max"] for r in point.runs) * ms
    point.sent_lag_p50_ms = med("sent_lag_p50", ms)
    point.sent_lag_max_ms = max(r["sent_lag_max"] for r in point.runs) * ms
    point.rtds_per_client = med("rtds_per_client")
    point.kib_per_client = med("bytes_per_client") / 1024
    point.client_cpu_ms_per_change = med("client_cpu", ms) / point.changes
    point.missing = sum(r["missing"] for r in point.runs)
    point.peak_rss_mib = stats["peak_rss_mib"]
    return point


def grid(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.quick:
        models, clients = [100], [1, 10]
    else:
        models = args.models or FULL_GRID[0]
        clients = args.clients or FULL_GRID[1]
    points = [(n, m) for n in sorted(models) for m in sorted(clients)]
    if LARGEST in points and not (args.full or args.models or args.clients):
        points.remove(LARGEST)
    return points


async def coordinate(args: argparse.Namespace) -> list[Point | StormPoint]:
    protocols = ["sotw", "delta"] if args.protocol == "both" else [args.protocol]
    points = grid(args)
    where = machine()
    what = (
        f"{args.storm_repeat} storms of {args.storm:g} changes/s for {args.storm_seconds:g} s per point"
        if args.storm
        else f"{args.changes} weight changes per point"
    )
    say(f"grid: {points} x {protocols}, {what}; {where}")
    results: list[Point | StormPoint] = []
    counter = itertools.count(1)
    sim.warm_up()
    for n in sorted({n for n, _ in points}):
        say(f"[N={n}] cold start of the control plane ...")
        extra = ["--cold-profiled"] if args.profile_cold else []
        extra += ["--shards", str(args.shards)]
        server = await Child.spawn("server", "--role", "server", "--models", str(n), *extra)
        try:
            ready = await server.recv(args.timeout)
            say(f"[N={n}] ready to serve in {ready['seconds']:.1f} s (RSS {ready['rss_mib']:.0f} MiB)")
            if args.profile_cold:
                _write_profile(args.profile_cold, f"cold-{n}", ready["profile"])
            decoded: set[str] = set()
            for m in sorted({m for nn, m in points if nn == n}):
                for protocol in protocols:
                    if args.storm:
                        storm = StormPoint(n, m, protocol, args.storm, args.storm_seconds, ready["seconds"])
                        results.append(await run_storm(server, ready["port"], storm, args, next(counter)))
                        if args.profile:
                            _write_profile(args.profile, f"storm-{n}-{m}-{protocol}", storm.profile)
                        write_results(args.out, where, results)
                        continue
                    point = Point(n, m, protocol, ready["seconds"], ready["cpu"], ready["rss_mib"])
                    decoding = n <= args.decoding_sync_max and protocol not in decoded
                    decoded.add(protocol)
                    results.append(await run_point(server, ready["port"], point, args, decoding, counter))
                    if args.profile:
                        _write_profile(args.profile, f"changes-{n}-{m}-{protocol}", point.profile)
                    write_results(args.out, where, results)
        finally:
            await server.close()
    return results


def _write_profile(directory: str, name: str, text: str) -> None:
    path = Path(directory) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    say(f"profile written to {path}")


def machine() -> dict:
    """Where and on what the figures were taken: they mean little without it."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "xds"], capture_output=True, text=True
    ).stdout
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit.strip() + (" (xds/ modified)" if dirty.strip() else ""),
        "load_average_at_start": os.getloadavg(),
    }


def write_results(path: str, where: dict, results: list[Point | StormPoint]) -> None:
    points = [{k: v for k, v in asdict(p).items() if k != "profile"} for p in results]
    Path(path).write_text(json.dumps({"machine": where, "points": points}, indent=1) + "\n")


def num(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def storm_table(results: list[StormPoint]) -> str:
    rows = [
        "| N | M | protocol | changes/s asked (made) | server CPU ms per change (event loop) "
        "| all M hold the latest, ms after the last change | lag p50 / p99 / max ms "
        "| server sent to all M, p50 / max ms | RTDS responses per client (changes) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results:
        missing = f" ({p.missing} missing)" if p.missing else ""
        rows.append(
            f"| {p.models:,} | {p.clients:,} | {p.protocol} | {p.rate:g} ({num(p.achieved_rate, '.0f')}) "
            f"| {num(p.cpu_per_change_ms, '.2f')} ({num(p.loop_cpu_per_change_ms, '.2f')}) "
            f"| {num(p.converged_ms, '.0f')}{missing} "
            f"| {num(p.lag_p50_ms, '.0f')} / {num(p.lag_p99_ms, '.0f')} / {num(p.lag_max_ms, '.0f')} "
            f"| {num(p.sent_lag_p50_ms, '.0f')} / {num(p.sent_lag_max_ms, '.0f')} "
            f"| {num(p.rtds_per_client, '.1f')} ({p.changes}) |"
        )
    return "\n".join(rows)


def table(results: list[Point | StormPoint]) -> str:
    """The README's table: one row per point."""
    storms = [p for p in results if isinstance(p, StormPoint)]
    if storms:
        return storm_table(storms)
    results = [p for p in results if isinstance(p, Point)]

    rows = [
        "| N | M | protocol | cold start s | full sync s (decoding) | weight -> all M p50 / p99 ms "
        "| server CPU ms per change (apply) | bytes per change per client | peak RSS MiB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results:
        decoding = f" ({p.decoding_sync_s:.1f})" if p.decoding_sync_s is not None else ""
        missed = f" ({p.missed} missed)" if p.missed else ""
        rows.append(
            f"| {p.models:,} | {p.clients:,} | {p.protocol} | {num(p.cold_start_s, '.1f')} "
            f"| {num(p.sync_s, '.2f')}{decoding} "
            f"| {num(p.latency_all_p50_ms, '.0f')} / {num(p.latency_all_p99_ms, '.0f')}{missed} "
            f"| {num(p.server_cpu_ms, '.1f')} ({num(p.apply_cpu_ms, '.2f')}) "
            f"| {num(p.bytes_per_change_per_client, ',.0f')} | {num(p.peak_rss_mib, ',.0f')} |"
        )
    return "\n".join(rows)


def structural_table(results: list[Point]) -> str:
    """Adding and removing one model: what each client is sent, and how long until all answered."""

    def num(v: float, fmt: str) -> str:
        return "-" if math.isnan(v) else format(v, fmt)

    def kib(by_type: dict, kind: str) -> str:
        return num(by_type.get(kind, 0) / 1024, ",.1f")

    rows = [
        "| N | M | protocol | add: KiB per client (SRDS / RDS / CDS) | add -> all M answered ms "
        "| remove: KiB per client | remove -> all M answered ms | server CPU ms add / remove |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in results:
        by_type = p.add_bytes_by_type
        rows.append(
            f"| {p.models:,} | {p.clients:,} | {p.protocol} | {num(p.add_bytes_per_client / 1024, ',.1f')} "
            f"({kib(by_type, 'SRDS')} / {kib(by_type, 'RDS')} / {kib(by_type, 'CDS')}) "
            f"| {num(p.add_all_ms, '.0f')} | {num(p.remove_bytes_per_client / 1024, ',.1f')} "
            f"| {num(p.remove_all_ms, '.0f')} "
            f"| {num(p.add_server_cpu_ms, '.0f')} / {num(p.remove_server_cpu_ms, '.0f')} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x.replace("_", "").replace(",", "")) for x in text.split(":") if x]

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=ints, help="N values, colon-separated (default 100:1000:10000)")
    ap.add_argument("--clients", type=ints, help="M values, colon-separated (default 1:100:1000)")
    ap.add_argument("--protocol", choices=["sotw", "delta", "both"], default="both")
    ap.add_argument("--changes", type=int, default=20, help="weight changes per point")
    ap.add_argument("--spacing", type=float, default=0.1, help="seconds between weight changes")
    ap.add_argument(
        "--structural", type=int, default=3, help="models added then removed per point (after the weights)"
    )
    ap.add_argument("--full", action="store_true", help="include N=10,000 x M=1,000")
    ap.add_argument("--quick", action="store_true", help="a tiny grid for a smoke run")
    ap.add_argument("--client-procs", type=int, default=2, help="fleet processes per point")
    ap.add_argument(
        "--decoding-sync-max",
        type=int,
        default=1_000,
        help="largest N at which a decoding SimEnvoy's full sync is timed too (slow: pydantic)",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds any one phase may take")
    ap.add_argument("--storm", type=float, metavar="RATE", help="a storm of RATE weight changes/s per point")
    ap.add_argument("--storm-seconds", type=float, default=5.0, help="how long each storm lasts")
    ap.add_argument("--storm-repeat", type=int, default=3, help="storms per point (medians reported)")
    ap.add_argument(
        "--shards",
        type=int,
        default=runtime.SHARDS,
        help="runtime layers the weights are spread over (Envoy's bootstrap must name as many)",
    )
    ap.add_argument("--profile", metavar="DIR", help="cProfile weight changes in the server (inflates CPU)")
    ap.add_argument("--profile-cold", metavar="DIR", help="cProfile the cold starts (slows them down)")
    ap.add_argument("--out", help="results as JSON (bench/results.json, storms bench/storm_results.json)")
    # child roles
    ap.add_argument("--role", choices=["server", "fleet"], help=argparse.SUPPRESS)
    ap.add_argument("--cold-profiled", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="fleet", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.changes = min(args.changes, 5)
    if args.out is None:
        args.out = str(ROOT / "bench" / ("storm_results.json" if args.storm else "results.json"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when children end
        if args.role == "server":
            role = server_role(args.models[0], args.cold_profiled, args.shards)
        else:
            delta = args.protocol == "delta"
            role = fleet_role(
                args.target, delta, args.count, args.models[0], args.prefix, args.parallel, args.shards
            )
        with contextlib.suppress(asyncio.CancelledError):  # cancelled: the coordinator went away
            asyncio.run(role)
        return
    started = time.monotonic()
    results: list[Point | StormPoint] = []

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a kill ends the run as Ctrl-C does: children stopped, results kept

    signal.signal(signal.SIGTERM, terminate)
    try:
        results = asyncio.run(coordinate(args))
    except KeyboardInterrupt:
        say(f"interrupted; the points finished so far are in {args.out}")
        sys.exit(130)
    finally:
        Child.kill_all()
    if results:
        say(f"\n{table(results)}\n")
        points = [p for p in results if isinstance(p, Point)]  # storms add no model
        if points:
            say(f"{structural_table(points)}\n")
        say(f"results in {args.out}; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
