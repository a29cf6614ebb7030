"""Restarts lose nothing: `kill -9` of the real `overspill serve` under steady load and during a
burst, with a real Envoy, a real Prometheus and backends that count what reaches them.

While the control plane is away Envoy keeps serving what it has; the restarted one resumes each
model's offload state from `--state-dir` before its first decision, so when Envoy reconnects the
first thing it is sent is what it already holds: no weight moves, no cluster or listener is
touched, not one request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from e2e_stack import SWITCH_BUDGET, Model, Stack, stack

from api.desired import runtime_key

pytestmark = pytest.mark.e2e

# Envoy's own counters of what a config push did to it: none may move across a restart.
CHURN = (
    "cluster_manager.cluster_modified",
    "cluster_manager.cluster_removed",
    "cluster_manager.cds.update_rejected",
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    "listener_manager.lds.update_rejected",
    "runtime.update_rejected",
)


class Watch:
    """Steady load through Envoy (every status code kept) and Envoy's remote weight for one model,
    read from its admin /runtime every 50 ms, for as long as the test runs."""

    def __init__(self, s: Stack, model: Model, concurrency: int = 4):
        self.s, self.model, self.concurrency = s, model, concurrency
        self.codes: Counter[int | str] = Counter()
        self.weights: list[tuple[float, float | None]] = []  # (monotonic time, weight)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Watch:
        self._tasks = [asyncio.create_task(self._send()) for _ in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._poll()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _send(self) -> None:
        while not self._stop.is_set():
            try:
                code, _ = await self.s.request(self.model.host)
            except (OSError, TimeoutError) as exc:  # a refused or cut connection is a failure too
                code = type(exc).__name__
            self.codes[code] += 1
            await asyncio.sleep(0.005)

    async def _poll(self) -> None:
        key = runtime_key(self.model.namespace, self.model.name)
        while not self._stop.is_set():
            entries = json.loads(await self.s.envoy.admin_get("/runtime")).get("entries") or {}
            value = (entries.get(key) or {}).get("final_value")
            self.weights.append((time.monotonic(), None if value is None else float(value)))
            await asyncio.sleep(0.05)

    def weights_since(self, t: float) -> set[float | None]:
        return {w for at, w in self.weights if at >= t}

    async def until_weight(self, weight: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.weights or self.weights[-1][1] != weight:
            assert time.monotonic() < deadline, (
                f"Envoy's weight not {weight} within {timeout}s: {self.weights[-3:]}"
            )
            await asyncio.sleep(0.05)


async def churn(s: Stack) -> dict[str, int]:
    stats = await s.envoy.stats()
    return {name: stats.get(name, 0) for name in CHURN}


async def kill_and_restart(s: Stack, es: contextlib.AsyncExitStack, away: float = 1.0) -> float:
    """SIGKILL `overspill serve`, leave Envoy without it for `away` seconds, and start it again with
    the same flags and ports (it returns once the new process serves). Returns when it was killed."""
    old = s.control_plane
    old.kill()
    assert old.proc is not None
    await asyncio.wait_for(old.proc.wait(), 10)
    assert old.proc.returncode == -9
    killed = time.monotonic()
    await asyncio.sleep(away)
    s.control_plane = await es.enter_async_context(old.successor())
    return killed


async def reconnected(s: Stack) -> None:
    """Until Envoy is connected to the (restarted) control plane: it retries with backoff."""
    deadline = time.monotonic() + 30
    while not (await s.control_plane.status())["nodes"]:
        assert time.monotonic() < deadline, "Envoy did not reconnect to the restarted control plane"
        await asyncio.sleep(0.1)
    stats = await s.envoy.stats()
    assert stats.get("control_plane.connected_state") == 1


def decisions(s: Stack) -> list[str]:
    return [line for line in s.control_plane.log_text().splitlines() if "event=offload_decision" in line]


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_kill_9_at_rest_and_during_a_burst_fails_no_request_and_moves_no_weight(tmp_path, delta):
    # With an activation delay, a restart that forgot the burst would send all local for that long.
    m = Model("llm", percentage=50, buffer_seconds=120, activation_seconds=4)
    state_dir = tmp_path / "state"
    async with (
        asyncio.timeout(150),
        stack(tmp_path, m, extra_args=("--state-dir", str(state_dir)), delta=delta) as s,
        contextlib.AsyncExitStack() as es,
        Watch(s, m) as watch,
    ):
        # At rest: all local before, while away and after.
        await asyncio.sleep(1.0)
        before = (m.local.counts.total, m.remote.counts.total)
        churn_before = await churn(s)
        await kill_and_restart(s, es)
        await reconnected(s)
        await asyncio.sleep(1.0)
        assert m.remote.counts.total == before[1], "nothing goes to the remote at rest"
        assert m.local.counts.total > before[0]
        assert (await s.model_status(m))["phase"] == "Standby"

        # A burst: offloading on, then the control plane is killed in the middle of it.
        s.knob.set("llm", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + m.activation_seconds + 2)
        await watch.until_weight(50.0, 5)
        on = time.monotonic()
        saved = json.loads((state_dir / "offload-state.json").read_text())["models"]["default/llm"]
        assert (saved["phase"], saved["remotePercent"]) == ("Offloading", 50)
        before = (m.local.counts.total, m.remote.counts.total)
        killed = await kill_and_restart(s, es)
        await reconnected(s)
        away = time.monotonic() - killed
        await asyncio.sleep(2.0)  # the restarted control plane decides with live readings too
        local = m.local.counts.total - before[0]
        remote = m.remote.counts.total - before[1]
        status = await s.model_status(m)
        after = await churn(s)

    assert set(watch.codes) == {200}, f"requests failed across the restarts: {dict(watch.codes)}"
    assert watch.weights_since(on) == {50.0}, "Envoy's weight moved across the restart"
    share = remote / (local + remote)
    assert 0.40 <= share <= 0.60, (local, remote)
    assert status["phase"] == "Offloading"
    assert not decisions(s), f"the restarted control plane changed a decision: {decisions(s)}"
    assert after == churn_before, f"Envoy changed clusters or listeners: {churn_before} -> {after}"
    assert "event=offload_state_resumed count=1 names='default/llm'" in s.control_plane.log_text()
    print(
        f"\n{sum(watch.codes.values())} requests across two kill -9 restarts, all 200; during the burst "
        f"{remote}/{local + remote} = {share:.0%} to the remote (50 % wanted), Envoy's weight 50 throughout; "
        f"Envoy connected to the new process {away:.1f}s after the kill"
    )


def wall(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_kill_9_while_releasing_continues_the_buffer_from_its_saved_start(tmp_path):
    m = Model("bert", percentage=50, buffer_seconds=15)
    state_dir = tmp_path / "state"
    async with (
        asyncio.timeout(120),
        stack(tmp_path, m, extra_args=("--state-dir", str(state_dir))) as s,
        contextlib.AsyncExitStack() as es,
        Watch(s, m) as watch,
    ):
        s.knob.set("bert", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await watch.until_weight(50.0, 5)
        s.knob.set("bert", 1)
        await s.wait_phase(m, {"Releasing"}, timeout=SWITCH_BUDGET + 2)
        saved = json.loads((state_dir / "offload-state.json").read_text())["models"]["default/bert"]
        assert saved["phase"] == "Releasing" and saved["underSince"]
        under_since = wall(saved["underSince"])
        await asyncio.sleep(3.0)
        await kill_and_restart(s, es)
        restarted = time.time()
        assert (await s.model_status(m))["phase"] == "Releasing"  # its first decision, as it was
        await reconnected(s)
        before = m.remote.counts.total
        await asyncio.sleep(1.0)
        assert m.remote.counts.total > before, "still offloading during the rest of the buffer"
        await s.wait_phase(m, {"Standby"}, timeout=m.buffer_seconds + SWITCH_BUDGET)
        released = time.time()
        await asyncio.sleep(1.0)
        before = m.remote.counts.total
        await asyncio.sleep(1.0)
        assert m.remote.counts.total == before, "all local after the release"

    assert set(watch.codes) == {200}, dict(watch.codes)
    held = released - under_since
    print(
        f"\nbuffer {m.buffer_seconds:g}s: released {held:.1f}s after the metric went under, "
        f"{released - restarted:.1f}s after the restart"
    )
    # Held for the whole buffer, counted from when the metric went under, not from the restart.
    assert m.buffer_seconds - 0.5 <= held <= m.buffer_seconds + SWITCH_BUDGET
    assert released - restarted < m.buffer_seconds - 1.0


async def test_a_corrupt_state_file_is_reported_and_the_control_plane_starts_anyway(tmp_path):
    m = Model("t5")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "offload-state.json").write_text('{"format": 1, "models": {"default/t5": ')  # cut short
    async with asyncio.timeout(60), stack(tmp_path, m, extra_args=("--state-dir", str(state_dir))) as s:
        assert set(await s.send(m, 20)) == {200}
        status = await s.control_plane.status()
        assert status["models"]["default/t5"]["phase"] == "Standby"
        assert "not JSON" in status["state"]["error"] and str(state_dir) in status["state"]["error"]
        log = s.control_plane.log_text()
        assert "event=state_unreadable" in log and "not JSON" in log
        metrics = await s.control_plane.metrics_text()
        assert 'overspill_state_file_errors_total{operation="read"} 1.0' in metrics
        # The next decision change writes a good file over it.
        s.knob.set("t5", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)
        saved = json.loads((state_dir / "offload-state.json").read_text())
        assert saved["models"]["default/t5"]["phase"] == "Offloading"
        assert (await s.control_plane.status())["state"]["error"] is None


def test_state_dir_is_refused_in_kubernetes_mode(tmp_path: Path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "overspill", "serve", "--kubernetes", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--state-dir is for --manifests" in out.stderr
