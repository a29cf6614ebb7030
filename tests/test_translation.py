"""From ModelRoutes to Envoy resources: domains, the weighted split, TLS, cache versions, wire bytes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_stack import envoy_binary
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterEdsClusterConfig,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Node,
    RuntimeFractionalPercent,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import (
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    ScopedRouteConfiguration,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.envoy.service.runtime.v3 import Runtime
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType
from envoy_data_plane.google.protobuf import Any, Struct
from envoy_data_plane.google.rpc import Status

import xds.resources
from api.crd import RemoteBackend, Spillover
from api.desired import ModelRoute, model_of, service_domains, side_of
from overspill.cli import main
from xds import failover, fields, runtime, spillover, wire
from xds import resources as res
from xds.cache import Resource, Scope, View
from xds.render import static_bootstrap
from xds.snapshot import Translator
from xds.types import (
    CLUSTER,
    ENDPOINT,
    HTTP_OPTIONS,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    RUNTIME,
    SCOPED_ROUTE,
    SECRET,
)

ROOT = Path(__file__).resolve().parent.parent
HOSTED = RemoteBackend(
    "llm.standby.example.com", 443, "https", "/v1/llm", (("x-api-key", "secret"), ("x-tenant", "acme"))
)
PLAIN = RemoteBackend("10.9.8.7", 8080, "http")


def route(
    name: str = "llm",
    namespace: str = "inference",
    remote: RemoteBackend | None = HOSTED,
    percent: float = 50.0,
    endpoints: tuple[tuple[str, int], ...] = (("10.0.0.1", 8000), ("10.0.0.2", 8000)),
    port: int = 80,
) -> ModelRoute:
    return ModelRoute(
        namespace,
        name,
        service_domains(name, namespace, port),
        endpoints,
        (remote,) if remote else (),
        percent,
    )


# --- domains ---


def test_service_domains_cover_every_dns_name_with_and_without_port():
    assert service_domains("llm", "inference", 80) == (
        "llm",
        "llm:80",
        "llm.inference",
        "llm.inference:80",
        "llm.inference.svc",
        "llm.inference.svc:80",
        "llm.inference.svc.cluster.local",
        "llm.inference.svc.cluster.local:80",
    )


def test_service_domains_use_the_cluster_domain():
    domains = service_domains("m", "ns", 8080, "corp.internal")
    assert "m.ns.svc.corp.internal" in domains
    assert "m.ns.svc.corp.internal:8080" in domains
    assert not any("cluster.local" in d for d in domains)


def test_virtual_host_answers_the_service_domains():
    r = route()
    vh = VirtualHost.FromString(res.virtual_host(r))
    assert vh.domains == list(r.domains)
    assert vh.name == "inference/llm"


# --- the weighted split ---


@pytest.mark.parametrize(("percent", "numerator"), [(0, 0), (12.5, 125_000), (50, 500_000), (100, 1_000_000)])
def test_remote_route_default_is_in_millionths_and_its_key_names_the_model(percent, numerator):
    remote_route, local_route = VirtualHost.FromString(
        res.virtual_host(route(percent=99), default_percent=percent)
    ).routes
    fraction = remote_route.match.runtime_fraction.default_value
    assert fraction.numerator == numerator
    assert fraction.denominator == FractionalPercentDenominatorType.MILLION
    assert remote_route.match.runtime_fraction.runtime_key == "overspill.inference.llm"
    assert local_route.match.runtime_fraction is None


def test_served_routes_default_to_nothing_spilled_and_static_ones_to_the_current_weight():
    served = RouteConfiguration.FromString(res.route_configuration([route(percent=40)]))
    static = RouteConfiguration.FromString(res.route_configuration([route(percent=40)], static=True))
    assert served.virtual_hosts[0].routes[0].match.runtime_fraction.default_value.numerator == 0
    assert static.virtual_hosts[0].routes[0].match.runtime_fraction.default_value.numerator == 400_000


def test_remote_route_rewrites_host_path_and_adds_headers():
    remote_route, local_route = VirtualHost.FromString(res.virtual_host(route())).routes
    action = remote_route.route
    assert remote_route.name == "remote"
    assert action.cluster == "overspill/inference/llm/remote"
    assert action.host_rewrite_literal == "llm.standby.example.com"
    assert remote_route.match.prefix == "/"
    assert action.prefix_rewrite == "/v1/llm/"  # "/generate" becomes "/v1/llm/generate"
    headers = [(h.header.key, h.header.value) for h in remote_route.request_headers_to_add]
    assert headers == [("x-api-key", "secret"), ("x-tenant", "acme")]
    # Only spilled-over requests are rewritten; local ones go through untouched, only asked for
    # their ORCA load (a format the client chose itself is kept).
    assert local_route.name == "local"
    assert local_route.route.cluster == "overspill/inference/llm/local"
    assert not local_route.route.host_rewrite_literal
    assert not local_route.route.prefix_rewrite
    [ask] = local_route.request_headers_to_add
    assert (ask.header.key, ask.header.value) == ("endpoint-load-metrics-format", "TEXT")
    assert ask.append_action == HeaderValueOptionHeaderAppendAction.ADD_IF_ABSENT


def test_remote_on_a_non_default_port_keeps_the_port_in_the_host():
    remote_route, _ = VirtualHost.FromString(res.virtual_host(route(remote=PLAIN))).routes
    assert remote_route.route.host_rewrite_literal == "10.9.8.7:8080"
    assert not remote_route.route.prefix_rewrite


def test_without_remote_only_the_local_route():
    (only,) = VirtualHost.FromString(res.virtual_host(route(remote=None))).routes
    assert only.route.cluster == "overspill/inference/llm/local"
    assert only.match.runtime_fraction is None


def test_static_route_configuration_ends_with_a_404_for_unknown_hosts():
    config = RouteConfiguration.FromString(
        res.route_configuration([route(), route(name="other", remote=None)])
    )
    assert config.name == res.ROUTE_CONFIG_NAME
    assert [v.name for v in config.virtual_hosts] == ["inference/llm", "inference/other", "unknown-host"]
    fallback = config.virtual_hosts[-1]
    assert fallback.domains == ["*"]
    assert fallback.routes[0].direct_response.status == 404


# --- clusters ---


def test_https_remote_gets_tls_with_sni_and_verification():
    cluster = Cluster.FromString(res.remote_cluster(route()))
    assert cluster.type == ClusterDiscoveryType.LOGICAL_DNS
    socket = cluster.transport_socket
    assert socket.name == "envoy.transport_sockets.tls"
    tls = UpstreamTlsContext.FromString(socket.typed_config.value)
    assert tls.sni == "llm.standby.example.com"
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.filename == HOSTED.ca_file
    (san,) = validation.match_typed_subject_alt_names
    assert san.san_type == SubjectAltNameMatcherSanType.DNS
    assert san.matcher.exact == "llm.standby.example.com"
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("llm.standby.example.com", 443)


def test_https_remote_by_ip_checks_the_ip_san_and_sends_no_sni():
    remote = RemoteBackend("10.9.8.7", 8443, "https")
    cluster = Cluster.FromString(res.remote_cluster(route(remote=remote)))
    assert cluster.type == ClusterDiscoveryType.STATIC
    tls = UpstreamTlsContext.FromString(cluster.transport_socket.typed_config.value)
    assert not tls.sni
    (san,) = tls.common_tls_context.validation_context.match_typed_subject_alt_names
    assert san.san_type == SubjectAltNameMatcherSanType.IP_ADDRESS


def test_insecure_skip_verify_drops_the_validation_context():
    remote = RemoteBackend("standby.example.com", 443, "https", insecure_skip_verify=True)
    tls = UpstreamTlsContext.FromString(
        Cluster.FromString(res.remote_cluster(route(remote=remote))).transport_socket.typed_config.value
    )
    assert tls.sni == "standby.example.com"
    assert tls.common_tls_context.validation_context is None


def test_http_remote_has_no_tls():
    cluster = Cluster.FromString(res.remote_cluster(route(remote=PLAIN)))
    assert cluster.transport_socket is None
    assert cluster.type == ClusterDiscoveryType.STATIC


def test_local_cluster_is_eds_and_its_endpoints_are_the_ready_pods():
    r = route()
    cluster = Cluster.FromString(res.local_cluster(r))
    assert cluster.type == ClusterDiscoveryType.EDS
    assert cluster.name == "overspill/inference/llm/local"
    cla = ClusterLoadAssignment.FromString(res.load_assignment(r))
    assert cla.cluster_name == cluster.name
    got = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for e in cla.endpoints[0].lb_endpoints
    ]
    assert got == [("10.0.0.1", 8000), ("10.0.0.2", 8000)]
    static = Cluster.FromString(res.local_cluster(r, static=True))
    assert static.type == ClusterDiscoveryType.STATIC
    assert static.load_assignment == cla


# --- the translator and the cache ---


def make(shards: int = 8) -> tuple[Translator, View]:
    translator = Translator("127.0.0.1", 10000, shards=shards)
    return translator, translator.cache.view(Scope())


def versions(view: View) -> dict[str, int]:
    return dict(view.version)


def decoded_routes(view: View, r: ModelRoute) -> RouteConfiguration:
    return RouteConfiguration.FromString(Any.FromString(view.resources[ROUTE][r.route_config].any).value)


def scopes(view: View) -> dict[str, str]:
    """Host (the scope's key) -> the route configuration its scope names."""
    out = {}
    for name, resource in view.resources[SCOPED_ROUTE].items():
        scope = ScopedRouteConfiguration.FromString(Any.FromString(resource.any).value)
        (fragment,) = scope.key.fragments
        assert scope.name == fragment.string_key == name
        out[name] = scope.route_configuration_name
    return out


def runtime_layers(view: View) -> dict[str, dict]:
    return {
        n: Runtime.FromString(Any.FromString(r.any).value).to_dict()
        for n, r in view.resources[RUNTIME].items()
    }


def test_publishing_the_same_state_twice_changes_no_version():
    translator, view = make()
    routes = [route(), route(name="other", remote=PLAIN)]
    assert translator.publish(routes) == 2
    first = versions(view)
    assert translator.publish([route(), route(name="other", remote=PLAIN)]) == 0
    assert versions(view) == first
    assert translator.cache.ready


def test_a_weight_change_sends_one_runtime_layer_and_serializes_nothing_else(monkeypatch):
    translator, view = make()
    names = [f"m{i}" for i in range(20)]
    translator.publish([route(name=n, percent=0) for n in names])
    before, routes_before = versions(view), dict(view.resources[ROUTE])

    calls: list[str] = []
    for fn in ("virtual_host", "local_cluster", "remote_cluster", "load_assignment"):
        original = getattr(xds.resources, fn)
        monkeypatch.setattr(
            xds.resources, fn, lambda r, *a, _o=original, _n=fn, **k: calls.append(_n) or _o(r, *a, **k)
        )
    changed = [route(name=n, percent=30 if n == "m3" else 0) for n in names]
    assert translator.publish(changed) == 1
    after = versions(view)
    assert calls == []
    assert [t for t in PUSH_ORDER if after[t] != before[t]] == [RUNTIME]
    assert view.changed_since(RUNTIME, before[RUNTIME]) == {
        runtime.layer_names(8)[runtime.shard_of("overspill.inference.m3", 8)]
    }
    assert view.resources[ROUTE] == routes_before
    layers = runtime_layers(view)
    values = {k: v for layer in layers.values() for k, v in layer.get("layer", {}).items()}
    assert values["overspill.inference.m3"] == 30
    assert "overspill.inference.m4" not in values  # at 0 %: no key, the route's default applies


def test_a_layer_holds_only_the_models_offloading():
    """A model at 0 % has no key (its route's default, 0, applies): a layer weighs what is
    spilling over, and a model that stops offloading leaves its layer."""
    translator, view = make()
    names = [f"m{i}" for i in range(500)]
    translator.publish([route(name=n, percent=0) for n in names])
    assert all(layer.get("layer", {}) == {} for layer in runtime_layers(view).values())
    idle = sum(len(r.any) for r in view.resources[RUNTIME].values())

    translator.publish([route(name=n, percent=40 if n == "m7" else 0) for n in names])
    values = {k: v for layer in runtime_layers(view).values() for k, v in layer.get("layer", {}).items()}
    assert values == {"overspill.inference.m7": 40}
    assert sum(len(r.any) for r in view.resources[RUNTIME].values()) - idle < 64

    before = versions(view)[RUNTIME]
    translator.publish([route(name=n, percent=0) for n in names])
    shard = runtime.layer_names(8)[runtime.shard_of("overspill.inference.m7", 8)]
    assert view.changed_since(RUNTIME, before) == {shard}  # Envoy gets the layer without the key
    assert runtime_layers(view)[shard].get("layer", {}) == {}


def test_a_fractional_weight_is_a_fractional_percent_of_a_million():
    translator, view = make()
    translator.publish([route(percent=12.5)])
    values = {k: v for layer in runtime_layers(view).values() for k, v in layer.get("layer", {}).items()}
    assert values["overspill.inference.llm"] == {"numerator": 125000.0, "denominator": "MILLION"}


def test_an_endpoint_change_bumps_only_endpoints():
    translator, view = make()
    translator.publish([route()])
    before = versions(view)
    translator.publish([route(endpoints=(("10.0.0.1", 8000),))])
    after = versions(view)
    assert [t for t in PUSH_ORDER if after[t] != before[t]] == [ENDPOINT]


def test_removing_a_model_drops_its_resources_but_keeps_them_retired_for_make_before_break():
    translator, view = make()
    translator.publish([route(), route(name="other")])
    before = versions(view)
    translator.publish([route()])
    after = versions(view)
    changed = [t for t in PUSH_ORDER if after[t] != before[t]]
    assert changed == [CLUSTER, ENDPOINT, RUNTIME, SCOPED_ROUTE, ROUTE]
    assert set(view.resources[CLUSTER]) == {"overspill/inference/llm/local", "overspill/inference/llm/remote"}
    assert set(view.resources[ENDPOINT]) == {"overspill/inference/llm/local"}
    assert set(view.resources[ROUTE]) == {"overspill/inference/llm/routes"}
    assert set(scopes(view).values()) == {"overspill/inference/llm/routes"}
    assert view.lookup(CLUSTER, "overspill/inference/other/local") is not None


def test_each_model_has_its_route_configuration_and_a_scope_per_host_name():
    translator, view = make()
    routes = [route(), route(name="b", remote=PLAIN, percent=12.5), route(name="c", remote=None)]
    translator.publish(routes)
    assert set(view.resources[ROUTE]) == {r.route_config for r in routes}
    for r in routes:
        envelope = Any.FromString(view.resources[ROUTE][r.route_config].any)
        assert envelope.type_url == ROUTE
        assert decoded_routes(view, r) == RouteConfiguration(
            name=f"overspill/inference/{r.name}/routes",
            virtual_hosts=[VirtualHost.FromString(res.virtual_host(r))],
        )
    # A scope per Host name without port: `svc:80` and `svc` both pick the model's routes.
    assert scopes(view) == {
        host: f"overspill/inference/{n}/routes"
        for n in ("llm", "b", "c")
        for host in (n, f"{n}.inference", f"{n}.inference.svc", f"{n}.inference.svc.cluster.local")
    }


def test_adding_a_model_changes_only_its_own_resources():
    translator, view = make()
    translator.publish([route(name=f"m{i}") for i in range(20)])
    before = versions(view)
    translator.publish([route(name=f"m{i}") for i in range(21)])
    new = route(name="m20")
    for type_url, names in (
        (CLUSTER, {new.local_cluster, new.remote_cluster}),
        (ENDPOINT, {new.local_cluster}),
        (ROUTE, {new.route_config}),
        (SCOPED_ROUTE, set(new.hosts)),
    ):
        assert view.changed_since(type_url, before[type_url]) == names, type_url
    assert view.route_uses(new.route_config) == (
        frozenset({new.local_cluster, new.remote_cluster}),
        frozenset({new.local_cluster}),
    )


def test_a_host_name_two_models_share_is_one_scope_owned_by_the_first_model():
    """The reconciler gives `svc` to one model; another Service of that name elsewhere keeps its
    `svc:port`. One scope per Host name: it routes to the first model by namespace/name."""
    a = ModelRoute("a", "llm", ("llm", "llm:80", "llm.a"), (("10.0.0.1", 80),), (), 0)
    b = ModelRoute("b", "llm", ("llm:8080", "llm.b", "llm.b:8080"), (("10.0.0.2", 80),), (), 0)
    translator, view = make()
    translator.publish([b])
    assert scopes(view) == {"llm": b.route_config, "llm.b": b.route_config}
    translator.publish([a, b])
    assert scopes(view) == {"llm": a.route_config, "llm.a": a.route_config, "llm.b": b.route_config}
    translator.publish([b])
    assert scopes(view) == {"llm": b.route_config, "llm.b": b.route_config}


def test_the_field_table_is_what_envoy_data_plane_says():
    """The builders number fields from `xds.schema`; regenerated from the installed
    envoy-data-plane, it must be unchanged (`python -m xds.fields` writes it)."""
    assert fields.generate() == fields.SCHEMA_PATH.read_text()


# Everything `overspill serve` imports; then translated: a model with one https remote, and one
# with two remotes (the first with a header from a Secret) and spill-over.
SERVE_IMPORTS = """
import sys
import overspill.cli, overspill.plane
from api.credentials import SecretHeader, SecretKeyRef, SecretValue
from api.crd import RemoteBackend, Spillover
from api.desired import ModelRoute, service_domains
from xds.snapshot import Translator

hosted = RemoteBackend("llm.standby.example.com", 443, "https", "/v1", (("x-tenant", "acme"),))
key = SecretHeader("x-api-key", SecretKeyRef("remote-token", "token", "spec"), "Bearer ")
token = ((("remote-token", "token"), SecretValue(b"t")),)
keyed = RemoteBackend("a.example.com", 443, "https", secret_headers=(key,), secrets=token)
plain = RemoteBackend("10.9.8.7", 8080, "http")
endpoints = (("10.0.0.1", 8000),)
one = ModelRoute("inference", "llm", service_domains("llm", "inference", 80), endpoints, (hosted,), 50.0)
domains = service_domains("two", "inference", 80)
spill = Spillover(enabled=True)
two = ModelRoute("inference", "two", domains, endpoints, (keyed, plain), 50.0, spillover=spill)
Translator("127.0.0.1", 10000).publish([one, two])
print(sorted({m.split(".")[0] for m in sys.modules} & {"envoy_data_plane", "pydantic", "betterproto2"}))
"""


def test_serving_never_imports_the_typed_messages():
    """Importing envoy-data-plane's message types (and pydantic) is half a second of every start:
    the control plane and every resource it builds (several remotes, spill-over, credentials
    too) do without them."""
    out = subprocess.run(
        [sys.executable, "-c", SERVE_IMPORTS], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_cached_resource_decodes_to_the_typed_message():
    """The per-model resources are byte joins (xds.fields): decoded, they are exactly the
    envoy-data-plane messages written out here field by field."""
    translator, view = make()
    r = route()
    translator.publish([r])
    retry = RetryPolicy(retry_on=res.RETRY_ON, num_retries=2)
    ads = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
    local = Cluster(
        name=r.local_cluster,
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=ads),
        connect_timeout=res.CONNECT_TIMEOUT,
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        lrs_report_endpoint_metrics=["named_metrics.*"],  # the pods' ORCA load in Envoy's reports
    )
    tls = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(
            validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=HOSTED.ca_file),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.DNS, matcher=StringMatcher(exact=HOSTED.host)
                    )
                ],
            )
        ),
        sni=HOSTED.host,
    )
    remote = Cluster(
        name=r.remote_cluster,
        type=ClusterDiscoveryType.LOGICAL_DNS,
        connect_timeout=res.CONNECT_TIMEOUT,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        wait_for_warm_on_init=False,
        load_assignment=ClusterLoadAssignment(
            cluster_name=r.remote_cluster,
            endpoints=[LocalityLbEndpoints(lb_endpoints=[lb_endpoint(HOSTED.host, HOSTED.port)])],
        ),
        transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)),
    )
    clusters = {
        n: Cluster.FromString(Any.FromString(x.any).value) for n, x in view.resources[CLUSTER].items()
    }
    assert clusters == {r.local_cluster: local, r.remote_cluster: remote}
    (cla,) = view.resources[ENDPOINT].values()
    assert Any.FromString(cla.any).type_url == ENDPOINT
    assert ClusterLoadAssignment.FromString(Any.FromString(cla.any).value) == ClusterLoadAssignment(
        cluster_name=r.local_cluster,
        endpoints=[LocalityLbEndpoints(lb_endpoints=[lb_endpoint(ip, port) for ip, port in r.endpoints])],
    )
    (vhost,) = decoded_routes(view, r).virtual_hosts
    assert vhost == VirtualHost(
        name="inference/llm",
        domains=list(r.domains),
        routes=[
            Route(
                name="remote",
                match=RouteMatch(
                    prefix="/",
                    runtime_fraction=RuntimeFractionalPercent(
                        default_value=FractionalPercent(denominator=FractionalPercentDenominatorType.MILLION),
                        runtime_key=r.runtime_key,
                    ),
                ),
                route=RouteAction(
                    cluster=r.remote_cluster,
                    host_rewrite_literal=HOSTED.host,
                    prefix_rewrite="/v1/llm/",
                    timeout=res.ROUTE_TIMEOUT,
                    retry_policy=retry,
                ),
                request_headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(key=k, value=v),
                        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for k, v in HOSTED.headers_to_add
                ],
            ),
            Route(
                name="local",
                match=RouteMatch(prefix="/"),
                route=RouteAction(cluster=r.local_cluster, timeout=res.ROUTE_TIMEOUT, retry_policy=retry),
                request_headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(key="endpoint-load-metrics-format", value="TEXT"),
                        append_action=HeaderValueOptionHeaderAppendAction.ADD_IF_ABSENT,
                    )
                ],
            ),
        ],
    )
    (lis,) = view.resources[LISTENER].values()
    assert Listener.FromString(Any.FromString(lis.any).value) == Listener.FromString(
        res.listener("127.0.0.1", 10000)
    )
    assert len(view.resources[RUNTIME]) == 8  # every layer exists, even empty: Envoy waits for each


