"""Views live as long as the nodes of their scope, and `render` prints exactly what is served.

Real gRPC on loopback: raw ADS streams from nodes with distinct metadata, and the resources
a node receives compared byte for byte with what `overspill render` is built from.
"""

from __future__ import annotations

import asyncio
import gc
import os

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.protobuf import Struct

from api.crd import RemoteBackend
from api.desired import ModelRoute, service_domains
from overspill.cli import main
from xds import runtime
from xds.render import served
from xds.scope import Scope
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.types import CLUSTER, ENDPOINT, LISTENER, NAMED, PUSH_ORDER, ROUTE, RUNTIME, SECRET

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
REMOTE = RemoteBackend("10.9.8.7", 8080, "http")


def model(name: str, percent: float = 0.0, labels: dict[str, str] | None = None) -> ModelRoute:
    return ModelRoute(
        "inference",
        name,
        service_domains(name, "inference", 80),
        (("10.0.0.1", 8000),),
        (REMOTE,),
        percent,
        tuple(sorted((labels or {}).items())),
    )


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def one_node(target: str, metadata: dict) -> int:
    """Connect as a node with this metadata, take its listeners, leave. Returns how many arrived."""
    request = DiscoveryRequest(
        node=Node(id="n", cluster="c", metadata=Struct.from_dict(metadata)), type_url=LISTENER
    )
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            ADS, request_serializer=bytes, response_deserializer=DiscoveryResponse.FromString
        )(iter([request]))
        response = await call.read()
        call.cancel()
        return len(response.resources)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"not within {timeout}s")


async def test_a_thousand_nodes_with_distinct_metadata_leave_no_view_behind():
    translator = Translator("127.0.0.1", 10000)
    translator.publish([model(f"m{i}", labels={"team": f"t{i % 10}"}) for i in range(100)])
    xds = XdsServer(translator.cache)
    server, port = await start_server(xds, "127.0.0.1", 0)
    target = f"127.0.0.1:{port}"

    async def wave(start: int) -> None:
        for batch in range(start, start + 1000, 50):
            counts = await asyncio.gather(
                *(
                    one_node(target, {"overspill": {"matchLabels": {"team": f"t{i % 10}", "node": f"n{i}"}}})
                    for i in range(batch, batch + 50)
                )  # fmt: skip
            )
            assert set(counts) == {1}  # a listener; each node's labels match no model: its own view
        await wait_for(lambda: not xds.streams)

    try:
        baseline_views = len(translator.cache.views)
        await wave(0)
        gc.collect()
        after_first = rss_mib()
        assert len(translator.cache.views) == baseline_views
        await wave(1000)
        gc.collect()
        after_second = rss_mib()
        assert len(translator.cache.views) == baseline_views
        print(f"\nviews {baseline_views} -> {len(translator.cache.views)}; RSS after 1,000 nodes "
              f"{after_first:.1f} MiB, after 2,000 {after_second:.1f} MiB")  # fmt: skip
        # A view per node kept would hold ~70 resources each: tens of MiB per thousand.
        assert after_second - after_first < 8, (after_first, after_second)

        # A scope still held keeps its view while a change arrives; dropped with its last node.
        view = translator.cache.acquire(Scope(namespaces=frozenset({"inference"})))
        translator.publish([model("m0", percent=10)])
        assert translator.cache.views[view.scope] is view
        translator.cache.release(view)
        assert view.scope not in translator.cache.views
    finally:
        await server.stop(None)


async def test_the_gateways_view_is_kept_and_the_default_port_asked_for_shares_it():
    translator = Translator("127.0.0.1", 10000)
    translator.publish([model(f"m{i}") for i in range(3)])
    cache = translator.cache
    kept = cache.keep(Scope())  # as `overspill serve` does once the first state is in
    xds = XdsServer(cache)
    server, port = await start_server(xds, "127.0.0.1", 0)
    target = f"127.0.0.1:{port}"
    try:
        # A node that names the default listener port gets the same resources: the same view.
        same = cache.acquire(Scope(listener_port=10000))
        assert same is kept
        cache.release(same)
        assert await one_node(target, {"overspill": {"listenerPort": 10000}}) == 1
        assert await one_node(target, {}) == 1
        await wait_for(lambda: not xds.streams)
        assert cache.views == {Scope(): kept}  # the last node gone, the gateways' view stays ...
        translator.publish([model("m0", percent=10)])
        cache.flush()
        assert b"overspill.inference.m0" in b"".join(
            r.any for r in kept.resources[RUNTIME].values()
        )  # ... and up to date
        # Another port is another listener, so another view, dropped with its last node.
        assert await one_node(target, {"overspill": {"listenerPort": 10001}}) == 1
        await wait_for(lambda: not xds.streams)
        assert cache.views == {Scope(): kept}
    finally:
        await server.stop(None)


