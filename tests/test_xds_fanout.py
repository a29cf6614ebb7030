"""Fan-out: changes that come together reach each Envoy in few pushes, and a lone one goes at once.

The same loopback server and simulated Envoys as `test_xds_protocol`; no timing is asserted,
only what each node received and holds.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.rpc import Status
from test_xds_protocol import BASE, LIMIT, PROTOCOLS, QUIET, eventually, model, serving, synced
from test_xds_protocol import plane as plane  # noqa: F401  (the fixture: a real server on loopback)

from overspill.sim.envoy import SimEnvoy, encode
from xds import cache, runtime, wire
from xds import server as server_module
from xds.cache import Scope
from xds.delta import Delta
from xds.server import ByteBudget
from xds.sotw import StateOfTheWorld
from xds.types import CLUSTER, ENDPOINT, RUNTIME

MODELS = [model(f"m{i:02d}", "burst") for i in range(20)]


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_burst_of_200_weight_changes_reaches_each_node_in_few_pushes_ending_at_the_latest(
    plane, delta
):
    async with asyncio.timeout(LIMIT):
        plane.apply(*MODELS)
        clients = [await plane.client(f"edge-{i}", delta) for i in range(3)]
        for c in clients:
            await synced(plane, c, BASE + MODELS)
        marks = [len(c.received) for c in clients]
        rng = random.Random(9)
        latest = {}
        started = time.monotonic()
        for _ in range(200):  # as a storm of decisions: one model at a time, a few ms apart
            r = replace(rng.choice(MODELS), remote_percent=float(rng.randrange(1, 100)))
            plane.apply(r)
            latest[r.runtime_key] = r.remote_percent
            await asyncio.sleep(0.002)
        # At most one push per interval (however slow this machine made the burst), and the last.
        most = 3 + (time.monotonic() - started) / cache.MIN_INTERVAL
        for c in clients:
            await c.wait(lambda c: all(c.runtime_values.get(k) == v for k, v in latest.items()), 10)
        await asyncio.sleep(QUIET)
        for c, mark in zip(clients, marks, strict=True):
            rtds = [r for r in c.received[mark:] if r.type_url == RUNTIME]
            assert 1 <= len(rtds) <= min(most, 199), (c.node_id, len(rtds), most)  # not one per change
            assert {r.type_url for r in c.received[mark:]} == {RUNTIME}  # and nothing else
            assert all(c.runtime_values.get(k) == v for k, v in latest.items())


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_weight_change_builds_the_runtime_response_alone(plane, delta, monkeypatch):
    """Every wake looks at each type, but only a type with something new gets a response built:
    at a thousand Envoys, building the others to find them empty was a fifth of a push."""
    async with asyncio.timeout(LIMIT):
        clients = [await plane.client(f"edge-{i}", delta) for i in range(3)]
        for c in clients:
            await synced(plane, c, BASE)

        async def change(percent: int) -> None:
            changed = replace(BASE[0], remote_percent=percent)
            plane.apply(changed)
            for c in clients:
                await c.wait(lambda c: c.runtime_values.get(changed.runtime_key) == percent, 2)
            await asyncio.sleep(QUIET)

        await change(70)  # the first wake after a sync also looks again at what the routes use
        built: list[str] = []
        for protocol in (StateOfTheWorld, Delta):

            def counted(self, stream, type_url, sub, _respond=protocol.respond):
                built.append(type_url)
                return _respond(self, stream, type_url, sub)

            monkeypatch.setattr(protocol, "respond", counted)
        await change(75)
        assert built == [RUNTIME] * len(clients)


def test_a_lone_change_waits_only_to_settle_and_a_burst_at_most_the_interval():
    # A change after a quiet spell goes out after the few ms it waits for company ...
    assert cache.flush_delay(since_flush=60.0, streams=1) == cache.SETTLE
    assert cache.flush_delay(since_flush=60.0, streams=1000) == cache.SETTLE
    # ... one during a burst waits for the rest of the interval, which grows with the fleet
    # (each flush costs every stream a push and an ACK) but never past the maximum.
    few, many, huge = (cache.flush_delay(0.0, n) for n in (3, 1000, 100_000))
    assert cache.SETTLE < few < many <= huge == cache.MAX_INTERVAL
    assert cache.flush_delay(since_flush=few / 2, streams=3) == pytest.approx(few / 2)


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_model_added_and_removed_within_one_flush_never_reaches_a_node(plane, delta, monkeypatch):
    async with asyncio.timeout(LIMIT):
        c = await plane.client("edge", delta)
        await synced(plane, c, BASE)
        await asyncio.sleep(QUIET)
        mark = len(c.received)
        for bound in ("MIN_INTERVAL", "MAX_INTERVAL"):  # nothing flushes but by hand from here
            monkeypatch.setattr(cache, bound, 3600.0)
        brief = model("brief")
        plane.apply(brief)
        plane.apply(remove=(brief,))
        plane.apply(replace(BASE[0], remote_percent=2))
        await asyncio.sleep(QUIET)
        assert len(c.received) == mark  # held for the flush
        plane.translator.cache.flush()
        await c.wait(lambda c: c.runtime_values.get(BASE[0].runtime_key) == 2, LIMIT / 2)
        await asyncio.sleep(QUIET)
        assert [r.type_url for r in c.received[mark:]] == [RUNTIME]  # one push: the weight alone


# --- the request reader ---


def test_sotw_requests_read_as_envoy_data_plane_reads_them():
    layers = runtime.layer_names()
    requests = [
        DiscoveryRequest(type_url=RUNTIME, version_info="12", response_nonce="3-4", resource_names=layers),
        DiscoveryRequest(type_url=ENDPOINT, node=Node(id="n", cluster="c"), resource_names=['a"b', "c\x22"]),
        DiscoveryRequest(type_url=RUNTIME),
        DiscoveryRequest(
            type_url=RUNTIME, response_nonce="1", error_detail=Status(code=3, message="bad layer")
        ),
    ]
    for req in requests:
        names = frozenset(req.resource_names)
        # as Envoy writes it (fields in order), and as a client appending a long name list writes it
        for data in (bytes(req), encode(replace_nonce(req, req.response_nonce))):
            for _ in range(2):  # read in full, then from the names seen before
                got = wire.parse_sotw_request(data)
                assert got.resource_names == names
                assert (got.type_url, got.version_info, got.response_nonce) == (
                    req.type_url,
                    req.version_info,
                    req.response_nonce,
                )
                assert (got.node.id if got.node else None) == (req.node.id if req.node else None)
                assert (got.error_detail.message if got.error_detail else "") == (
                    req.error_detail.message if req.error_detail else ""
                )
    # Names split over two runs (concatenated messages merge) are all taken.
    split = bytes(requests[0]) + bytes(DiscoveryRequest(resource_names=["extra"]))
    assert wire.parse_sotw_request(split).resource_names == frozenset(layers) | {"extra"}
    # Nodes asking for the same names share one set.
    again = wire.parse_sotw_request(bytes(replace_nonce(requests[0], "9-9")))
    assert again.resource_names is wire.parse_sotw_request(bytes(requests[0])).resource_names


def replace_nonce(req: DiscoveryRequest, nonce: str) -> DiscoveryRequest:
    """A copy with another nonce (`encode` empties the copy's names as it frames them)."""
    return DiscoveryRequest(
        type_url=req.type_url,
        version_info=req.version_info,
        response_nonce=nonce,
        resource_names=list(req.resource_names),
        node=req.node,
        error_detail=req.error_detail,
    )


def test_shared_response_bodies_carry_each_streams_own_nonce():
    resources = [wire.any_bytes(RUNTIME, wire.runtime(f"layer{i}", [])) for i in range(3)]
    for nonce in ("1-1", "2-1"):
        sotw = DiscoveryResponse.FromString(
            wire.discovery_body("7", RUNTIME, resources) + wire.text(5, nonce)
        )
        assert (sotw.version_info, sotw.nonce, len(sotw.resources)) == ("7", nonce, 3)
        delta = DeltaDiscoveryResponse.FromString(
            wire.delta_response("7", RUNTIME, nonce, [wire.delta_resource("a", "v", resources[0])], ["gone"])
        )
        assert (delta.system_version_info, delta.nonce, delta.removed_resources) == ("7", nonce, ["gone"])
        assert [r.name for r in delta.resources] == ["a"]


# --- the byte budget of large responses ---


async def test_large_responses_take_turns_within_the_budget_first_come_first_served():
    async with asyncio.timeout(LIMIT):
        budget = ByteBudget(100)
        await budget.acquire((1, RUNTIME), 60)
        waiting = [asyncio.create_task(budget.acquire((sid, RUNTIME), 60)) for sid in (2, 3, 4)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting) and budget.used == 60
        budget.release((1, RUNTIME))  # the Envoy answered: the next in line goes, and only it
        await asyncio.sleep(0.05)
        assert [t.done() for t in waiting] == [True, False, False] and budget.used == 60
        waiting[1].cancel()  # that stream ended while waiting: it is skipped
        budget.release((2, RUNTIME))
        await waiting[2]
        assert budget.used == 60
        alone = asyncio.create_task(budget.acquire((5, RUNTIME), 500))  # larger than the whole budget
        await asyncio.sleep(0.05)
        assert not alone.done()  # it waits to go alone
        budget.release((4, RUNTIME))
        await alone
        assert budget.used == 500


async def test_a_share_never_answered_is_given_back_after_a_while(monkeypatch):
    async with asyncio.timeout(LIMIT):
        monkeypatch.setattr(ByteBudget, "STALE", 0.2)
        budget = ByteBudget(100)
        await budget.acquire((1, RUNTIME), 80)  # a stuck Envoy never answers this one
        await budget.acquire((2, RUNTIME), 80)  # goes once the stuck one's share has gone stale
        assert budget.used == 80


async def test_first_syncs_wait_for_room_before_their_responses_are_built(monkeypatch):
    """Envoys reconnecting all at once (a restarted control plane): each first response waits for
    room in the budget before it is built, so the server holds the whole state for those it is
    sending, not for every Envoy waiting."""
    monkeypatch.setattr(server_module, "LARGE", 1024)
    async with asyncio.timeout(LIMIT), serving(MODELS) as p:
        size = p.translator.cache.view(Scope()).size_of(CLUSTER)
        assert size > 1024
        p.xds.budget = ByteBudget(size * 3 // 2)  # room for one node's clusters at a time
        for i in range(10):  # they answer only after 30 s: the first keeps its share meanwhile
            node = SimEnvoy(p.target, node_id=f"n{i}", ack_delay=30.0, decode=True)
            p.clients.append(node)
            await node.start()
        await eventually(
            lambda: len(p.xds.streams) == 10 and all(CLUSTER in s.types for s in p.xds.streams.values())
        )
        await asyncio.sleep(QUIET)
        built = [s.node_id for s in p.xds.streams.values() if s.types[CLUSTER].sent_version]
        assert len(built) == 1, built
        assert p.xds.budget.used <= p.xds.budget.limit