def lb_endpoint(ip: str, port: int) -> LbEndpoint:
    return LbEndpoint(
        endpoint=Endpoint(address=Address(socket_address=SocketAddress(address=ip, port_value=port)))
    )


def test_a_scoped_view_holds_only_its_models():
    translator, _ = make()
    translator.publish([route(name="a", namespace="team-a"), route(name="b", namespace="team-b")])
    scoped = translator.cache.view(Scope.from_metadata({"overspill": {"namespaces": ["team-a"]}}))
    assert set(scoped.resources[CLUSTER]) == {"overspill/team-a/a/local", "overspill/team-a/a/remote"}
    assert set(scoped.resources[ROUTE]) == {"overspill/team-a/a/routes"}
    assert set(scopes(scoped).values()) == {"overspill/team-a/a/routes"}
    translator.publish([route(name="a", namespace="team-a"), route(name="b", namespace="team-b", percent=10)])
    assert scoped.version[RUNTIME] == 1 + 1  # built, then untouched by team-b's change


def test_resource_version_is_a_content_hash():
    a = Resource.of(CLUSTER, "x", b"abc")
    assert a == Resource.of(CLUSTER, "x", b"abc")
    assert a.version != Resource.of(CLUSTER, "x", b"abd").version


def test_discovery_response_decodes():
    translator, view = make()
    translator.publish([route(name=f"m{i}") for i in range(10)])
    resources = [r.any for r in view.resources[CLUSTER].values()]
    assert any(len(r) > 127 for r in resources)  # multi-byte length varints
    body = wire.discovery_response("7", CLUSTER, "nonce-1", resources)
    response = DiscoveryResponse.FromString(body)
    assert (response.version_info, response.type_url, response.nonce) == ("7", CLUSTER, "nonce-1")
    assert len(response.resources) == 20
    assert {Cluster.FromString(a.value).name for a in response.resources} == set(view.resources[CLUSTER])