@pytest.fixture
def manifests(tmp_path):
    docs = []
    for i, (percent_ready, remote) in enumerate(
        [(True, "10.9.8.7:8080"), (False, "standby.example.com"), (True, None)]
    ):
        name = f"m{i}"
        offloading = {"behavior": {"percentage": 40}, "metrics": []}
        if remote:
            offloading["remoteBackend"] = {
                "host": remote,
                "scheme": "https" if "example" in remote else "http",
            }
        if i == 0:  # a credential from a Secret: served over SDS, and printed redacted
            offloading["remoteBackend"]["headersToAdd"] = [
                {"name": "x-api-key", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "m0"}}}
            ]
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "keys", "namespace": "default"},
                    "stringData": {"m0": "m0-api-key-value"},
                }
            )
        docs += [
            {
                "apiVersion": "deployment.beamlit.com/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"serviceRef": {"name": name, "targetPort": 80}, "offloadingConfig": offloading},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8000}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-1",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8000}],
                "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": percent_ready}}],
            },
        ]
    (tmp_path / "models.yaml").write_text(yaml.safe_dump_all(docs))
    return tmp_path


async def test_render_prints_exactly_what_serve_sends(manifests, capsys):
    """One builder: the resources an unscoped node receives over ADS are the bytes `render` decodes."""
    from overspill.plane import ControlPlane
    from overspill.settings import Settings

    plane = ControlPlane(Settings(manifests, listener_address="127.0.0.1", listener_port=10000))
    plane.load_once()
    server, port = await start_server(plane.xds, "127.0.0.1", 0)
    received: dict[str, dict[str, bytes]] = {t: {} for t in PUSH_ORDER}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            queue: asyncio.Queue = asyncio.Queue()
            call = channel.stream_stream(ADS, request_serializer=bytes, response_deserializer=lambda b: b)(
                _drain(queue)
            )
            node = Node(id="render-check", cluster="c")
            wanted = {
                ENDPOINT: [f"overspill/default/m{i}/local" for i in range(3)],
                ROUTE: [f"overspill/default/m{i}/routes" for i in range(3)],
                RUNTIME: runtime.layer_names(),
                SECRET: ["overspill/default/m0/remote/header/x-api-key"],
            }
            for t in PUSH_ORDER:
                queue.put_nowait(DiscoveryRequest(node=node, type_url=t, resource_names=wanted.get(t, [])))
            async with asyncio.timeout(10):
                while any(not received[t] for t in PUSH_ORDER):
                    raw = await call.read()
                    response = DiscoveryResponse.FromString(raw)
                    for any_msg in response.resources:
                        message = any_msg.unpack()
                        name = getattr(message, "cluster_name", None) or message.name
                        received[response.type_url][name] = bytes(any_msg)
            queue.put_nowait(None)
            call.cancel()
    finally:
        await server.stop(None)

    expected = served(plane.translator.cache.view(Scope()))
    assert {t: set(v) for t, v in received.items()} == {t: set(v) for t, v in expected.items()}
    for t in PUSH_ORDER:
        for name, body in expected[t].items():
            assert received[t][name] == body, (t, name)
    assert len(expected[RUNTIME]) == runtime.SHARDS  # every layer, even an empty one
    assert set(NAMED) == {ENDPOINT, ROUTE, RUNTIME, SECRET}

    # And the CLI prints those resources, decoded: one document per served resource.
    assert main(["render", str(manifests), "--listener-address", "127.0.0.1", "--format", "yaml"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {t: len(docs) for t, docs in printed.items()} == {t: len(v) for t, v in expected.items()}
    assert [c["name"] for c in printed[CLUSTER]] == list(expected[CLUSTER])
    assert printed[LISTENER][0]["name"] == "overspill_http"
    assert printed[SECRET] == [
        {
            "name": "overspill/default/m0/remote/header/x-api-key",
            "genericSecret": {"secret": {"inlineBytes": "<redacted>"}},
        }
    ]
    assert b"m0-api-key-value" in expected[SECRET]["overspill/default/m0/remote/header/x-api-key"]
    weights = {k: v for layer in printed[RUNTIME] for k, v in (layer.get("layer") or {}).items()}
    assert weights["overspill.default.m1"] == 100  # no ready endpoint: an outage, all remote


async def _drain(queue: asyncio.Queue):
    while (item := await queue.get()) is not None:
        yield item
