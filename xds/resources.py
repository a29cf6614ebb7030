"""Envoy resources for each model, built with envoy-data-plane types.

Per model: a local cluster (EDS, the Service's ready endpoints), a remote cluster (the
standby copy, TLS with SNI for https), and a virtual host answering the Service's DNS
names. The split is two routes: the first matches `remote_percent` % of requests
(`runtime_fraction`, its value delivered over RTDS so a weight change sends no route) and
carries the remote's path prefix, Host and headers; the second sends the rest to the local
cluster. One HTTP listener serves every model.
"""

from __future__ import annotations

import datetime

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
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpFilter,
    Rds,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType

from api.desired import ModelRoute, virtual_host_name
from xds.encode import pack

LISTENER_NAME = "overspill_http"
ROUTE_CONFIG_NAME = "overspill_routes"
# Inference can take minutes; Envoy's 15 s default route timeout would cut long generations.
ROUTE_TIMEOUT = datetime.timedelta(seconds=300)
CONNECT_TIMEOUT = datetime.timedelta(seconds=2)
# Only failures where the request surely never reached a backend are retried: inference
# requests are not idempotent, but a refused connection loses nothing when tried again.
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)


def _socket(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def load_assignment(route: ModelRoute) -> ClusterLoadAssignment:
    return ClusterLoadAssignment(
        cluster_name=route.local_cluster,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[
                    LbEndpoint(endpoint=Endpoint(address=_socket(ip, port))) for ip, port in route.endpoints
                ]
            )
        ],
    )


def local_cluster(route: ModelRoute, static: bool = False) -> Cluster:
    """The model's own pods. Served over EDS so an endpoint change never rebuilds the cluster."""
    cluster = Cluster(
        name=route.local_cluster,
        connect_timeout=CONNECT_TIMEOUT,
        # Inference requests vary widely in cost; least-request beats round robin there.
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
    )
    if static:
        cluster.type = ClusterDiscoveryType.STATIC
        cluster.load_assignment = load_assignment(route)
    else:
        cluster.type = ClusterDiscoveryType.EDS
        cluster.eds_cluster_config = ClusterEdsClusterConfig(eds_config=ADS)
    return cluster


def remote_cluster(route: ModelRoute) -> Cluster:
    remote = route.remote
    assert remote is not None
    cluster = Cluster(
        name=route.remote_cluster,
        connect_timeout=CONNECT_TIMEOUT,
        # One logical host for a DNS name, as for any large external service.
        type=ClusterDiscoveryType.STATIC if remote.is_ip else ClusterDiscoveryType.LOGICAL_DNS,
        dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
        load_assignment=ClusterLoadAssignment(
            cluster_name=route.remote_cluster,
            endpoints=[
                LocalityLbEndpoints(
                    lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(remote.host, remote.port)))]
                )
            ],
        ),
    )
    if remote.scheme == "https":
        context = CommonTlsContext()
        if not remote.insecure_skip_verify:
            context.validation_context = CertificateValidationContext(
                trusted_ca=DataSource(filename=remote.ca_file),
                match_typed_subject_alt_names=[
                    SubjectAltNameMatcher(
                        san_type=SubjectAltNameMatcherSanType.IP_ADDRESS
                        if remote.is_ip
                        else SubjectAltNameMatcherSanType.DNS,
                        matcher=StringMatcher(exact=remote.host),
                    )
                ],
            )
        tls = UpstreamTlsContext(common_tls_context=context, sni="" if remote.is_ip else remote.host)
        cluster.transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(tls))
    return cluster


def _fraction(percent: float) -> FractionalPercent:
    return FractionalPercent(
        numerator=round(percent * 10_000), denominator=FractionalPercentDenominatorType.MILLION
    )


def virtual_host(route: ModelRoute, default_percent: float = 0.0) -> VirtualHost:
    """The model's routes. The remote share comes from the runtime key; `default_percent`
    applies only while Envoy has no value for it (0: nothing spills over without a decision)."""
    retry = RetryPolicy(retry_on=RETRY_ON, num_retries=2)
    routes = []
    if route.remote is not None:
        remote = route.remote
        routes.append(
            Route(
                name="remote",
                match=RouteMatch(
                    prefix="/",
                    runtime_fraction=RuntimeFractionalPercent(
                        default_value=_fraction(default_percent), runtime_key=route.runtime_key
                    ),
                ),
                route=RouteAction(
                    cluster=route.remote_cluster,
                    host_rewrite_literal=remote.authority,
                    prefix_rewrite=f"{remote.path_prefix}/" if remote.path_prefix else "",
                    timeout=ROUTE_TIMEOUT,
                    retry_policy=retry,
                ),
                request_headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(key=k, value=v),
                        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for k, v in remote.headers_to_add
                ],
            )
        )
    routes.append(
        Route(
            name="local",
            match=RouteMatch(prefix="/"),
            route=RouteAction(cluster=route.local_cluster, timeout=ROUTE_TIMEOUT, retry_policy=retry),
        )
    )
    return VirtualHost(
        name=virtual_host_name(route.namespace, route.name), domains=list(route.domains), routes=routes
    )


def fallback_virtual_host() -> VirtualHost:
    """Any Host no model claims gets a plain 404 saying so, rather than a bare connection reset."""
    return VirtualHost(
        name="unknown-host",
        domains=["*"],
        routes=[
            Route(
                match=RouteMatch(prefix="/"),
                direct_response=DirectResponseAction(
                    status=404,
                    body=DataSource(inline_string="overspill: no ModelDeployment serves this Host\n"),
                ),
            )
        ],
    )


def route_configuration(routes: list[ModelRoute], static: bool = False) -> RouteConfiguration:
    """All models' virtual hosts; `static` bakes the current weights in as the defaults (no RTDS)."""
    return RouteConfiguration(
        name=ROUTE_CONFIG_NAME,
        virtual_hosts=[virtual_host(r, r.remote_percent if static else 0.0) for r in routes]
        + [fallback_virtual_host()],
    )


def listener(address: str, port: int, inline_routes: RouteConfiguration | None = None) -> Listener:
    hcm = HttpConnectionManager(
        stat_prefix="overspill",
        http_filters=[HttpFilter(name="envoy.filters.http.router", typed_config=pack(Router()))],
    )
    if inline_routes is not None:
        hcm.route_config = inline_routes
    else:
        hcm.rds = Rds(config_source=ADS, route_config_name=ROUTE_CONFIG_NAME)
    return Listener(
        name=LISTENER_NAME,
        address=_socket(address, port),
        filter_chains=[
            FilterChain(
                filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))]
            )
        ],
    )