def test_empty_discovery_response_decodes():
    response = DiscoveryResponse.FromString(wire.discovery_response("", ROUTE, "n", []))
    assert (response.version_info, response.type_url, response.nonce, response.resources) == (
        "",
        ROUTE,
        "n",
        [],
    )


NAMES = ["", "overspill/team-a/m/routes", "x" * 127, "y" * 128, "z" * 300, *(f"n{i}" for i in range(1000))]


METADATA = {
    "overspill": {"namespaces": ["a", "b"], "matchLabels": {"tier": "x"}, "listenerPort": 10001},
    "flag": True,
    "none": None,
    "text": "t",
}


def test_requests_read_by_hand_hold_what_envoy_data_plane_reads():
    sotw = DiscoveryRequest(
        version_info="12",
        node=Node(id="edge", cluster="c", metadata=Struct.from_dict(METADATA)),
        resource_names=NAMES,
        type_url=ROUTE,
        response_nonce="3-45",
        error_detail=Status(code=3, message="rejected"),
    )
    got = wire.parse_sotw_request(bytes(sotw))
    assert (got.version_info, got.type_url, got.response_nonce) == ("12", ROUTE, "3-45")
    assert got.resource_names == frozenset(NAMES)  # a set: order is free
    node = sotw.node
    assert (got.node.id, got.node.cluster, got.node.metadata) == (
        node.id,
        node.cluster,
        node.metadata.to_dict(),
    )
    assert (got.error_detail.code, got.error_detail.message) == (3, "rejected")
    delta = DeltaDiscoveryRequest(
        node=Node(id="edge"),
        type_url=ROUTE,
        resource_names_subscribe=NAMES,
        resource_names_unsubscribe=["a", "b" * 200],
        initial_resource_versions={"a": "1", "c": "2"},
        response_nonce="9",
    )
    got = wire.parse_delta_request(bytes(delta))
    assert (got.node.id, got.node.cluster, got.node.metadata) == ("edge", "", {})
    assert got.resource_names_subscribe == NAMES and got.resource_names_unsubscribe == ["a", "b" * 200]
    assert got.initial_resource_versions == {"a": "1", "c": "2"} and got.response_nonce == "9"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16384, 2**31])
