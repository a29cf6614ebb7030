"""Envoy resources for each model, and the listener, as byte joins of fields numbered by
envoy-data-plane's types (see `fields`: ten thousand models load fast, and a start does not
import the types at all).

Per model: a local cluster (EDS, the Service's ready endpoints), a remote cluster (the
standby copy, TLS with SNI for https), and a virtual host answering the Service's DNS
names, in a route configuration of its own. The split is two routes: the first matches
`remote_percent` % of requests (`runtime_fraction`, its value delivered over RTDS so a weight
change sends no route) and carries the remote's path prefix, Host and headers; the second
sends the rest to the local cluster.

One HTTP listener serves every model. It picks a model's route configuration by the request's
Host without its port (scoped routes, SRDS): one routing scope per Host name, so adding or
removing a model sends that model's scopes and route configuration, not every model's.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterable
from dataclasses import dataclass

from api.crd import RemoteBackend
from api.desired import ModelRoute, virtual_host_name
from xds import wire
from xds.fields import Fields, boolean, duration, uint32
from xds.types import ADS, HTTP_OPTIONS

LISTENER_NAME = "overspill_http"
ROUTE_CONFIG_NAME = "overspill_routes"  # the one inline route configuration of a static bootstrap
STAT_PREFIX = "overspill"  # the listener's stats are http.<this>.*
SCOPES_NAME = "overspill_scopes"  # the listener's scoped routes (Envoy's stats say scoped_rds.<this>)
NOT_SERVED = "overspill: no ModelDeployment serves this Host\n"
# Inference can take minutes; Envoy's 15 s default route timeout would cut long generations.
ROUTE_TIMEOUT = datetime.timedelta(seconds=300)
CONNECT_TIMEOUT = datetime.timedelta(seconds=2)
# Only failures where the request surely never reached a backend are retried: inference
# requests are not idempotent, but a refused connection loses nothing when tried again.
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# Spill-over (`xds.spillover`): the local route's one retry, on the remote, of what the pods
# turned away before any work: also their own 429/503 (`retriable_status_codes`); never a
# generic 5xx or a reset after the request was sent. The composite has two clusters: one retry.
SPILL_RETRY_ON = f"retriable-status-codes,{RETRY_ON}"
# Spill over in milliseconds: Envoy's default back-off waits up to 25 ms before a retry.
SPILL_BACK_OFF = (datetime.timedelta(milliseconds=1), datetime.timedelta(milliseconds=5))


# --- per-model clusters and endpoints, as byte joins (see `fields`) ---

_CLUSTER = Fields("envoy.config.cluster.v3.Cluster")
_EDS_CONFIG = Fields("envoy.config.cluster.v3.Cluster.EdsClusterConfig")
_CLA = Fields("envoy.config.endpoint.v3.ClusterLoadAssignment")
_LOCALITY = Fields("envoy.config.endpoint.v3.LocalityLbEndpoints")
_LB_ENDPOINT = Fields("envoy.config.endpoint.v3.LbEndpoint")
_ENDPOINT = Fields("envoy.config.endpoint.v3.Endpoint")
_ADDRESS = Fields("envoy.config.core.v3.Address")
_SOCKET = Fields("envoy.config.core.v3.SocketAddress")
_TRANSPORT = Fields("envoy.config.core.v3.TransportSocket")
_DATA_SOURCE = Fields("envoy.config.core.v3.DataSource")
_TLS = Fields("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
_COMMON_TLS = Fields("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext")
_VALIDATION = Fields("envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext")
_SAN = Fields("envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher")
_STRING_MATCHER = Fields("envoy.type.matcher.v3.StringMatcher")
TLS_SOCKET = "envoy.transport_sockets.tls"


def _address(address: str, port: int) -> bytes:
    """An `Address` body."""
    return _ADDRESS.socket_address(_SOCKET.address(address) + _SOCKET.port_value(port))


# The ORCA named metrics the model's own pods return (vLLM: num_requests_waiting,
# kv_cache_usage_perc) ride along in Envoy's load reports (`xds.lrs`). Local pods only: they are
# the user's own; a remote endpoint could name any number of metrics.
LRS_ORCA = ["named_metrics.*"]
# What every local cluster has but its name: the model's own pods over EDS, so an endpoint
# change never rebuilds the cluster; least-request, because inference requests vary widely in cost.
_LOCAL_COMMON = (
    _CLUSTER.connect_timeout(duration(CONNECT_TIMEOUT))
    + _CLUSTER.lb_policy("LEAST_REQUEST")
    + b"".join(_CLUSTER.lrs_report_endpoint_metrics(m) for m in LRS_ORCA)
)
_LOCAL_EDS = _CLUSTER.type("EDS") + _CLUSTER.eds_cluster_config(_EDS_CONFIG.eds_config(ADS)) + _LOCAL_COMMON
_LOCAL_STATIC = _CLUSTER.type("STATIC") + _LOCAL_COMMON
# One logical host for a remote's DNS name, as for any large external service. Envoy would
# hold its start (and every model's routes) until each remote's name resolves: it must not.
_REMOTE_COMMON = (
    _CLUSTER.connect_timeout(duration(CONNECT_TIMEOUT))
    + _CLUSTER.dns_lookup_family("V4_PREFERRED")
    + _CLUSTER.wait_for_warm_on_init(b"")  # a BoolValue of false
)


def _endpoints(cluster_name: str, addresses: Iterable[tuple[str, int]]) -> bytes:
    """A ClusterLoadAssignment: one locality holding every address."""
    hosts = b"".join(
        _LOCALITY.lb_endpoints(_LB_ENDPOINT.endpoint(_ENDPOINT.address(_address(ip, port))))
        for ip, port in addresses
    )
    return _CLA.cluster_name(cluster_name) + _CLA.endpoints(hosts)


def load_assignment(route: ModelRoute) -> bytes:
    """The model's ready endpoints (EDS)."""
    return _endpoints(route.local_cluster, route.endpoints)


