"""Envoy resources for each model, built with envoy-data-plane types (the per-model clusters
and endpoints as byte joins numbered by those types, see `fields`: ten thousand models load fast).

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

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLogFilter, ResponseFlagFilter
from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterEdsClusterConfig,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
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
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryPriority,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    ScopedRouteConfiguration,
    ScopedRouteConfigurationKey,
    ScopedRouteConfigurationKeyFragment,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    LocalReplyConfig,
    ResponseMapper,
    ScopedRds,
    ScopedRoutes,
    ScopedRoutesScopeKeyBuilder,
    ScopedRoutesScopeKeyBuilderFragmentBuilder,
    ScopedRoutesScopeKeyBuilderFragmentBuilderHeaderValueExtractor,
)
from envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3 import PreviousPrioritiesConfig
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType
from envoy_data_plane.google.protobuf import UInt64Value
from envoy_data_plane.message_pool import default_message_pool

from api.crd import RemoteBackend
from api.desired import ModelRoute, virtual_host_name
from xds import wire
from xds.credentials import NONE, RemoteCredentials, remote_credentials
from xds.encode import encode, pack
from xds.fields import Fields
from xds.types import ADS

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
SPILL_BACK_OFF = RetryPolicyRetryBackOff(
    base_interval=datetime.timedelta(milliseconds=1), max_interval=datetime.timedelta(milliseconds=5)
)


def _socket(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


# --- per-model clusters and endpoints, as byte joins (see `fields`) ---

_CLUSTER, _CLA, _LOCALITY, _LB_ENDPOINT = (
    Fields(Cluster), Fields(ClusterLoadAssignment), Fields(LocalityLbEndpoints), Fields(LbEndpoint)
)  # fmt: skip
_ENDPOINT, _ADDRESS, _SOCKET, _TRANSPORT = (
    Fields(Endpoint),
    Fields(Address),
    Fields(SocketAddress),
    Fields(TransportSocket),
)
_TLS, _COMMON_TLS, _VALIDATION = (
    Fields(UpstreamTlsContext),
    Fields(CommonTlsContext),
    Fields(CertificateValidationContext),
)
_SAN, _STRING_MATCHER, _DATA_SOURCE = Fields(SubjectAltNameMatcher), Fields(StringMatcher), Fields(DataSource)
TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_URL = default_message_pool.type_to_url[UpstreamTlsContext]

# The ORCA named metrics the model's own pods return (vLLM: num_requests_waiting,
# kv_cache_usage_perc) ride along in Envoy's load reports (`xds.lrs`). Local pods only: they are
# the user's own; a remote endpoint could name any number of metrics.
LRS_ORCA = ["named_metrics.*"]
# What every local cluster has but its name: the model's own pods over EDS, so an endpoint
# change never rebuilds the cluster; least-request, because inference requests vary widely in cost.
_LOCAL_EDS = encode(
    Cluster(
        type=ClusterDiscoveryType.EDS,
        eds_cluster_config=ClusterEdsClusterConfig(eds_config=ADS),
        connect_timeout=CONNECT_TIMEOUT,
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        lrs_report_endpoint_metrics=LRS_ORCA,
    )
)
_LOCAL_STATIC = encode(
    Cluster(
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        lrs_report_endpoint_metrics=LRS_ORCA,
    )
)
# One logical host for a remote's DNS name, as for any large external service. Envoy would
# hold its start (and every model's routes) until each remote's name resolves: it must not.
_REMOTE_COMMON = encode(
    Cluster(
        connect_timeout=CONNECT_TIMEOUT,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        wait_for_warm_on_init=False,
    )
)


def _endpoints(cluster_name: str, addresses: Iterable[tuple[str, int]]) -> bytes:
    """A ClusterLoadAssignment: one locality holding every address."""
    hosts = b"".join(
        _LOCALITY.lb_endpoints(
            _LB_ENDPOINT.endpoint(
                _ENDPOINT.address(_ADDRESS.socket_address(_SOCKET.address(ip) + _SOCKET.port_value(port)))
            )
        )
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


def remote_cluster(route: ModelRoute) -> bytes:
    """The standby copy (a model's one remote; several are `xds.failover`'s), with its
    credentials (see `credentials`)."""
    remote = route.remote
    assert remote is not None
    return backend_cluster(
        route.remote_cluster, remote, creds=remote_credentials(remote, route.remote_cluster)
    )


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
    kind = ClusterDiscoveryType.STATIC if remote.is_ip else ClusterDiscoveryType.LOGICAL_DNS
    address = _ADDRESS.socket_address(_SOCKET.address(remote.host) + _SOCKET.port_value(remote.port))
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
        san = _SAN.san_type(
            SubjectAltNameMatcherSanType.IP_ADDRESS if remote.is_ip else SubjectAltNameMatcherSanType.DNS
        ) + _SAN.matcher(_STRING_MATCHER.exact(remote.host))
        context += _COMMON_TLS.validation_context(
            _VALIDATION.trusted_ca(_DATA_SOURCE.filename(remote.ca_file))
            + _VALIDATION.match_typed_subject_alt_names(san)
        )
    tls = _TLS.common_tls_context(context) + _TLS.sni("" if remote.is_ip else remote.host)
    return out + _CLUSTER.transport_socket(
        _TRANSPORT.name(TLS_SOCKET) + _TRANSPORT.typed_config(wire.any_bytes(_TLS_URL, tls))
    )


_VHOST, _ROUTE, _MATCH, _ACTION = Fields(VirtualHost), Fields(Route), Fields(RouteMatch), Fields(RouteAction)
_RUNTIME_FRACTION, _FRACTION = Fields(RuntimeFractionalPercent), Fields(FractionalPercent)
_HEADER_OPTION, _HEADER = Fields(HeaderValueOption), Fields(HeaderValue)
_UINT64 = Fields(UInt64Value)
# Every route's action but its cluster and rewrites: long inference, and retries only where the
# request surely never reached a backend (see RETRY_ON).
_ACTION_COMMON = encode(
    RouteAction(timeout=ROUTE_TIMEOUT, retry_policy=RetryPolicy(retry_on=RETRY_ON, num_retries=2))
)
# Several remotes (see `xds.failover`): the same, and a retry goes to the next remote, not the
# one that just refused; Host is the chosen remote's (its endpoint's host name).
_ACTION_FAILOVER = encode(
    RouteAction(
        timeout=ROUTE_TIMEOUT,
        auto_host_rewrite=True,
        retry_policy=RetryPolicy(
            retry_on=RETRY_ON,
            num_retries=2,
            retry_priority=RetryPolicyRetryPriority(
                name="envoy.retry_priorities.previous_priorities",
                typed_config=pack(PreviousPrioritiesConfig(update_frequency=1)),
            ),
        ),
    )
)
_OVERWRITE = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
# vLLM (and other ORCA backends) return their load (`endpoint-load-metrics`) only when asked: the
# local pods are asked on every request, unless the client chose a format itself.
ORCA_FORMAT = ("endpoint-load-metrics-format", "TEXT")
_ASK_ORCA = _ROUTE.request_headers_to_add(
    _HEADER_OPTION.header(_HEADER.key(ORCA_FORMAT[0]) + _HEADER.value(ORCA_FORMAT[1]))
    + _HEADER_OPTION.append_action(HeaderValueOptionHeaderAppendAction.ADD_IF_ABSENT)
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
                + _HEADER_OPTION.append_action(_OVERWRITE)
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
    retry_on = SPILL_RETRY_ON if status_codes else RETRY_ON
    policy = RetryPolicy(
        retry_on=retry_on,
        num_retries=1,
        retriable_status_codes=list(status_codes),
        retry_back_off=SPILL_BACK_OFF,
    )
    return encode(RouteAction(timeout=ROUTE_TIMEOUT, retry_policy=policy, auto_host_rewrite=True))


def _remote_match(route: ModelRoute, default_percent: float) -> bytes:
    """Every path, for the remote's share of requests (the runtime key's value)."""
    fraction = _FRACTION.numerator(round(default_percent * 10_000)) + _FRACTION.denominator(
        FractionalPercentDenominatorType.MILLION
    )
    return _MATCH.prefix("/") + _MATCH.runtime_fraction(
        _RUNTIME_FRACTION.default_value(fraction) + _RUNTIME_FRACTION.runtime_key(route.runtime_key)
    )


def fallback_virtual_host() -> VirtualHost:
    """Any Host no model claims gets a plain 404 saying so, rather than a bare connection reset."""
    return VirtualHost(
        name="unknown-host",
        domains=["*"],
        routes=[
            Route(
                match=RouteMatch(prefix="/"),
                direct_response=DirectResponseAction(status=404, body=DataSource(inline_string=NOT_SERVED)),
            )
        ],
    )


def route_configuration(routes: list[ModelRoute], static: bool = False) -> RouteConfiguration:
    """Every model's virtual host in one route configuration, as the static bootstrap inlines it;
    `static` bakes the current weights in as the defaults (no RTDS)."""
    return RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[
            VirtualHost.FromString(virtual_host(r, r.remote_percent if static else 0.0)) for r in routes
        ]
        + [fallback_virtual_host()],
    )


_ROUTE_CONFIG, _SCOPE = Fields(RouteConfiguration), Fields(ScopedRouteConfiguration)
_SCOPE_KEY, _KEY_FRAGMENT = Fields(ScopedRouteConfigurationKey), Fields(ScopedRouteConfigurationKeyFragment)


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


def _scoped_routes() -> ScopedRoutes:
    """Scopes keyed by the Host without its port: `:authority` split at ':', the first element
    (a Host without port is the whole element). Scopes and route configurations come over ADS."""
    host = ScopedRoutesScopeKeyBuilderFragmentBuilderHeaderValueExtractor(
        name=":authority", element_separator=":", index=0
    )
    return ScopedRoutes(
        name=SCOPES_NAME,
        scope_key_builder=ScopedRoutesScopeKeyBuilder(
            fragments=[ScopedRoutesScopeKeyBuilderFragmentBuilder(header_value_extractor=host)]
        ),
        rds_config_source=ADS,
        scoped_rds=ScopedRds(scoped_rds_config_source=ADS),
    )


def _not_served() -> LocalReplyConfig:
    """Envoy answers a Host with no scope, or a scope whose routes do not match it (another port),
    with an empty 404 flagged NR (no route): this gives it the body the static bootstrap's
    fallback virtual host has. Our routes all match "/", so NR means no model serves the Host."""
    return LocalReplyConfig(
        mappers=[
            ResponseMapper(
                filter=AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=["NR"])),
                status_code=404,
                body=DataSource(inline_string=NOT_SERVED),
            )
        ]
    )


def listener(address: str, port: int, inline_routes: RouteConfiguration | None = None) -> Listener:
    """The HTTP listener: scoped routes over ADS, or (a static bootstrap) one inline route configuration."""
    hcm = HttpConnectionManager(
        stat_prefix=STAT_PREFIX,
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=pack(Router()))],
    )
    if inline_routes is not None:
        hcm.route_config = inline_routes
    else:
        hcm.scoped_routes = _scoped_routes()
        hcm.local_reply_config = _not_served()
    return Listener(
        name=LISTENER_NAME,
        address=_socket(address, port),
        filter_chains=[
            FilterChain(
                filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))]
            )
        ],
    )