def test_varint(n):
    encoded = wire.varint(n)
    value, shift = 0, 0
    for byte in encoded:
        value |= (byte & 0x7F) << shift
        shift += 7
    assert value == n
    assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


# --- `overspill render` ---


def render(tmp_path, capsys, *args: str) -> Path:
    assert main(["render", str(ROOT / "manifests" / "examples"), *args]) == 0
    out, _ = capsys.readouterr()
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    return path


def test_render_prints_every_resource_type(tmp_path, capsys):
    doc = yaml.safe_load(render(tmp_path, capsys).read_text())
    assert set(doc) == {SECRET, CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE, RUNTIME}
    assert doc[SECRET] == []  # the examples' remotes take no credentials
    names = {c["name"] for c in doc[CLUSTER]}
    assert names == {
        "overspill/default/my-model/local",
        "overspill/inference/llm/local",
        "overspill/inference/llm/remote",
    }
    vhosts = {v["name"]: v for config in doc[ROUTE] for v in config["virtualHosts"]}
    assert {s["routeConfigurationName"] for s in doc[SCOPED_ROUTE]} == {c["name"] for c in doc[ROUTE]}
    assert "my-model.default.svc.cluster.local:8080" in vhosts["default/my-model"]["domains"]
    assert "llm.inference:80" in vhosts["inference/llm"]["domains"]