def local_cluster(route: ModelRoute, static: bool = False) -> bytes:
    """The model's own pods; `static` inlines the endpoints (a bootstrap with no control plane)."""
    if static:
        return (
            _CLUSTER.name(route.local_cluster)
            + _LOCAL_STATIC
            + _CLUSTER.load_assignment(load_assignment(route))
        )
    return _CLUSTER.name(route.local_cluster) + _LOCAL_EDS


@dataclass(frozen=True)
class RemoteCredentials:
    """One remote's credentials as Envoy takes them (built by `xds.credentials`).

    `secrets` are (SDS name, serialized Secret); `cluster_fields` and `tls_fields` are encoded
    fields to append to the remote's Cluster and to its TLS `CommonTlsContext`; `token_endpoint`
    is the cluster to create for the OAuth2 token URL, as (name, where it answers)."""

    secrets: tuple[tuple[str, bytes], ...] = ()
    cluster_fields: bytes = b""
    tls_fields: bytes = b""
    token_endpoint: tuple[str, RemoteBackend] | None = None


NONE = RemoteCredentials()


def remote_cluster(route: ModelRoute, creds: RemoteCredentials = NONE) -> bytes:
    """The standby copy (a model's one remote; several are `xds.failover`'s), with `creds`."""
    assert route.remote is not None
    return backend_cluster(route.remote_cluster, route.remote, creds=creds)


def backend_cluster(
    name: str,
    remote: RemoteBackend,
    hostname: str = "",
    metadata: bytes = b"",
    creds: RemoteCredentials = NONE,
) -> bytes:
    """A cluster of one remote (or of its OAuth2 token endpoint): TLS with SNI and the name
    verified for https (unless told not to), and `creds`' fields. `hostname` and `metadata`
    (encoded) go on its one endpoint."""
    kind = "STATIC" if remote.is_ip else "LOGICAL_DNS"
    address = _address(remote.host, remote.port)
    host = _LB_ENDPOINT.endpoint(_ENDPOINT.address(address) + _ENDPOINT.hostname(hostname))
    host += _LB_ENDPOINT.metadata(metadata) if metadata else b""
    out = (
        _CLUSTER.name(name)
        + _CLUSTER.type(kind)
        + _REMOTE_COMMON
        + _CLUSTER.load_assignment(_CLA.cluster_name(name) + _CLA.endpoints(_LOCALITY.lb_endpoints(host)))
        + creds.cluster_fields
    )
    if remote.scheme != "https":
        return out
    context = creds.tls_fields
    if not remote.insecure_skip_verify:
        san = _SAN.san_type("IP_ADDRESS" if remote.is_ip else "DNS") + _SAN.matcher(
            _STRING_MATCHER.exact(remote.host)
        )
        context += _COMMON_TLS.validation_context(
            _VALIDATION.trusted_ca(_DATA_SOURCE.filename(remote.ca_file))
            + _VALIDATION.match_typed_subject_alt_names(san)
        )
    tls = _TLS.common_tls_context(context) + _TLS.sni("" if remote.is_ip else remote.host)
    return out + _CLUSTER.transport_socket(
        _TRANSPORT.name(TLS_SOCKET) + _TRANSPORT.typed_config(_TLS.pack(tls))
    )


