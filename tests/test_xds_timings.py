"""The control plane's timing histograms and the connected-Envoys gauge, as `/metrics` shows them,
with simulated Envoys (`SimEnvoy`) over real gRPC: a weight decided here is counted once per Envoy
when that Envoy ACKs the response carrying it, and an Envoy that answers late shows as late."""

from __future__ import annotations

import asyncio

import pytest
from test_xds_protocol import BASE, LIMIT, PROTOCOLS, eventually, inline_percent, model
from test_xds_protocol import plane as plane  # noqa: F401  (the fixture: a real server on loopback)

from metrics.instruments import Instruments
from overspill.events import XdsEvents
from reconciler.controller import Controller
from reconciler.store import ObjectStore
from xds.types import ROUTE

LLM = BASE[0]
SLOW = 0.4  # seconds the slow Envoy waits before answering each response


def watch(plane) -> Instruments:  # noqa: F811
    instruments = Instruments()
    plane.xds.callbacks = XdsEvents(instruments, Controller(ObjectStore(), plane.translator.apply))
    return instruments


def decision_to_ack(instruments: Instruments, le: str | None = None) -> float:
    name = "overspill_weight_decision_to_ack_seconds"
    if le is None:
        return instruments.registry.get_sample_value(f"{name}_count") or 0.0
    return instruments.registry.get_sample_value(f"{name}_bucket", {"le": le}) or 0.0


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_weight_change_is_timed_to_each_envoys_ack(plane, delta):  # noqa: F811
    async with asyncio.timeout(LIMIT):
        instruments = watch(plane)
        fast = await plane.client("fast", delta)
        slow = await plane.client("slow", delta, ack_delay=SLOW)
        for c in (fast, slow):
            await c.wait(lambda c: c.runtime_values.get(LLM.runtime_key) == 30)
        await asyncio.sleep(2 * SLOW)  # the slow one's last answers are in
        assert decision_to_ack(instruments) == 0, "a first sync carries no decision"

        plane.apply(model("llm", percent=60))
        for c in (fast, slow):
            await c.wait(lambda c: c.runtime_values.get(LLM.runtime_key) == 60)
        await eventually(lambda: decision_to_ack(instruments) == 2, timeout=3 * SLOW)
        # One model, two Envoys: the fast one within a quarter second, the slow one after its delay.
        assert decision_to_ack(instruments, "0.25") == 1
        assert decision_to_ack(instruments, "2.5") == 2
        total = instruments.registry.get_sample_value("overspill_weight_decision_to_ack_seconds_sum")
        assert SLOW <= total < SLOW + 1.0

        # The same Envoys' push -> ACK of RTDS: every response the slow one answered took SLOW or more.
        rtds = {"type": "RTDS"}
        acked = instruments.registry.get_sample_value("overspill_xds_push_to_ack_seconds_count", rtds)
        quick = instruments.registry.get_sample_value(
            "overspill_xds_push_to_ack_seconds_bucket", rtds | {"le": "0.25"}
        )
        assert acked >= 4 and quick == acked / 2, (acked, quick)

        # An Envoy connecting afterwards takes the weight in its first sync: that was no decision's push.
        late = await plane.client("late", delta)
        await late.wait(lambda c: c.runtime_values.get(LLM.runtime_key) == 60)
        await asyncio.sleep(0.2)
        assert decision_to_ack(instruments) == 2


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_an_envoy_without_weight_layers_is_timed_on_its_routes(plane, delta):  # noqa: F811
    async with asyncio.timeout(LIMIT):
        instruments = watch(plane)
        edge = await plane.client("edge", delta, layers=())
        await edge.wait(lambda c: LLM.route_config in c.held[ROUTE] and inline_percent(c, LLM) == 30)
        await asyncio.sleep(0.3)
        assert decision_to_ack(instruments) == 0

        plane.apply(model("llm", percent=45), model("embed", percent=45))
        await edge.wait(lambda c: inline_percent(c, LLM) == 45)
        await eventually(lambda: decision_to_ack(instruments) == 2)  # two models' weights, one Envoy
        assert decision_to_ack(instruments, "0.25") == 2


async def test_connected_envoys_are_counted_per_scope_and_protocol(plane):  # noqa: F811
    async with asyncio.timeout(LIMIT):
        instruments = watch(plane)

        def connected(scope: str, protocol: str) -> float | None:
            labels = {"scope": scope, "protocol": protocol}
            return instruments.registry.get_sample_value("overspill_xds_connected_envoys", labels)

        gateways = [await plane.client(f"gw{i}", False) for i in range(2)]
        team = await plane.client("team", True, metadata={"overspill": {"namespaces": ["search"]}})
        await eventually(
            lambda: connected("all", "sotw") == 2 and connected("namespaces=search", "delta") == 1
        )
        await gateways[0].stop()
        await eventually(lambda: connected("all", "sotw") == 1)
        await team.stop()
        await eventually(lambda: connected("namespaces=search", "delta") is None)  # no Envoy left: no series
        assert connected("all", "sotw") == 1
