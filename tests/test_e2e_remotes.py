"""Several remotes per model, end to end: real Envoy leaves a remote that dies for the next one
by itself, and comes back to the preferred one; requests counted at the client and the backends."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest
from e2e_stack import SWITCH_BUDGET, Model, Stack, stack, wait_until

from overspill.demo.sim import ModelServer

pytestmark = pytest.mark.e2e

# A value that needs every kind of quoting on its way into Envoy (see xds.failover._lua).
ODD_KEY = 'key-a "quoted" \\ ]] %s'
# After a remote is ejected Envoy tries it again 5 s later (xds.failover.BASE_EJECTION_TIME); a second of
# outlier interval and a second for the loaded machine on top.
FAILBACK_BUDGET = 5 + 1 + 4


class TwoRemotes(Model):
    """A model with remotes A (its `remote`, preferred) and B (`backup`), each with its own path
    prefix and headers; only A has an API key."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.backup = ModelServer(f"{self.name}-backup", None, 0.0, f"{self.name}-backup")

    def manifests(self) -> list[dict]:
        docs = super().manifests()
        config = docs[-1]["spec"]["offloadingConfig"]
        first = config.pop("remoteBackend")
        first["headersToAdd"].append({"name": "x-api-key", "value": ODD_KEY})
        config["remoteBackends"] = [
            first,
            {
                "host": self.backup.address,
                "pathPrefix": "/backup",
                "headersToAdd": [{"name": "x-offloaded-by", "value": "overspill-b"}],
            },
        ]
        return docs


CLOSE_RACE = 0.1  # s after A is gone in which Envoy may still write onto a connection A closed


class Burst:
    """Clients sending requests back to back, each result kept with when it came and who served it."""

    def __init__(self, s: Stack, model: Model, clients: int = 8):
        self.s, self.model, self.clients = s, model, clients
        self.results: list[tuple[float, int, str]] = []  # (monotonic time, status, served by)
        self.failed_sent: list[float] = []  # when each failed request was sent
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                async with self.s.session.post(
                    f"{self.s.url}/v1/predict", headers={"Host": self.model.host}, data=b"{}"
                ) as resp:
                    await resp.read()
                    self.results.append((time.monotonic(), resp.status, resp.headers.get("x-served-by", "")))
                    if resp.status != 200:
                        self.failed_sent.append(sent)
            except aiohttp.ClientError as exc:
                self.results.append((time.monotonic(), 0, type(exc).__name__))
                self.failed_sent.append(sent)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 15)

    def errors(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]

    def first_from(self, server: str, after: float) -> float | None:
        return next((t for t, code, by in self.results if t > after and code == 200 and by == server), None)