_VHOST = Fields("envoy.config.route.v3.VirtualHost")
_ROUTE = Fields("envoy.config.route.v3.Route")
_MATCH = Fields("envoy.config.route.v3.RouteMatch")
_ACTION = Fields("envoy.config.route.v3.RouteAction")
_RETRY = Fields("envoy.config.route.v3.RetryPolicy")
_BACK_OFF = Fields("envoy.config.route.v3.RetryPolicy.RetryBackOff")
_PRIORITY = Fields("envoy.config.route.v3.RetryPolicy.RetryPriority")
_PREVIOUS = Fields("envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig")
_RUNTIME_FRACTION = Fields("envoy.config.core.v3.RuntimeFractionalPercent")
_FRACTION = Fields("envoy.type.v3.FractionalPercent")
_HEADER_OPTION = Fields("envoy.config.core.v3.HeaderValueOption")
_HEADER = Fields("envoy.config.core.v3.HeaderValue")
_UINT64 = Fields("google.protobuf.UInt64Value")
_TIMEOUT = _ACTION.timeout(duration(ROUTE_TIMEOUT))
# Every route's action but its cluster and rewrites: long inference, and retries only where the
# request surely never reached a backend (see RETRY_ON).
_ACTION_COMMON = _TIMEOUT + _ACTION.retry_policy(_RETRY.retry_on(RETRY_ON) + _RETRY.num_retries(uint32(2)))
# Several remotes (see `xds.failover`): the same, and a retry goes to the next remote, not the
# one that just refused; Host is the chosen remote's (its endpoint's host name).
_ACTION_FAILOVER = (
    _TIMEOUT
    + _ACTION.auto_host_rewrite(boolean(True))
    + _ACTION.retry_policy(
        _RETRY.retry_on(RETRY_ON)
        + _RETRY.num_retries(uint32(2))
        + _RETRY.retry_priority(
            _PRIORITY.name("envoy.retry_priorities.previous_priorities")
            + _PRIORITY.typed_config(_PREVIOUS.pack(_PREVIOUS.update_frequency(1)))
        )
    )
)
# vLLM (and other ORCA backends) return their load (`endpoint-load-metrics`) only when asked: the
# local pods are asked on every request, unless the client chose a format itself.
ORCA_FORMAT = ("endpoint-load-metrics-format", "TEXT")
_ASK_ORCA = _ROUTE.request_headers_to_add(
    _HEADER_OPTION.header(_HEADER.key(ORCA_FORMAT[0]) + _HEADER.value(ORCA_FORMAT[1]))
    + _HEADER_OPTION.append_action("ADD_IF_ABSENT")
)


def virtual_host(route: ModelRoute, default_percent: float = 0.0) -> bytes:
    """The model's routes. The remote share comes from the runtime key; `default_percent`
    applies only while Envoy has no value for it (0: nothing spills over without a decision)."""
    routes = b""
    if len(route.remotes) > 1:  # each remote's path prefix and headers are set on its cluster
        match = _remote_match(route, default_percent)
        action = _ACTION.cluster(route.remote_cluster) + _ACTION_FAILOVER
        routes += _VHOST.routes(_ROUTE.name("remote") + _ROUTE.match(match) + _ROUTE.route(action))
    elif route.remote is not None:
        remote = route.remote
        match = _remote_match(route, default_percent)
        action = (
            _ACTION.cluster(route.remote_cluster)
            + _ACTION.host_rewrite_literal(remote.authority)
            + _ACTION.prefix_rewrite(f"{remote.path_prefix}/" if remote.path_prefix else "")
            + _ACTION_COMMON
        )
        headers = b"".join(
            _ROUTE.request_headers_to_add(
                _HEADER_OPTION.header(_HEADER.key(k) + _HEADER.value(v))
                + _HEADER_OPTION.append_action("OVERWRITE_IF_EXISTS_OR_ADD")
            )
            for k, v in remote.headers_to_add
        )
        routes += _VHOST.routes(_ROUTE.name("remote") + _ROUTE.match(match) + _ROUTE.route(action) + headers)
    if route.spillover is not None and route.remote is not None:
        local = _ACTION.cluster(route.spillover_cluster) + _spill_action(route.spillover.status_codes)
        # The body is kept for the retry up to this size; a larger one is served locally only.
        kept = _ROUTE.request_body_buffer_limit(_UINT64.value(route.spillover.max_request_bytes))
    else:
        local, kept = _ACTION.cluster(route.local_cluster) + _ACTION_COMMON, b""
    routes += _VHOST.routes(
        _ROUTE.name("local") + _ROUTE.match(_MATCH.prefix("/")) + _ROUTE.route(local) + _ASK_ORCA + kept
    )
    return (
        _VHOST.name(virtual_host_name(route.namespace, route.name))
        + b"".join(_VHOST.domains(d) for d in route.domains)
        + routes
    )


