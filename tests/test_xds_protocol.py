"""The xDS protocol as a fleet sees it: a real gRPC server (`XdsServer` on loopback) and simulated
Envoys (`SimEnvoy`) speaking SotW or Delta over ADS, plus raw single-type streams.

Each test is bounded in time; the fixture stops every client and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import grpc
import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)

from api.crd import RemoteBackend
from api.desired import ModelRoute, service_domains
from metrics.instruments import Instruments
from overspill.events import XdsEvents
from overspill.sim.envoy import SimEnvoy
from reconciler.controller import Controller
from reconciler.store import ObjectStore
from xds import resources as res
from xds import runtime
from xds import stream as stream_module
from xds.resources import LISTENER_NAME
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.stream import Stream
from xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME, SCOPED_ROUTE, SHORT

PROTOCOLS = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
LIMIT = 20.0  # seconds any one test may take
QUIET = 0.5  # seconds of silence that show nothing more is coming
PLAIN = RemoteBackend("10.9.8.7", 8080, "http")
MISSING_CA = "/nonexistent/overspill-test-ca.pem"


def model(
    name: str,
    namespace: str = "inference",
    percent: float = 0.0,
    remote: RemoteBackend | None = PLAIN,
    labels: dict[str, str] | None = None,
    endpoints: tuple[tuple[str, int], ...] = (("10.0.0.1", 8000), ("10.0.0.2", 8000)),
) -> ModelRoute:
    return ModelRoute(
        namespace,
        name,
        service_domains(name, namespace, 80),
        endpoints,
        (remote,) if remote else (),
        percent,
        tuple(sorted((labels or {}).items())),
    )


def clusters_of(*routes: ModelRoute) -> set[str]:
    return {
        c for r in routes for c in ((r.local_cluster, r.remote_cluster) if r.remote else (r.local_cluster,))
    }


def vhost_name(r: ModelRoute) -> str:
    return f"{r.namespace}/{r.name}"


BASE = [model("llm", percent=30), model("embed", percent=0), model("rerank", "search", percent=100)]


class Recorder:
    """A `reject` hook that NACKs nothing and keeps every response's decoded resources, in the
    order of `client.received`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, type_url: str, resources: dict) -> str | None:
        self.seen.append((type_url, resources))
        return None


@dataclass
class Plane:
    translator: Translator
    xds: XdsServer
    target: str
    clients: list[SimEnvoy] = field(default_factory=list)

    def apply(self, *routes: ModelRoute, remove: tuple[ModelRoute, ...] = ()) -> None:
        changes: dict[tuple[str, str], ModelRoute | None] = {(r.namespace, r.name): r for r in routes}
        changes.update({(r.namespace, r.name): None for r in remove})
        self.translator.apply(changes)

    async def client(self, node_id: str, delta: bool, **kwargs) -> SimEnvoy:
        c = SimEnvoy(self.target, node_id=node_id, delta=delta, decode=True, **kwargs)
        self.clients.append(c)
        await c.start()
        return c

    def stream(self, node_id: str) -> Stream:
        found = [s for s in self.xds.streams.values() if s.node_id == node_id]
        assert len(found) == 1, f"{node_id}: {len(found)} streams"
        return found[0]


@contextlib.asynccontextmanager
async def serving(routes: list[ModelRoute]) -> AsyncIterator[Plane]:
    """A server with `routes` published on a port of its own; its clients and itself stopped after."""
    translator = Translator("127.0.0.1", 10000)
    translator.publish(routes)
    xds = XdsServer(translator.cache)
    server, port = await start_server(xds, "127.0.0.1", 0)
    p = Plane(translator, xds, f"127.0.0.1:{port}")
    try:
        yield p
    finally:
        async with asyncio.timeout(10):
            for c in p.clients:
                c.resume()
                await c.stop()
            await server.stop(None)


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    async with serving(BASE) as p:
        yield p


# --- raw streams ---

ADS_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ADS_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


