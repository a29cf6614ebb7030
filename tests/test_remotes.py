"""Several remotes per model: how `remoteBackends` parses, and the Envoy resources it becomes."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import yaml
from e2e_stack import envoy_binary
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.route.v3 import VirtualHost
from envoy_data_plane.envoy.extensions.clusters.aggregate.v3 import ClusterConfig
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptions
from test_crd import errors_of, offloading
from test_store_and_directory import (
    MODEL,
    FakeInformer,
    load,
    make_controller,
    model_doc,
    routes_by_name,
    service_docs,
    text,
)

from api.crd import MAX_REMOTES, RemoteBackend, parse_model_deployment
from api.desired import ModelRoute, loads_by_side, model_of, remote_member_name, service_domains, side_of
from api.load import ClusterLoad
from api.status import Phase
from reconciler.status_writer import desired_status
from reconciler.store import ObjectStore
from xds import failover
from xds import resources as res
from xds.render import static_bootstrap
from xds.types import HTTP_OPTIONS

A = RemoteBackend("a.example.com", 443, "https", "/v1", (("x-api-key", "secret-a"),))
B = RemoteBackend("10.0.0.9", 8080, "http")


def route(*remotes: RemoteBackend) -> ModelRoute:
    return ModelRoute("ns", "llm", service_domains("llm", "ns", 80), (("10.0.0.1", 80),), remotes, 50.0)


def test_remote_backends_parse_in_order_and_one_remote_backend_is_a_list_of_one():
    doc = offloading(
        remoteBackends=[
            {"host": "a.example.com", "scheme": "https", "pathPrefix": "/v1"},
            {"host": "10.0.0.9:8080"},
        ]
    )
    remotes = parse_model_deployment(doc).offloading.remotes
    assert [(r.host, r.port, r.scheme, r.path_prefix) for r in remotes] == [
        ("a.example.com", 443, "https", "/v1"),
        ("10.0.0.9", 8080, "http", ""),
    ]
    single = parse_model_deployment(offloading(remoteBackend={"host": "b.example.com"})).offloading
    assert single.remotes == (RemoteBackend("b.example.com", 80),) and single.remote == single.remotes[0]
    assert parse_model_deployment(offloading()).offloading.remotes == ()


P = "default/my-model: spec.offloadingConfig"


@pytest.mark.parametrize(
    ("config", "errors"),
    [
        (
            {"remoteBackend": {"host": "a.example.com"}, "remoteBackends": [{"host": "b.example.com"}]},
            [f"{P}.remoteBackends: give remoteBackend or remoteBackends, not both"],
        ),
        ({"remoteBackends": []}, [f"{P}.remoteBackends: must list 1 to {MAX_REMOTES} remotes, got 0"]),
        (
            {"remoteBackends": [{"host": f"r{i}.example.com"} for i in range(MAX_REMOTES + 1)]},
            [f"{P}.remoteBackends: must list 1 to {MAX_REMOTES} remotes, got {MAX_REMOTES + 1}"],
        ),
        (
            {"remoteBackends": [{"host": "a.example.com"}, {"host": "b.example.com:99999"}]},
            [f"{P}.remoteBackends[1].host: port must be between 1 and 65535, got '99999'"],
        ),
        (
            {"remoteBackends": [{"host": "a.example.com"}, {"host": "a.example.com:80", "scheme": "http"}]},
            [f"{P}.remoteBackends[1]: is the same remote as remoteBackends[0]"],
        ),
        (
            {"remoteBackends": {"host": "a.example.com"}},
            [f"{P}.remoteBackends: must be a list, got a mapping"],
        ),
    ],
)
def test_remote_backends_errors_name_the_field(config, errors):
    assert errors_of(offloading(**config)) == errors


def test_member_cluster_names_parse_back_to_their_model():
    name = remote_member_name("ns", "llm", 3)
    assert name == "overspill/ns/llm/remote/3"
    assert model_of(name) == ("ns", "llm")
    assert side_of(name) == (("ns", "llm"), "remote")
    # A name under the remote cluster (a credential's secret, an OAuth2 token endpoint's cluster)
    # is the model's, but no side of it.
    assert model_of("overspill/ns/llm/remote/token") == ("ns", "llm")
    assert side_of("overspill/ns/llm/remote/token") is None
    assert model_of("overspill/ns/llm/routes/x") is None


def test_one_remote_keeps_one_plain_cluster_and_route_level_rewrites():
    ((name, body),) = failover.remote_clusters(route(A))
    assert name == "overspill/ns/llm/remote" and body == res.remote_cluster(route(A))
    remote_route = VirtualHost.FromString(res.virtual_host(route(A))).routes[0]
    assert remote_route.route.prefix_rewrite == "/v1/"
    assert remote_route.route.host_rewrite_literal == "a.example.com"
    assert [h.header.key for h in remote_route.request_headers_to_add] == ["x-api-key"]


def test_several_remotes_are_an_aggregate_over_one_cluster_each_in_order():
    r = route(A, B)
    clusters = failover.remote_clusters(r)
    assert [n for n, _ in clusters] == [
        "overspill/ns/llm/remote/0",
        "overspill/ns/llm/remote/1",
        "overspill/ns/llm/remote",
    ]
    first, second, aggregate = (Cluster.FromString(body) for _, body in clusters)

    # Each remote its own TLS, Host (the endpoint's host name) and index, and outlier detection.
    assert first.transport_socket.name == "envoy.transport_sockets.tls"
    assert second.transport_socket is None
    for cluster, remote, index in ((first, A, "0"), (second, B, "1")):
        (host,) = cluster.load_assignment.endpoints[0].lb_endpoints
        assert cluster.load_assignment.cluster_name == cluster.name
        assert host.endpoint.hostname == remote.authority
        assert host.endpoint.address.socket_address.address == remote.host
        tag = host.metadata.filter_metadata[failover.METADATA].fields["remote"]
        assert tag.string_value == index
        assert cluster.outlier_detection.consecutive_local_origin_failure == 2
        assert cluster.outlier_detection.split_external_local_origin_errors
        assert cluster.outlier_detection.max_ejection_percent == 100

    # The aggregate lists them in the user's order and sets prefix and headers per remote.
    assert aggregate.cluster_type.name == "envoy.clusters.aggregate"
    assert aggregate.cluster_type.typed_config.unpack() == ClusterConfig(
        clusters=["overspill/ns/llm/remote/0", "overspill/ns/llm/remote/1"]
    )
    options = aggregate.typed_extension_protocol_options[HTTP_OPTIONS].unpack()
    assert isinstance(options, HttpProtocolOptions)
    assert [f.name for f in options.http_filters] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.lua",
        "envoy.filters.http.upstream_codec",
    ]
    script = options.http_filters[1].typed_config.unpack()
    assert isinstance(script, Lua)
    assert "secret\\045a" in script.default_source_code.inline_string  # quoted byte by byte

    # The route targets the aggregate: Host from the chosen endpoint, a retry to the next remote,
    # and no route-level prefix or headers (they would be one remote's).
    remote_route = VirtualHost.FromString(res.virtual_host(r)).routes[0]
    assert remote_route.route.cluster == r.remote_cluster
    assert remote_route.route.auto_host_rewrite is True
    assert remote_route.route.retry_policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert not remote_route.route.prefix_rewrite and not remote_route.request_headers_to_add


def test_remotes_without_rewrites_need_no_upstream_filters():
    aggregate = Cluster.FromString(
        failover.remote_clusters(route(B, RemoteBackend("b.example.com", 80)))[-1][1]
    )
    assert not aggregate.typed_extension_protocol_options


def test_lua_literals_quote_every_byte():
    assert failover._lua('a"b\\c]]\n') == '"a\\034b\\092c\\093\\093\\010"'
    assert failover._lua("é") == '"\\195\\169"'


def test_envoy_accepts_several_remotes(tmp_path):
    """The static bootstrap carries the same clusters the control plane serves (JSON this time)."""
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(static_bootstrap([route(A, B)], "127.0.0.1", 10000)))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def _refusing_port() -> int:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    return port


async def test_offloading_goes_on_while_any_remote_is_up_and_status_shows_each():
    listening = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    up = listening.sockets[0].getsockname()[1]
    down, down_too = await _refusing_port(), await _refusing_port()
    try:
        for hosts, usable, phase in (
            ([down, up], [False, True], Phase.OFFLOADING),
            ([down, down_too], [False, False], Phase.REMOTE_DOWN),
        ):
            doc = model_doc()
            doc["spec"]["offloadingConfig"].pop("remoteBackend")
            doc["spec"]["offloadingConfig"]["remoteBackends"] = [{"host": f"127.0.0.1:{p}"} for p in hosts]
            store = ObjectStore()
            load(store, "a.yaml", text(doc, *service_docs()))
            controller, _, _ = make_controller(store, FakeInformer(queue_depth=50))
            for _ in range(controller.probe.failures_to_down):
                await asyncio.wait_for(controller.evaluate(), 5)
                await asyncio.wait_for(controller.probe_remotes(), 5)
            status = controller.status[MODEL]
            assert status.phase == phase.value
            assert [r["usable"] for r in status.to_dict()["remotes"]] == usable
            written = desired_status(store.get(MODEL), status, controller.machines[MODEL], controller.to_wall)
            expected = [f"http://127.0.0.1:{p}" for p in hosts]
            assert written["remotes"] == [
                {"remote": url, "reachable": ok} for url, ok in zip(expected, usable, strict=True)
            ]
            (condition,) = [c for c in written["conditions"] if c["type"] == "RemoteAvailable"]
            assert condition["message"] == ", ".join(
                f"{url} {'reachable' if ok else 'unreachable'}"
                for url, ok in zip(expected, usable, strict=True)
            )
            route = routes_by_name(controller)["m"]
            # Both remotes stay in Envoy's list: which of them answers is Envoy's to find out.
            assert [r.port for r in route.remotes] == hosts
            assert route.remote_percent == (50.0 if phase == Phase.OFFLOADING else 0.0)
    finally:
        listening.close()
        await listening.wait_closed()


def test_load_of_several_remotes_adds_up_on_the_remote_side():
    loads = {
        "overspill/ns/llm/local": ClusterLoad(in_flight=4, rate=10.0),
        "overspill/ns/llm/remote/0": ClusterLoad(in_flight=1, rate=2.0),
        "overspill/ns/llm/remote/1": ClusterLoad(in_flight=2, rate=3.0),
        "xds_cluster": ClusterLoad(in_flight=9),
    }
    assert loads_by_side(loads) == {
        (("ns", "llm"), "local"): ClusterLoad(in_flight=4, rate=10.0),
        (("ns", "llm"), "remote"): ClusterLoad(in_flight=3, rate=5.0),
    }
    assert loads["overspill/ns/llm/remote/0"] == ClusterLoad(in_flight=1, rate=2.0)  # summed into a copy