@functools.cache
def _spill_action(status_codes: tuple[int, ...]) -> bytes:
    """The local route's action but its cluster with spill-over: the narrow retry, and Host
    rewritten per attempt (a remote endpoint's host name is its authority; a pod has none)."""
    base, most = SPILL_BACK_OFF
    policy = (
        _RETRY.retry_on(SPILL_RETRY_ON if status_codes else RETRY_ON)
        + _RETRY.num_retries(uint32(1))
        + (_RETRY.retriable_status_codes(status_codes) if status_codes else b"")
        + _RETRY.retry_back_off(
            _BACK_OFF.base_interval(duration(base)) + _BACK_OFF.max_interval(duration(most))
        )
    )
    return _TIMEOUT + _ACTION.retry_policy(policy) + _ACTION.auto_host_rewrite(boolean(True))


def _remote_match(route: ModelRoute, default_percent: float) -> bytes:
    """Every path, for the remote's share of requests (the runtime key's value)."""
    fraction = _FRACTION.numerator(round(default_percent * 10_000)) + _FRACTION.denominator("MILLION")
    return _MATCH.prefix("/") + _MATCH.runtime_fraction(
        _RUNTIME_FRACTION.default_value(fraction) + _RUNTIME_FRACTION.runtime_key(route.runtime_key)
    )


_ROUTE_CONFIG = Fields("envoy.config.route.v3.RouteConfiguration")
_SCOPE = Fields("envoy.config.route.v3.ScopedRouteConfiguration")
_SCOPE_KEY = Fields("envoy.config.route.v3.ScopedRouteConfiguration.Key")
_KEY_FRAGMENT = Fields("envoy.config.route.v3.ScopedRouteConfiguration.Key.Fragment")
_DIRECT = Fields("envoy.config.route.v3.DirectResponseAction")


def fallback_virtual_host() -> bytes:
    """Any Host no model claims gets a plain 404 saying so, rather than a bare connection reset."""
    answer = _DIRECT.status(404) + _DIRECT.body(_DATA_SOURCE.inline_string(NOT_SERVED))
    route = _ROUTE.match(_MATCH.prefix("/")) + _ROUTE.direct_response(answer)
    return _VHOST.name("unknown-host") + _VHOST.domains("*") + _VHOST.routes(route)


def route_configuration(routes: list[ModelRoute], static: bool = False) -> bytes:
    """Every model's virtual host in one route configuration, as the static bootstrap inlines it;
    `static` bakes the current weights in as the defaults (no RTDS)."""
    hosts = [virtual_host(r, r.remote_percent if static else 0.0) for r in routes] + [fallback_virtual_host()]
    return _ROUTE_CONFIG.name(ROUTE_CONFIG_NAME) + b"".join(_ROUTE_CONFIG.virtual_hosts(h) for h in hosts)


def model_route_configuration(route: ModelRoute, weight_inline: bool = False) -> bytes:
    """The model's own route configuration, served over RDS to the Envoys whose scopes name it.
    `weight_inline` writes the current remote share in as the runtime key's default: what an
    Envoy without the weight layers routes by (it has no value for the key)."""
    default = route.remote_percent if weight_inline else 0.0
    return _ROUTE_CONFIG.name(route.route_config) + _ROUTE_CONFIG.virtual_hosts(virtual_host(route, default))


def scoped_route(host: str, route_config: str) -> bytes:
    """The routing scope of one Host name (without port): requests for it use `route_config`.
    Named after its key, so an Envoy can never hold two scopes with the same key (it would
    reject the update)."""
    return (
        _SCOPE.name(host)
        + _SCOPE.route_configuration_name(route_config)
        + _SCOPE.key(_SCOPE_KEY.fragments(_KEY_FRAGMENT.string_key(host)))
    )