class RawStream:
    """One xDS stream by hand: requests queued, responses collected (or never read)."""

    def __init__(self, target: str, method: str, delta: bool, read: bool = True):
        self.target, self.method, self.delta, self.read = target, method, delta, read
        self.got: list = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        response = DeltaDiscoveryResponse if self.delta else DiscoveryResponse
        call = self._channel.stream_stream(
            self.method, request_serializer=bytes, response_deserializer=response.FromString
        )
        self._call = call(self._requests())
        if self.read:
            self._task = asyncio.create_task(self._read())

    def send(self, req) -> None:
        self._queue.put_nowait(req)

    async def _requests(self):
        while (req := await self._queue.get()) is not None:
            yield req

    async def _read(self) -> None:
        async for resp in self._call:
            self.got.append(resp)
            self._changed.set()

    async def until(self, predicate: Callable[[list], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.got):
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        self._call.cancel()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()


def ack(resp, delta: bool, names: list[str]):
    if delta:
        return DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
    return DiscoveryRequest(
        type_url=resp.type_url,
        version_info=resp.version_info,
        response_nonce=resp.nonce,
        resource_names=names,
    )


def names_in(resp, delta: bool) -> set[str]:
    if delta:
        return {r.name for r in resp.resources}
    return {getattr(a.unpack(), "name", "") for a in resp.resources}


# --- what a client holds ---


def vhosts(c: SimEnvoy) -> set[str]:
    """The virtual hosts a request can reach: those of the route configurations its scopes name."""
    return {
        vh.name
        for scope in c.held[SCOPED_ROUTE].values()
        if (rc := c.held[ROUTE].get(scope.route_configuration_name)) is not None
        for vh in rc.virtual_hosts
    }


def scopes_of(*routes: ModelRoute) -> dict[str, str]:
    return {h: r.route_config for r in routes for h in r.hosts}


def holds(c: SimEnvoy, routes: list[ModelRoute]) -> bool:
    """The client holds exactly these models: clusters, endpoints, scopes, routes, weights."""
    return (
        set(c.held[CLUSTER]) == clusters_of(*routes)
        and set(c.held[ENDPOINT]) == {r.local_cluster for r in routes}
        and {h: s.route_configuration_name for h, s in c.held[SCOPED_ROUTE].items()} == scopes_of(*routes)
        and set(c.held[ROUTE]) == {r.route_config for r in routes}
        and vhosts(c) == {vhost_name(r) for r in routes}
        and c.runtime_values == {r.runtime_key: r.remote_percent for r in routes if r.remote_percent}
        and LISTENER_NAME in c.held[LISTENER]
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def synced(p: Plane, c: SimEnvoy, routes: list[ModelRoute], timeout: float = 5.0) -> None:
    """Until the client holds `routes` and its stream has nothing in flight."""
    await c.wait(lambda c: holds(c, routes), timeout)
    await eventually(lambda: not any(st.pending for st in p.stream(c.node_id).types.values()), timeout)


def layer_with(resources: dict, key: str) -> bool:
    return any(layer.layer and key in layer.layer.to_dict() for layer in resources.values())


def first(seen: list[tuple[str, dict]], type_url: str, test: Callable[[dict], bool], start: int = 0) -> int:
    for i in range(start, len(seen)):
        if seen[i][0] == type_url and test(seen[i][1]):
            return i
    raise AssertionError(f"no {SHORT[type_url]} response after #{start} matches")


def route_has(resources: dict, vhost: str) -> bool:
    return any(vhost in {vh.name for vh in rc.virtual_hosts} for rc in resources.values())


# --- 1. initial sync ---


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_initial_sync_delivers_clusters_endpoints_listener_routes_and_all_runtime_layers(plane, delta):
    async with asyncio.timeout(LIMIT):
        c = await plane.client("edge", delta)
        await synced(plane, c, BASE)
        assert set(c.held[RUNTIME]) == set(runtime.layer_names())  # all 64 layers, empty ones too
        assert len(c.held[RUNTIME]) == 64
        # embed is at 0 %: no key, its route's default (0) applies
        assert c.runtime_values == {"overspill.inference.llm": 30, "overspill.search.rerank": 100}
        cla = c.held[ENDPOINT][BASE[0].local_cluster]
        assert {e.endpoint.address.socket_address.address for e in cla.endpoints[0].lb_endpoints} == {
            "10.0.0.1",
            "10.0.0.2",
        }
        (llm,) = c.held[ROUTE][BASE[0].route_config].virtual_hosts
        assert llm.name == "inference/llm"
        assert c.held[SCOPED_ROUTE]["llm.inference"].route_configuration_name == BASE[0].route_config
        assert llm.routes[0].match.runtime_fraction.runtime_key == "overspill.inference.llm"
        assert c.held[LISTENER][LISTENER_NAME].address.socket_address.port_value == 10000
        assert not any(r.nacked for r in c.received)


# --- 2. a weight change is one runtime layer ---


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_weight_change_sends_one_runtime_layer_and_nothing_else(plane, delta):
    async with asyncio.timeout(LIMIT):
        clients = [await plane.client(f"edge-{i}", delta) for i in range(3)]
        for c in clients:
            await synced(plane, c, BASE)
        marks = [len(c.received) for c in clients]
        changed = replace(BASE[0], remote_percent=75)
        plane.apply(changed)
        for c in clients:
            await c.wait(lambda c: c.runtime_values.get(changed.runtime_key) == 75, 2)
        await asyncio.sleep(QUIET)
        shard = runtime.layer_names()[runtime.shard_of(changed.runtime_key)]
        for c, mark in zip(clients, marks, strict=True):
            after = c.received[mark:]
            assert [SHORT[r.type_url] for r in after] == ["RTDS"], c.node_id
            assert after[0].names == (shard,)  # the one layer holding the key, for SotW too
            assert c.runtime_values[BASE[2].runtime_key] == 100  # the other layers are kept
            assert len(c.held[RUNTIME]) == 64


# --- 2b. a node without the weight layers (a hand-written ADS-only bootstrap) ---


def holds_inline(c: SimEnvoy, routes: list[ModelRoute]) -> bool:
    """The node holds these models with each weight written into its routes (it has no layers)."""
    return (
        set(c.held[ROUTE]) == {r.route_config for r in routes}
        and set(c.held[CLUSTER]) == clusters_of(*routes)
        and all(inline_percent(c, r) == r.remote_percent for r in routes if r.remote is not None)
        and not c.held[RUNTIME]
    )


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_node_without_weight_layers_gets_the_weights_in_its_routes(plane, delta, caplog):
    async with asyncio.timeout(LIMIT):
        rtds = await plane.client("gateway", delta)
        ads_only = await plane.client("hand-written", delta, layers=())
        await synced(plane, rtds, BASE)
        await ads_only.wait(lambda c: holds_inline(c, BASE), 5)
        assert all(inline_percent(rtds, r) == 0 for r in BASE)  # the RTDS node's routes: unchanged
        plain, inline = plane.stream("gateway"), plane.stream("hand-written")
        assert (plain.weight_layers, inline.weight_layers) == (True, False)
        assert plain.view is inline.view  # one view: its two forms of routes, not a view per node
        described = inline.describe()
        assert described["weightLayers"] is False and described["weightLayersSubscribed"] == 0
        assert "use `overspill bootstrap`" in described["warnings"][0]
        assert plain.describe()["warnings"] == []
        warned = [r.getMessage() for r in caplog.records if "event=no_weight_layers" in r.getMessage()]
        assert len(warned) == 1 and "node=hand-written cluster=sim" in warned[0], warned

        # A weight change: one layer to the RTDS node, that model's routes to the other.
        await asyncio.sleep(QUIET)
        marks = len(rtds.received), len(ads_only.received)
        changed = replace(BASE[0], remote_percent=75)
        plane.apply(changed)
        await ads_only.wait(lambda c: inline_percent(c, changed) == 75, 2)
        await rtds.wait(lambda c: c.runtime_values.get(changed.runtime_key) == 75, 2)
        await asyncio.sleep(QUIET)
        assert [SHORT[r.type_url] for r in rtds.received[marks[0] :]] == ["RTDS"]
        after = ads_only.received[marks[1] :]
        assert [(SHORT[r.type_url], r.names) for r in after] == [("RDS", (changed.route_config,))]

        # A new model: its routes come at once, weight written in, with no wait for RTDS.
        new = model("chat", percent=40)
        started = time.monotonic()
        plane.apply(new)
        await ads_only.wait(lambda c: holds_inline(c, [changed, *BASE[1:], new]), 2)
        assert time.monotonic() - started < 1.0
        await synced(plane, rtds, [changed, *BASE[1:], new])
        assert inline_percent(rtds, new) == 0
        assert not any("route_hold_timeout" in r.getMessage() for r in caplog.records)
        assert not any(r.nacked for r in (*rtds.received, *ads_only.received))
        # Once per stream: later requests and route updates log nothing more.
        assert sum("event=no_weight_layers" in r.getMessage() for r in caplog.records) == 1


async def test_the_gauge_counts_streams_without_weight_layers_while_they_last(plane):
    async with asyncio.timeout(LIMIT):
        instruments = Instruments()
        plane.xds.callbacks = XdsEvents(instruments, Controller(ObjectStore(), plane.translator.apply))

        def gauge() -> float | None:
            name = "overspill_xds_streams_without_weight_layers"
            return instruments.registry.get_sample_value(name, {"node_cluster": "sim"})

        a = await plane.client("a", False, layers=())
        late = await plane.client("late", True, layers=())
        await plane.client("gateway", False)
        await eventually(lambda: gauge() == 2)
        late.subscribe(RUNTIME, set(runtime.layer_names()))  # it subscribes late: no longer counted
        await eventually(lambda: gauge() == 1)
        await late.wait(lambda c: holds(c, BASE))  # its routes back without weights, the layers taken
        await a.stop()
        await eventually(lambda: gauge() is None)  # the last one gone: no series left


# --- 3. ordering: clusters, endpoints and weights before the routes that use them ---


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_new_model_clusters_endpoints_and_weight_arrive_before_its_route(plane, delta):
    async with asyncio.timeout(LIMIT):
        ack_delay = 0.4
        fast_log, slow_log = Recorder(), Recorder()
        fast = await plane.client("fast", delta, reject=fast_log)
        slow = await plane.client("slow", delta, reject=slow_log)
        for c in (fast, slow):
            await synced(plane, c, BASE)
        slow.ack_delay = ack_delay  # from now on it answers every response late
        marks = {c.node_id: len(c.received) for c in (fast, slow)}
        new = model("chat", percent=40)
        plane.apply(new)

        held_seen = False
        deadline = time.monotonic() + 10
        while not (vhost_name(new) in vhosts(slow) and vhost_name(new) in vhosts(fast)):
            rds = plane.stream("slow").describe()["types"]["RDS"]
            held_seen |= rds["routeHeldSeconds"] is not None
            assert time.monotonic() < deadline, "the new route never arrived"
            await asyncio.sleep(0.02)
        assert held_seen, "the slow node's route update was never held for its clusters"

        for c, log in ((fast, fast_log), (slow, slow_log)):
            assert len(log.seen) == len(c.received)
            start = marks[c.node_id]
            i_rds = first(log.seen, ROUTE, lambda r: route_has(r, vhost_name(new)), start)
            i_cds = first(log.seen, CLUSTER, lambda r: clusters_of(new) <= set(r), start)
            i_eds = first(log.seen, ENDPOINT, lambda r: new.local_cluster in r, start)
            i_rtds = first(log.seen, RUNTIME, lambda r: layer_with(r, new.runtime_key), start)
            assert i_cds < i_rds and i_eds < i_rds and i_rtds < i_rds, (
                c.node_id,
                i_cds,
                i_eds,
                i_rtds,
                i_rds,
            )
            assert not any(route_has(r, vhost_name(new)) for t, r in log.seen[:i_rds] if t == ROUTE)

        # The slow node answers each response `ack_delay` late: its route waited for those answers.
        at = [r.at for r in slow.received]
        i_rds = first(slow_log.seen, ROUTE, lambda r: route_has(r, vhost_name(new)), marks["slow"])
        i_eds = first(slow_log.seen, ENDPOINT, lambda r: new.local_cluster in r, marks["slow"])
        i_cds = first(slow_log.seen, CLUSTER, lambda r: clusters_of(new) <= set(r), marks["slow"])
        assert at[i_rds] - at[i_eds] >= 0.9 * ack_delay
        assert at[i_rds] - at[i_cds] >= 1.9 * ack_delay  # CDS answered, then EDS asked and answered
        await synced(plane, slow, [*BASE, new], timeout=5)


# --- 4. make-before-break ---


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_removed_model_leaves_routes_before_its_clusters_leave(plane, delta):
    async with asyncio.timeout(LIMIT):
        ack_delay = 0.3
        logs = {"fast": Recorder(), "slow": Recorder()}
        fast = await plane.client("fast", delta, reject=logs["fast"])
        slow = await plane.client("slow", delta, reject=logs["slow"])
        for c in (fast, slow):
            await synced(plane, c, BASE)
        slow.ack_delay = ack_delay
        gone = BASE[0]
        marks = {c.node_id: len(c.received) for c in (fast, slow)}
        plane.apply(remove=(gone,))
        for c in (fast, slow):
            await synced(plane, c, BASE[1:], timeout=10)

        hosts = set(gone.hosts)
        for c in (fast, slow):
            seen, start = logs[c.node_id].seen, marks[c.node_id]
            # The model's scopes go first: from then on no request reaches its routes.
            if delta:
                i_srds = next(i for i in range(start, len(seen)) if hosts & set(c.received[i].removed))
                assert set(c.received[i_srds].removed) == hosts
            else:
                i_srds = first(seen, SCOPED_ROUTE, lambda r: not hosts & set(r), start)
                assert set(seen[i_srds][1]) == set(scopes_of(*BASE[1:]))
            if delta:
                i_cds = next(
                    i for i in range(start, len(seen)) if clusters_of(gone) & set(c.received[i].removed)
                )
                assert set(c.received[i_cds].removed) == clusters_of(gone)
                assert all(not c.received[i].removed for i in range(start, i_cds) if seen[i][0] == CLUSTER)
            else:
                i_cds = first(seen, CLUSTER, lambda r: not clusters_of(gone) & set(r), start)
                # Every CDS before it still carried the clusters the node's routes used.
                assert all(clusters_of(gone) <= set(r) for t, r in seen[start:i_cds] if t == CLUSTER)
            assert i_srds < i_cds, (c.node_id, i_srds, i_cds)
            if c is slow:  # the clusters left only after the node took the scopes and dropped the routes
                assert c.received[i_cds].at - c.received[i_srds].at >= 0.9 * ack_delay
            # Envoy ignores a route configuration removed over Delta; none is sent.
            assert not any(r.removed for r in c.received[start:] if r.type_url == ROUTE)
            assert gone.runtime_key not in c.runtime_values


def single_route(resources: dict, r: ModelRoute) -> bool:
    rc = resources.get(r.route_config)
    return rc is not None and len(rc.virtual_hosts[0].routes) == 1


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_dropped_remote_leaves_the_routes_before_its_cluster_leaves(plane, delta):
    async with asyncio.timeout(LIMIT):
        ack_delay = 0.3
        log = Recorder()
        slow = await plane.client("slow", delta, reject=log)
        await synced(plane, slow, BASE)
        slow.ack_delay = ack_delay
        local_only = replace(BASE[0], remotes=())
        mark = len(slow.received)
        plane.apply(local_only)
        await synced(plane, slow, [local_only, *BASE[1:]], timeout=10)
        i_rds = first(log.seen, ROUTE, lambda r: single_route(r, local_only), mark)
        gone = BASE[0].remote_cluster
        if delta:
            i_cds = next(i for i in range(mark, len(log.seen)) if gone in slow.received[i].removed)
        else:
            i_cds = first(log.seen, CLUSTER, lambda r: gone not in r, mark)
        assert i_rds < i_cds
        assert slow.received[i_cds].at - slow.received[i_rds].at >= 0.9 * ack_delay


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_remote_cluster_stays_while_the_node_rejects_routes_without_it(plane, delta):
    async with asyncio.timeout(LIMIT):
        refuse = {"routes": True}

        def reject(type_url: str, resources: dict) -> str | None:
            return "rejected" if type_url == ROUTE and refuse["routes"] else None

        c = await plane.client("edge", delta)
        await synced(plane, c, BASE)
        c.reject = reject
        mark = len(c.received)
        local_only = replace(BASE[0], remotes=())
        plane.apply(local_only)
        await c.wait(lambda c: any(r.nacked for r in c.received[mark:]), 3)
        await asyncio.sleep(1.0)
        assert BASE[0].remote_cluster in c.held[CLUSTER]  # its kept routes still send there
        assert not any(BASE[0].remote_cluster in r.removed for r in c.received[mark:])
        # Routes it takes (the model's, changed again) let the cluster go.
        refuse["routes"] = False
        plane.apply(replace(local_only, domains=(*local_only.domains, "llm.example.com")))
        await c.wait(lambda c: BASE[0].remote_cluster not in c.held[CLUSTER], 3)


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_clusters_stay_while_the_node_rejects_scopes_without_them(plane, delta):
    async with asyncio.timeout(LIMIT):
        gone = BASE[0]
        refuse = {"scopes": False}

        def reject(type_url: str, resources: dict) -> str | None:
            if type_url == SCOPED_ROUTE and refuse["scopes"]:
                return "scoped route configuration rejected"
            return None

        c = await plane.client("edge", delta, reject=reject)
        await synced(plane, c, BASE)
        refuse["scopes"] = True
        mark = len(c.received)
        plane.apply(remove=(gone,))
        await c.wait(lambda c: any(r.nacked for r in c.received[mark:]), 3)
        await asyncio.sleep(1.0)
        # The scopes it kept still lead to the model's routes, and those to its clusters: they stay.
        assert clusters_of(gone) <= set(c.held[CLUSTER])
        assert not any(clusters_of(gone) & set(r.removed) for r in c.received[mark:])
        assert vhost_name(gone) in vhosts(c)
        assert sum(r.type_url == SCOPED_ROUTE for r in c.received[mark:]) == 1  # the rejected scopes, once

        # Once it takes scopes without the model, the routes and clusters go.
        refuse["scopes"] = False
        plane.apply(gone)  # back (Delta resends nothing it rejected: a removal must come anew)
        await synced(plane, c, BASE)
        plane.apply(remove=(gone,))
        await synced(plane, c, BASE[1:])


async def test_route_hold_is_bounded_for_a_node_that_never_answers_its_clusters(plane, monkeypatch, caplog):
    monkeypatch.setattr(stream_module, "HOLD_LIMIT", 0.5)
    async with asyncio.timeout(LIMIT):
        log = Recorder()
        c = await plane.client("slow", False, reject=log)
        await synced(plane, c, BASE)
        c.ack_delay = 3.0  # from now on it answers everything 3 s late
        mark = len(c.received)
        # A new standby: a new remote cluster, and routes that send its Host.
        moved = replace(BASE[0], remotes=(RemoteBackend("10.9.8.8", 8080, "http"),))
        plane.apply(moved)

        def rewrites(rc) -> str:
            return rc.virtual_hosts[0].routes[0].route.host_rewrite_literal

        def remote_at(cluster) -> str:
            (endpoint,) = cluster.load_assignment.endpoints[0].lb_endpoints
            return endpoint.endpoint.address.socket_address.address

        await c.wait(lambda c: rewrites(c.held[ROUTE][moved.route_config]) == "10.9.8.8:8080", 2.5)
        i_cds = first(log.seen, CLUSTER, lambda r: remote_at(r[moved.remote_cluster]) == "10.9.8.8", mark)
        i_rds = first(log.seen, ROUTE, lambda r: rewrites(r[moved.route_config]) == "10.9.8.8:8080", mark)
        waited = c.received[i_rds].at - c.received[i_cds].at
        assert 0.4 <= waited < 2.0, waited  # held, then sent anyway once the hold limit passed
        assert any("route_hold_timeout" in r.getMessage() for r in caplog.records)


# --- 5. NACK hold ---


def missing_ca(type_url: str, name: str, cluster) -> str | None:
    """What Envoy says of a TLS cluster whose CA file does not exist (it takes the other clusters)."""
    if type_url != CLUSTER or cluster.transport_socket is None:
        return None
    tls = cluster.transport_socket.typed_config.unpack()
    assert isinstance(tls, UpstreamTlsContext)
    ca = tls.common_tls_context.validation_context
    if ca is None or ca.trusted_ca.filename != MISSING_CA:
        return None
    return (
        f"Error adding/updating cluster(s) {name}: Failed to load trusted CA certificates from {MISSING_CA}"
    )


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_nacked_cluster_version_is_held_and_reported_and_others_unaffected(plane, delta):
    async with asyncio.timeout(LIMIT):
        picky = await plane.client("picky", delta, invalid=missing_ca)
        other = await plane.client("other", delta)
        for c in (picky, other):
            await synced(plane, c, BASE)
        broken = model("broken", remote=RemoteBackend("llm.example.com", 443, "https", ca_file=MISSING_CA))
        plane.apply(broken)

        await picky.wait(lambda c: any(r.nacked for r in c.received), 3)
        nacked = next(r for r in picky.received if r.nacked)
        assert broken.remote_cluster in nacked.names
        # For a second nothing about the clusters changes (an unrelated weight moves): the rejected
        # version is never sent again.
        plane.apply(replace(BASE[1], remote_percent=5))
        await asyncio.sleep(1.0)
        cds = [r for r in picky.received if r.type_url == CLUSTER]
        assert [r.version for r in cds].count(nacked.version) == 1
        assert sum(r.nacked for r in picky.received) == 1
        assert picky.runtime_values[BASE[1].runtime_key] == 5  # the node still takes other updates
        # It keeps its previous clusters and takes the model's valid one, as Envoy does.
        assert set(picky.held[CLUSTER]) == clusters_of(*BASE) | {broken.local_cluster}

        cds_state = plane.stream("picky").describe()["types"]["CDS"]
        assert cds_state["nack"] == missing_ca(
            CLUSTER, broken.remote_cluster, Cluster.FromString(res.remote_cluster(broken))
        )
        assert cds_state["nackModels"] == ["inference/broken"]
        assert cds_state["nackVersion"] == nacked.version  # the version rejected, not the last good one

        # A node that does not reject takes the model as usual.
        await synced(plane, other, [*BASE[:1], replace(BASE[1], remote_percent=5), BASE[2], broken])
        assert plane.stream("other").describe()["types"]["CDS"]["nack"] is None

        # Fixing the model makes a new version, sent and ACKed normally.
        fixed = replace(
            broken, remotes=(replace(broken.remote, ca_file="/etc/ssl/certs/ca-certificates.crt"),)
        )
        plane.apply(fixed)
        await picky.wait(lambda c: fixed.remote_cluster in c.held[CLUSTER], 3)
        last = [r for r in picky.received if r.type_url == CLUSTER][-1]
        assert not last.nacked and last.version != nacked.version
        await synced(plane, picky, [BASE[0], replace(BASE[1], remote_percent=5), BASE[2], fixed])
        cds_state = plane.stream("picky").describe()["types"]["CDS"]
        assert cds_state["nack"] is None and cds_state["nackModels"] == []
        assert cds_state["acked"] == last.version


def duplicate_domain(type_url: str, name: str, rc) -> str | None:
    """What Envoy says of a route configuration that names a domain twice."""
    if type_url != ROUTE:
        return None
    domains = [d for vh in rc.virtual_hosts for d in vh.domains]
    for d in domains:
        if domains.count(d) > 1:
            duplicate = f"Duplicate entry of domain {d} in route {name}"
            return f"Only unique values for domains are permitted. {duplicate}"
    return None


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_rejected_route_configuration_stays_rejected_while_other_routes_are_taken(plane, delta):
    async with asyncio.timeout(LIMIT):
        picky = await plane.client("picky", delta, invalid=duplicate_domain)
        await synced(plane, picky, BASE)
        llm, embed = BASE[0], BASE[1]
        broken = replace(llm, domains=(*llm.domains, "llm"))
        plane.apply(broken)
        await picky.wait(lambda c: any(r.nacked for r in c.received), 3)

        def rds() -> dict:
            return plane.stream("picky").describe()["types"]["RDS"]

        await eventually(lambda: rds()["nackModels"] == ["inference/llm"])
        # Another model's new routes are taken; the rejected ones are still not.
        mark = len(picky.received)
        renamed = replace(embed, domains=(*embed.domains, "embed.example.com"))
        plane.apply(renamed)
        await picky.wait(lambda c: "embed.example.com" in domains_of(c, renamed), 3)
        await eventually(lambda: not plane.stream("picky").types[ROUTE].pending)
        assert [r.names for r in picky.received[mark:] if r.type_url == ROUTE] == [(embed.route_config,)]
        assert rds()["nack"] is not None and rds()["nackModels"] == ["inference/llm"]
        assert rds()["acked"]  # the other model's routes were ACKed
        # Fixing the model ends the rejection.
        plane.apply(llm)
        await eventually(lambda: rds()["nack"] is None)
        await synced(plane, picky, [llm, renamed, BASE[2]])


# --- 6. Delta specifics ---


async def test_delta_reconnect_with_initial_versions_resends_nothing_unchanged(plane):
    async with asyncio.timeout(LIMIT):
        before = await plane.client("edge", True)
        await synced(plane, before, BASE)
        assert set(before.resource_versions[CLUSTER]) == clusters_of(*BASE)
        await before.stop()
        plane.clients.remove(before)
        # The server forgets the stream once the node is gone.
        await eventually(lambda: all(s.node_id != "edge" for s in plane.xds.streams.values()))

        after = SimEnvoy(plane.target, node_id="edge", delta=True)
        after.reconnect_from(before)
        plane.clients.append(after)
        await after.start()
        await asyncio.sleep(QUIET)
        assert after.received == []  # it had everything: nothing is sent again
        await synced(plane, after, BASE, timeout=1)

        changed = replace(BASE[0], remote_percent=60)
        plane.apply(changed)
        await after.wait(lambda c: c.runtime_values[changed.runtime_key] == 60, 2)
        assert [SHORT[r.type_url] for r in after.received] == ["RTDS"]


def domains_of(c: SimEnvoy, r: ModelRoute) -> set[str]:
    rc = c.held[ROUTE].get(r.route_config)
    return {d for vh in (rc.virtual_hosts if rc else []) if vh.name == vhost_name(r) for d in vh.domains}


@pytest.mark.parametrize("away", ["new-model", "routes-only"])
async def test_delta_reconnect_gets_only_what_changed_while_away_and_promptly(plane, away):
    async with asyncio.timeout(LIMIT):
        before = await plane.client("edge", True)
        await synced(plane, before, BASE)
        await before.stop()
        plane.clients.remove(before)

        # While the node is away one weight moves, and a model arrives or one's Host names change.
        weight = replace(BASE[0], remote_percent=90)
        if away == "new-model":
            other = model("chat", percent=10)
            wanted = [weight, *BASE[1:], other]
        else:
            other = replace(BASE[2], domains=(*BASE[2].domains, "rerank.example.com"))
            wanted = [weight, BASE[1], other]
        plane.apply(weight, other)

        after = SimEnvoy(plane.target, node_id="edge", delta=True)
        after.reconnect_from(before)
        plane.clients.append(after)
        started = time.monotonic()
        await after.start()
        await after.wait(lambda c: domains_of(c, other) == set(other.domains), 3)
        took = time.monotonic() - started
        await synced(plane, after, wanted)
        assert took < 1.0, f"the reconnected node waited {took:.1f}s for its new routes"
        sent: dict[str, set[str]] = {}
        for r in after.received:
            sent.setdefault(SHORT[r.type_url], set()).update(r.names)
        assert sent.pop("RDS") == {other.route_config}  # only the routes of the model that changed
        assert len(sent.pop("RTDS")) <= 2  # the layers holding the keys that changed
        if away == "new-model":
            assert sent == {
                "CDS": clusters_of(other),
                "EDS": {other.local_cluster},
                "SRDS": set(other.hosts),
            }
        else:
            assert sent == {"SRDS": {"rerank.example.com"}}  # its new Host name; nothing else again


def inline_percent(c: SimEnvoy, r: ModelRoute) -> float:
    """The remote share a node's copy of a model's routes carries as its runtime default."""
    remote = c.held[ROUTE][r.route_config].virtual_hosts[0].routes[0]
    return remote.match.runtime_fraction.default_value.numerator / 10_000


async def test_delta_unsubscribed_layer_gets_no_updates_and_the_weights_come_in_the_routes(plane):
    async with asyncio.timeout(LIMIT):
        c = await plane.client("edge", True)
        await synced(plane, c, BASE)
        layers = runtime.layer_names()
        llm, embed = BASE[0], BASE[1]
        llm_layer = layers[runtime.shard_of(llm.runtime_key)]
        assert llm_layer != layers[runtime.shard_of(embed.runtime_key)]
        assert inline_percent(c, llm) == 0  # weights over RTDS: the routes' default is 0
        c.subscribe(RUNTIME, set(layers) - {llm_layer})
        await asyncio.sleep(0.2)
        assert plane.stream("edge").weight_layers is False  # no longer takes every layer
        mark = len(c.received)
        plane.apply(replace(llm, remote_percent=55))
        await c.wait(lambda c: inline_percent(c, llm) == 55, 2)
        await asyncio.sleep(QUIET)
        # No layer it left; its routes carry the weight instead.
        assert all(r.type_url == ROUTE for r in c.received[mark:]), c.received[mark:]
        assert c.runtime_values.get(llm.runtime_key) != 55
        mark = len(c.received)
        plane.apply(replace(embed, remote_percent=20))
        await c.wait(lambda c: c.runtime_values.get(embed.runtime_key) == inline_percent(c, embed) == 20, 2)
        assert [r.names for r in c.received[mark:] if r.type_url == RUNTIME] == [
            (layers[runtime.shard_of(embed.runtime_key)],)
        ]
        # Subscribing again brings the layer's current content, and then routes without weights.
        mark = len(c.received)
        c.subscribe(RUNTIME, set(layers))
        await c.wait(lambda c: c.runtime_values.get(llm.runtime_key) == 55, 2)
        await c.wait(lambda c: inline_percent(c, llm) == 0 and inline_percent(c, embed) == 0, 2)
        types = [r.type_url for r in c.received[mark:]]
        assert types.index(RUNTIME) < types.index(ROUTE), types  # the layer before the routes need it
        assert plane.stream("edge").weight_layers is True
        await synced(plane, c, [replace(llm, remote_percent=55), replace(embed, remote_percent=20), BASE[2]])
        mark = len(c.received)
        plane.apply(replace(llm, remote_percent=60))
        await c.wait(lambda c: c.runtime_values.get(llm.runtime_key) == 60, 2)
        await asyncio.sleep(QUIET)
        assert [r.type_url for r in c.received[mark:]] == [RUNTIME]


async def test_delta_wildcard_clusters_and_listeners_bring_new_models_unasked(plane):
    async with asyncio.timeout(LIMIT):
        c = await plane.client("edge", True)
        await synced(plane, c, BASE)
        new = model("chat", percent=10)
        plane.apply(new)
        await synced(plane, c, [*BASE, new])
        cds = [r for r in c.received if r.type_url == CLUSTER]
        assert set(cds[-1].names) == clusters_of(new)  # only the new ones, though never named

        # An explicit "*" subscription is wildcard too.
        raw = RawStream(plane.target, ADS_DELTA, True)
        await raw.open()
        try:
            raw.send(
                DeltaDiscoveryRequest(node=Node(id="raw"), type_url=CLUSTER, resource_names_subscribe=["*"])
            )
            raw.send(DeltaDiscoveryRequest(type_url=LISTENER, resource_names_subscribe=["*"]))
            await raw.until(lambda got: {g.type_url for g in got} == {CLUSTER, LISTENER})
            by_type = {g.type_url: {r.name for r in g.resources} for g in raw.got}
            assert by_type == {CLUSTER: clusters_of(*BASE, new), LISTENER: {LISTENER_NAME}}
        finally:
            await raw.close()


# --- 7. node scoping ---

SCOPED = [
    model("alpha", "team-a", 10, labels={"tier": "gold"}),
    model("beta", "team-a", 20, labels={"tier": "silver"}),
    model("gamma", "team-b", 30, labels={"tier": "gold"}),
    model("delta", "team-b", 40),
]


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_scoped_nodes_see_only_their_models(plane, delta):
    async with asyncio.timeout(LIMIT):
        plane.translator.publish(SCOPED)
        team_a = await plane.client("team-a", delta, metadata={"overspill": {"namespaces": ["team-a"]}})
        gold = await plane.client("gold", delta, metadata={"overspill": {"matchLabels": {"tier": "gold"}}})
        edge = await plane.client("edge", delta)
        await synced(plane, team_a, SCOPED[:2])
        await synced(plane, gold, [SCOPED[0], SCOPED[2]])
        await synced(plane, edge, SCOPED)
        assert plane.stream("team-a").describe()["scope"] == "namespaces=team-a"
        assert plane.stream("gold").describe()["scope"] == "labels=tier=gold"

        marks = {c.node_id: len(c.received) for c in (team_a, gold, edge)}
        outside = replace(SCOPED[3], remote_percent=99, endpoints=(("10.0.0.9", 8000),))
        plane.apply(outside)
        await edge.wait(lambda c: c.runtime_values[outside.runtime_key] == 99, 2)
        await asyncio.sleep(QUIET)
        assert team_a.received[marks["team-a"] :] == []
        assert gold.received[marks["gold"] :] == []

        # A gold model outside team-a: the gold node gets it, team-a's does not.
        marks = {c.node_id: len(c.received) for c in (team_a, gold)}
        moved = replace(SCOPED[2], remote_percent=77)
        plane.apply(moved)
        await gold.wait(lambda c: c.runtime_values[moved.runtime_key] == 77, 2)
        await asyncio.sleep(QUIET)
        assert team_a.received[marks["team-a"] :] == []
        assert [SHORT[r.type_url] for r in gold.received[marks["gold"] :]] == ["RTDS"]

        # Relabelling moves a model into a node's scope, and out again.
        promoted = replace(SCOPED[1], labels=(("tier", "gold"),))
        plane.apply(promoted)
        await synced(plane, gold, [SCOPED[0], moved, promoted])
        plane.apply(SCOPED[1])
        await synced(plane, gold, [SCOPED[0], moved])


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_scoped_node_without_weight_layers_gets_only_its_models_weights(plane, delta):
    async with asyncio.timeout(LIMIT):
        plane.translator.publish(SCOPED)
        team_a = await plane.client(
            "team-a", delta, layers=(), metadata={"overspill": {"namespaces": ["team-a"]}}
        )
        edge = await plane.client("edge", delta)
        await team_a.wait(lambda c: holds_inline(c, SCOPED[:2]), 5)
        await synced(plane, edge, SCOPED)
        assert plane.stream("team-a").view is not plane.stream("edge").view
        assert not plane.stream("edge").view.weight_inline  # no such node in its scope: one form only

        marks = len(team_a.received), len(edge.received)
        outside = replace(SCOPED[3], remote_percent=99)
        plane.apply(outside)
        await edge.wait(lambda c: c.runtime_values[outside.runtime_key] == 99, 2)
        inside = replace(SCOPED[0], remote_percent=45)
        plane.apply(inside)
        await team_a.wait(lambda c: inline_percent(c, inside) == 45, 2)
        await edge.wait(lambda c: c.runtime_values[inside.runtime_key] == 45, 2)
        await asyncio.sleep(QUIET)
        assert [(SHORT[r.type_url], r.names) for r in team_a.received[marks[0] :]] == [
            ("RDS", (inside.route_config,))
        ]
        assert {SHORT[r.type_url] for r in edge.received[marks[1] :]} == {"RTDS"}


# --- 8. latest state wins ---


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_stuck_node_delays_nobody_and_then_gets_only_the_latest_weight(plane, delta):
    async with asyncio.timeout(LIMIT):
        fast = await plane.client("fast", delta)
        stuck = await plane.client("stuck", delta)
        for c in (fast, stuck):
            await synced(plane, c, BASE)
        # A third node subscribes and never reads a single response.
        mute = RawStream(plane.target, ADS_SOTW, False, read=False)
        await mute.open()
        try:
            mute.send(DiscoveryRequest(node=Node(id="mute"), type_url=CLUSTER))
            mute.send(DiscoveryRequest(type_url=RUNTIME, resource_names=runtime.layer_names()))
            await eventually(lambda: any(s.node_id == "mute" for s in plane.xds.streams.values()))
            await one_stuck_one_fast(plane, fast, stuck)
        finally:
            await mute.close()


async def one_stuck_one_fast(plane: Plane, fast: SimEnvoy, stuck: SimEnvoy) -> None:
    stuck.pause()
    mark = len(stuck.received)
    key = BASE[0].runtime_key
    delays = []
    for percent in range(10, 101, 10):
        plane.apply(replace(BASE[0], remote_percent=percent))
        started = time.monotonic()
        await fast.wait(lambda c, p=percent: c.runtime_values[key] == p, 1.0)
        delays.append(time.monotonic() - started)
        await asyncio.sleep(0.02)
    assert max(delays) < 1.0

    stuck.resume()
    await stuck.wait(lambda c: c.runtime_values[key] == 100, 2)
    await asyncio.sleep(QUIET)
    rtds = [r for r in stuck.received[mark:] if r.type_url == RUNTIME]
    # At most the response already in flight when it stopped, then the latest: not a queue of 10.
    assert len(rtds) <= 2, [r.version for r in rtds]
    assert [SHORT[r.type_url] for r in stuck.received[mark:]] == ["RTDS"] * len(rtds)
    assert stuck.runtime_values[key] == 100


# --- 9. single-type services ---


@pytest.mark.parametrize(
    ("service", "delta", "type_url"),
    [
        pytest.param("cluster.v3.ClusterDiscoveryService/StreamClusters", False, CLUSTER, id="cds-sotw"),
        pytest.param("cluster.v3.ClusterDiscoveryService/DeltaClusters", True, CLUSTER, id="cds-delta"),
        pytest.param("runtime.v3.RuntimeDiscoveryService/StreamRuntime", False, RUNTIME, id="rtds-sotw"),
        pytest.param("runtime.v3.RuntimeDiscoveryService/DeltaRuntime", True, RUNTIME, id="rtds-delta"),
    ],
)
async def test_single_type_service_serves_its_type_only(plane, service, delta, type_url):
    async with asyncio.timeout(LIMIT):
        layers = runtime.layer_names()
        subscribe = layers if type_url == RUNTIME else []  # clusters are wildcard
        raw = RawStream(plane.target, f"/envoy.service.{service}", delta)
        await raw.open()
        try:
            node = Node(id="single")
            if delta:
                raw.send(
                    DeltaDiscoveryRequest(node=node, type_url=type_url, resource_names_subscribe=subscribe)
                )
            else:
                raw.send(DiscoveryRequest(node=node, type_url=type_url, resource_names=subscribe))
            # Other types asked on this stream are not its to serve.
            for other in (LISTENER, ROUTE) if type_url == CLUSTER else (CLUSTER, LISTENER):
                if delta:
                    raw.send(DeltaDiscoveryRequest(type_url=other))
                else:
                    raw.send(DiscoveryRequest(type_url=other))
            await raw.until(lambda got: len(got) >= 1)
            first_resp = raw.got[0]
            assert first_resp.type_url == type_url
            if type_url == CLUSTER:
                assert names_in(first_resp, delta) == clusters_of(*BASE)
            else:
                assert names_in(first_resp, delta) == set(layers)
            raw.send(ack(first_resp, delta, subscribe))

            # Live updates keep coming on the stream, still of this type only.
            new = model("chat", percent=35)
            plane.apply(new)
            await raw.until(lambda got: len(got) >= 2)
            second = raw.got[1]
            assert second.type_url == type_url
            if type_url == CLUSTER:
                expected = clusters_of(new) if delta else clusters_of(*BASE, new)
                assert names_in(second, delta) == expected
            else:
                assert names_in(second, delta) == {layers[runtime.shard_of(new.runtime_key)]}
            raw.send(ack(second, delta, subscribe))
            await asyncio.sleep(QUIET)
            assert {g.type_url for g in raw.got} == {type_url}
            assert len(raw.got) == 2
        finally:
            await raw.close()


# --- 10. a structural change is the size of one model ---


async def structural_change_bytes(n: int, delta: bool) -> dict[str, dict[str, int]]:
    """Bytes per type one node receives when a model is added to `n`, then removed again."""
    translator = Translator("127.0.0.1", 10000)
    translator.publish([model(f"m{i:04d}", f"ns-{i % 4}") for i in range(n)])
    server, port = await start_server(XdsServer(translator.cache), "127.0.0.1", 0)
    c = SimEnvoy(f"127.0.0.1:{port}", node_id="edge", delta=delta)

    def holds_models(count: int) -> bool:
        sizes = (len(c.held[CLUSTER]), len(c.held[SCOPED_ROUTE]), len(c.held[ROUTE]))
        return sizes == (2 * count, 4 * count, count)

    out: dict[str, dict[str, int]] = {}
    try:
        await c.start()
        await c.wait(lambda c: holds_models(n))
        new = model("added", "ns-0")
        for step, change, count in (("add", new, n + 1), ("remove", None, n)):
            await asyncio.sleep(QUIET)  # everything answered
            mark = len(c.received)
            translator.apply({new.key: change})
            await c.wait(lambda c, count=count: holds_models(count))
            await asyncio.sleep(QUIET)
            sizes: dict[str, int] = {}
            for r in c.received[mark:]:
                sizes[SHORT[r.type_url]] = sizes.get(SHORT[r.type_url], 0) + r.size
            out[step] = sizes
    finally:
        await c.stop()
        await server.stop(None)
    return out


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_adding_or_removing_a_model_sends_the_same_bytes_with_ten_or_five_hundred_models(delta):
    async with asyncio.timeout(LIMIT):
        small = await structural_change_bytes(10, delta)
        large = await structural_change_bytes(500, delta)
    print(f"\n{'delta' if delta else 'sotw'} bytes per change, 10 models: {small}; 500 models: {large}")
    for step in ("add", "remove"):
        # The model's own route configuration only (removed: none, Envoy drops it with its scopes).
        assert abs(small[step].get("RDS", 0) - large[step].get("RDS", 0)) <= 8, (step, small, large)
        if delta:
            # Everything but the weight layer (which holds about N/64 weights, see xds.runtime).
            size = {k: v for k, v in large[step].items() if k != "RTDS"}
            assert abs(sum(size.values()) - sum(v for k, v in small[step].items() if k != "RTDS")) <= 32
            assert sum(size.values()) < 4096, (step, large)
        else:
            # State of the world: clusters and scopes are whole-set types (what a response leaves
            # out, Envoy removes), so those grow with N; the routes do not.
            assert large[step]["SRDS"] > 20 * small[step]["SRDS"]


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_a_node_reconnecting_to_a_restarted_server_is_sent_what_it_holds(plane, delta):
    """A restarted control plane counts versions and nonces from the start again. The node comes back
    naming its last versions (and, as some clients do, its last nonce of the old stream): SotW sends it
    the whole state again, the same values; Delta, holding every resource at its content version,
    is sent nothing."""
    async with asyncio.timeout(LIMIT):
        before = await plane.client("edge", delta)
        await synced(plane, before, BASE)
        await before.stop()
        plane.clients.remove(before)

        async with serving(BASE) as restarted:  # versions and nonces count from the start again
            after = SimEnvoy(restarted.target, node_id="edge", delta=delta, decode=True)
            after.reconnect_from(before)
            after._nonces = dict(before._nonces)  # noqa: SLF001 - a client keeping its old nonces
            restarted.clients.append(after)
            await after.start()
            await eventually(lambda: any(st.node_id == "edge" for st in restarted.xds.streams.values()))
            await synced(restarted, after, BASE)
            assert after.runtime_values == before.runtime_values
            if delta:
                await asyncio.sleep(QUIET)
                assert after.received == []
            else:  # the whole state again, the same
                every = {"CDS", "LDS", "EDS", "SRDS", "RDS", "RTDS"}
                await after.wait(lambda c: {SHORT[r.type_url] for r in c.received} >= every, 5)
                assert after.runtime_values == before.runtime_values
            assert not any(r.nacked for r in after.received)