async def test_dead_remote_is_left_by_envoy_for_the_next_and_traffic_comes_back(tmp_path):
    knob = {
        "type": "External",
        "external": {
            "metric": {"name": "overspill_test_load", "selector": {"matchLabels": {"model": "llm"}}},
            "target": {"type": "Value", "value": "10"},
        },
    }
    # Never over: read to show that the load Envoy reports on the remote side counts each remote's.
    remote_rate = {
        "type": "External",
        "external": {
            "metric": {"name": "envoy:request_rate", "selector": {"matchLabels": {"side": "remote"}}},
            "target": {"type": "Value", "value": "1000000"},
        },
    }
    m = TwoRemotes("llm", percentage=100, buffer_seconds=120, metrics=[knob, remote_rate])
    a, b = m.remote, m.backup
    a.service_time = b.service_time = 0.02
    await b.start()
    try:
        async with stack(tmp_path, m) as s:
            s.knob.set("llm", 50)
            await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
            await asyncio.sleep(0.5)  # the weight is in Envoy

            # Each remote gets its own path prefix, Host and headers; B never sees A's key.
            assert (await s.send(m, 20)).count(200) == 20
            assert a.counts.total == 20
            seen = a.counts.recent[-1]
            assert (seen.path, seen.host) == ("/standby/v1/predict", a.address)
            assert seen.headers["x-api-key"] == ODD_KEY and seen.headers["x-offloaded-by"] == "overspill"
            assert b.counts.total == 0, "B is only the second choice"
            # Envoy's /stats/prometheus: each remote's requests under side="remote" with its index,
            # their response classes on the aggregate cluster, side="remote" too (xds.stats).
            page = await s.envoy.admin_get("/stats/prometheus")
            model = 'namespace="default",model="llm",side="remote"'
            assert re.search(
                rf'^envoy_cluster_upstream_rq_total{{[^}}]*{model},remote_index="0"}} 20$', page, re.M
            )
            assert re.search(rf"^envoy_cluster_upstream_rq_xx{{[^}}]*{model}}} 20$", page, re.M), page
            status = await s.model_status(m)
            assert [r["remote"] for r in status["remotes"]] == [
                f"http://{a.address}/standby",
                f"http://{b.address}/backup",
            ]

            burst = Burst(s, m)
            burst.start()
            await asyncio.sleep(2)
            in_flight = a.counts.inflight
            killed = time.monotonic()
            port = a.port
            await a.stop()
            stopped = time.monotonic()  # A is gone: what it had taken until now may be lost
            await asyncio.sleep(4)

            first_b = burst.first_from(b.name, killed)
            assert first_b is not None, "traffic moved to B"
            status = await s.model_status(m)
            assert status["phase"] == "Offloading", "offloading goes on while B is up"
            rates = {x["name"]: x["value"] for x in status["metrics"]}
            (rate,) = (v for k, v in rates.items() if "envoy:request_rate" in k)
            assert rate > 50, rates
            assert [r["usable"] for r in status["remotes"]] == [False, True], status["remotes"]
            stats = await s.envoy.stats()
            ejected = stats.get(
                "cluster.overspill/default/llm/remote/0.outlier_detection.ejections_enforced_total"
            )

            during = [r for r in burst.results if r[0] > killed]
            seen_b = b.counts.recent[-1]
            assert (seen_b.path, seen_b.host) == ("/backup/v1/predict", b.address)
            assert "x-api-key" not in seen_b.headers, "A's key must not reach B"
            assert seen_b.headers["x-offloaded-by"] == "overspill-b"
            page = await s.envoy.admin_get("/stats/prometheus")
            assert re.search(
                rf'^envoy_cluster_upstream_rq_total{{[^}}]*{model},remote_index="1"}} [1-9]', page, re.M
            )

            await a.start(port)
            back = time.monotonic()
            await wait_until(
                lambda: burst.first_from(a.name, back) is not None, FAILBACK_BUDGET + 5, "traffic back at A"
            )
            first_a = burst.first_from(a.name, back)
            await asyncio.sleep(1)
            await burst.stop()

        errors = burst.errors()
        after_back = [by for t, code, by in burst.results if t > first_a + 0.5 and code == 200]
        print(
            f"failover: {len(burst.results)} requests, {len(errors)} errors at the client "
            f"({in_flight} in flight on A when it was killed); first answer from B "
            f"{first_b - killed:.2f}s after the kill; {len(during)} requests in the 4 s after it; "
            f"A ejected by Envoy {ejected} time(s); traffic back at A {first_a - back:.2f}s after it "
            f"returned; after that {after_back.count(a.name)}/{len(after_back)} at A; "
            f"errors: {[(round(t - killed, 2), code, by) for t, code, by in errors]}"
        )
        # Lost: only requests in flight on A as it went: those it had taken, and those Envoy wrote
        # onto a connection A was closing (a reset after sending, never retried). The in-flight
        # count, read as A began to stop, misses both; so no failure sent after this race.
        assert all(sent <= stopped + CLOSE_RACE for sent in burst.failed_sent), errors
        assert len(errors) <= burst.clients, errors
        assert first_b - killed < 2, "Envoy moved to B within seconds, not at an evaluation"
        assert ejected and ejected >= 1, "Envoy's outlier detection ejected A"
        assert first_a - back <= FAILBACK_BUDGET
        assert after_back and after_back.count(a.name) >= 0.9 * len(after_back), "preference order"
    finally:
        await b.stop()
        await a.stop()