def assert_envoy_accepts(bootstrap: Path) -> None:
    """Envoy's own `--mode validate` of a bootstrap file."""
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(bootstrap), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def test_rendered_bootstrap_is_accepted_by_envoy(tmp_path, capsys):
    assert_envoy_accepts(render(tmp_path, capsys, "--bootstrap"))


def test_render_warns_about_bad_documents_and_renders_the_rest(tmp_path, capsys):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for path in (ROOT / "manifests" / "examples").glob("*.yaml"):
        (manifests / path.name).write_text(path.read_text())
    broken = yaml.safe_load((manifests / "prometheus-model.yaml").read_text())
    broken["metadata"]["name"] = "broken"
    broken["spec"]["offloadingConfig"]["behavior"]["percentage"] = 150
    (manifests / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert main(["render", str(manifests), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    error = "inference/broken: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150"
    assert f"warning: {error}" in err.splitlines()
    doc = yaml.safe_load(out)
    assert {c["name"] for c in doc[CLUSTER]} >= {
        "overspill/default/my-model/local",
        "overspill/inference/llm/local",
    }


def test_render_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["render", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


# --- spill-over (behavior.spillover) ---


SPILL = Spillover(enabled=True)


def spilling(remote: RemoteBackend | None = HOSTED, spill: Spillover = SPILL) -> ModelRoute:
    return dataclasses.replace(route(remote=remote), spillover=spill)


def test_spillover_sends_the_local_route_through_the_composite_with_a_narrow_retry_policy():
    plain_remote, _ = VirtualHost.FromString(res.virtual_host(route())).routes
    remote_route, local_route = VirtualHost.FromString(res.virtual_host(spilling())).routes
    assert remote_route == plain_remote  # the decisions' steady share is routed as before
    action = local_route.route
    assert action.cluster == "overspill/inference/llm/spillover"
    policy = action.retry_policy
    assert policy.retry_on == "retriable-status-codes,connect-failure,refused-stream,reset-before-request"
    assert "5xx" not in policy.retry_on and "reset," not in policy.retry_on + ","
    assert (policy.num_retries, list(policy.retriable_status_codes)) == (1, [429, 503])
    assert action.auto_host_rewrite  # per attempt: a remote endpoint's hostname, a pod has none
    only_429 = VirtualHost.FromString(res.virtual_host(spilling(spill=Spillover(True, (429,))))).routes[1]
    assert list(only_429.route.retry_policy.retriable_status_codes) == [429]


def spill_clusters(r: ModelRoute) -> dict[str, Cluster]:
    return {
        name: Cluster.FromString(body) for name, body in failover.remote_clusters(r) + spillover.clusters(r)
    }


def test_spillover_composite_lists_local_then_remote_with_a_raised_retry_budget_and_the_remote_rewrites():
    clusters = spill_clusters(spilling(spill=Spillover(True, max_retries=64)))
    cluster = clusters["overspill/inference/llm/spillover"]
    assert cluster.lb_policy == ClusterLbPolicy.CLUSTER_PROVIDED
    assert cluster.cluster_type.name == "envoy.clusters.composite"
    config = cluster.cluster_type.typed_config.unpack()
    assert [c.name for c in config.clusters] == [
        "overspill/inference/llm/local",
        "overspill/inference/llm/remote",
    ]
    assert [t.max_retries for t in cluster.circuit_breakers.thresholds] == [64]
    assert cluster.lrs_report_endpoint_metrics == ["named_metrics.*"]
    # The remote's rewrites, made per attempt by the endpoint it goes to (as for several remotes).
    options = cluster.typed_extension_protocol_options[HTTP_OPTIONS].unpack()
    assert [f.name for f in options.http_filters] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.lua",
        "envoy.filters.http.upstream_codec",
    ]
    script = options.http_filters[1].typed_config.unpack().default_source_code.inline_string
    assert script == failover.lua_script((HOSTED,))
    (lb,) = clusters["overspill/inference/llm/remote"].load_assignment.endpoints[0].lb_endpoints
    assert lb.endpoint.hostname == "llm.standby.example.com"
    assert lb.metadata.filter_metadata["overspill"].to_dict() == {"remote": "0"}
    # Without spill-over the remote cluster is as before; a remote with nothing to rewrite needs
    # no filters.
    (plain,) = Cluster.FromString(res.remote_cluster(route())).load_assignment.endpoints[0].lb_endpoints
    assert not plain.endpoint.hostname and plain.metadata is None
    bare = spill_clusters(spilling(remote=PLAIN))["overspill/inference/llm/spillover"]
    assert not bare.typed_extension_protocol_options


def test_spillover_with_several_remotes_names_their_aggregate_and_rewrites_for_each():
    several = dataclasses.replace(spilling(), remotes=(HOSTED, PLAIN))
    clusters = spill_clusters(several)
    composite = clusters["overspill/inference/llm/spillover"]
    config = composite.cluster_type.typed_config.unpack()
    assert [c.name for c in config.clusters][1] == "overspill/inference/llm/remote"  # the aggregate
    options = composite.typed_extension_protocol_options[HTTP_OPTIONS].unpack()
    script = options.http_filters[1].typed_config.unpack().default_source_code.inline_string
    assert script == failover.lua_script((HOSTED, PLAIN))


def test_spillover_cluster_name_parses_back_to_the_model_but_is_no_side():
    assert model_of("overspill/inference/llm/spillover") == ("inference", "llm")
    assert side_of("overspill/inference/llm/spillover") is None
    assert side_of("overspill/inference/llm/local") == (("inference", "llm"), "local")


def test_turning_spillover_on_and_off_adds_and_removes_the_composite_cluster():
    translator, view = make()
    translator.publish([route()])
    assert set(view.resources[CLUSTER]) == {"overspill/inference/llm/local", "overspill/inference/llm/remote"}
    translator.publish([spilling()])
    assert "overspill/inference/llm/spillover" in view.resources[CLUSTER]
    assert decoded_routes(view, route()).virtual_hosts[0].routes[1].route.cluster.endswith("/spillover")
    translator.publish([route()])
    assert "overspill/inference/llm/spillover" not in view.resources[CLUSTER]
    assert decoded_routes(view, route()).virtual_hosts[0].routes[1].route.cluster.endswith("/local")


def test_a_static_bootstrap_with_spillover_is_accepted_by_envoy(tmp_path):
    path = tmp_path / "bootstrap.yaml"
    path.write_text(
        yaml.safe_dump(
            static_bootstrap(
                [
                    spilling(),
                    route(name="other"),
                    dataclasses.replace(route(name="two"), remotes=(HOSTED, PLAIN), spillover=SPILL),
                ],
                "127.0.0.1",
                10000,
            )
        )
    )
    assert_envoy_accepts(path)