_HCM = "envoy.extensions.filters.network.http_connection_manager.v3."
_SCOPED, _KEY_BUILDER = Fields(_HCM + "ScopedRoutes"), Fields(_HCM + "ScopedRoutes.ScopeKeyBuilder")
_FRAGMENT_BUILDER = Fields(_HCM + "ScopedRoutes.ScopeKeyBuilder.FragmentBuilder")
_EXTRACTOR = Fields(_HCM + "ScopedRoutes.ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor")


def _scoped_routes() -> bytes:
    """Scopes keyed by the Host without its port: `:authority` split at ':', the first element
    (a Host without port is the whole element). Scopes and route configurations come over ADS."""
    host = _EXTRACTOR.name(":authority") + _EXTRACTOR.element_separator(":") + _EXTRACTOR.index(0)
    return (
        _SCOPED.name(SCOPES_NAME)
        + _SCOPED.scope_key_builder(_KEY_BUILDER.fragments(_FRAGMENT_BUILDER.header_value_extractor(host)))
        + _SCOPED.rds_config_source(ADS)
        + _SCOPED.scoped_rds(Fields(_HCM + "ScopedRds").scoped_rds_config_source(ADS))
    )


def _not_served() -> bytes:
    """Envoy answers a Host with no scope, or a scope whose routes do not match it (another port),
    with an empty 404 flagged NR (no route): this gives it the body the static bootstrap's
    fallback virtual host has. Our routes all match "/", so NR means no model serves the Host."""
    flags = Fields("envoy.config.accesslog.v3.ResponseFlagFilter").flags("NR")
    mapper = Fields(_HCM + "ResponseMapper")
    return Fields(_HCM + "LocalReplyConfig").mappers(
        mapper.filter(Fields("envoy.config.accesslog.v3.AccessLogFilter").response_flag_filter(flags))
        + mapper.status_code(uint32(404))
        + mapper.body(_DATA_SOURCE.inline_string(NOT_SERVED))
    )


_HTTP = Fields(_HCM + "HttpConnectionManager")
_HTTP_FILTER = Fields(_HCM + "HttpFilter")


def http_filter(name: str, config: bytes) -> bytes:
    """An `HttpFilter` (encoded) with its typed config (an encoded `Any`, see `Fields.pack`)."""
    return _HTTP_FILTER.name(name) + _HTTP_FILTER.typed_config(config)


_UPSTREAM = Fields(HTTP_OPTIONS)
_EXPLICIT = Fields(HTTP_OPTIONS + ".ExplicitHttpConfig")
_CODEC = http_filter(
    "envoy.filters.http.upstream_codec",
    Fields("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec").pack(b""),
)


def upstream_filters(filters: Iterable[bytes]) -> bytes:
    """The Cluster field that runs HTTP `filters` (encoded) on each attempt to its hosts (as
    HTTP/1.1), before the upstream codec: its `typed_extension_protocol_options` entry."""
    options = _UPSTREAM.explicit_http_config(_EXPLICIT.http_protocol_options(b"")) + b"".join(
        _UPSTREAM.http_filters(f) for f in (*filters, _CODEC)
    )
    return _CLUSTER.typed_extension_protocol_options(wire.entry(HTTP_OPTIONS, _UPSTREAM.pack(options)))


_LISTENER = Fields("envoy.config.listener.v3.Listener")
_CHAIN, _FILTER = Fields("envoy.config.listener.v3.FilterChain"), Fields("envoy.config.listener.v3.Filter")
_ROUTER = http_filter(
    "envoy.filters.http.router", Fields("envoy.extensions.filters.http.router.v3.Router").pack(b"")
)


def listener(address: str, port: int, inline_routes: bytes | None = None) -> bytes:
    """The HTTP listener: scoped routes over ADS, or (a static bootstrap) one inline route
    configuration (encoded, see `route_configuration`)."""
    hcm = _HTTP.stat_prefix(STAT_PREFIX) + _HTTP.http_filters(_ROUTER)
    if inline_routes is not None:
        hcm += _HTTP.route_config(inline_routes)
    else:
        hcm += _HTTP.scoped_routes(_scoped_routes()) + _HTTP.local_reply_config(_not_served())
    network = _FILTER.name("envoy.filters.network.http_connection_manager") + _FILTER.typed_config(
        _HTTP.pack(hcm)
    )
    return (
        _LISTENER.name(LISTENER_NAME)
        + _LISTENER.address(_address(address, port))
        + _LISTENER.filter_chains(_CHAIN.filters(network))
    )
