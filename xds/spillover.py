"""Spill-over inside Envoy: what the local pods turn away is retried on the remote at once.

With `behavior.spillover` on, a model's local route names a composite cluster
(`envoy.clusters.composite`) listing the local then the remote cluster: Envoy's first attempt
goes to the local pods, a retry to the remote. The route's retry policy is narrow, because
inference is not idempotent: only a backend's own 429/503 (it turned the request away before any
work), a failed connection, a stream refused, or a reset before the request was sent. Never a
generic 5xx or a reset after the request went out. Envoy's circuit-breaker overflow 503 carries
`x-envoy-overloaded` and is never retried, so the local limit must come from the pods.

The remote names the model's `.../remote` cluster, so whatever stands behind that name serves
spilled requests too. The remote's rewrites (Host, path prefix, headers) are route settings of
the weighted remote route; a retry keeps the local route's request, so they are applied per
attempt from the chosen host instead: Host by `auto_host_rewrite` (the remote endpoint carries
its authority as hostname; local pods have none), the prefix and headers by upstream filters of
the composite cluster reading the endpoint's metadata (`%UPSTREAM_METADATA%`), empty for a local
pod, so a local attempt is sent as it came.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCustomClusterType,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as Mutation
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http1ProtocolOptions,
    Metadata,
)
from envoy_data_plane.envoy.config.route.v3 import RetryPolicy, RetryPolicyRetryBackOff, RouteAction
from envoy_data_plane.envoy.extensions.clusters.composite.v3 import ClusterConfig, ClusterConfigClusterEntry
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Struct

from api.crd import RemoteBackend
from api.desired import ModelRoute
from xds.encode import encode, pack

COMPOSITE = "envoy.clusters.composite"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Where a remote endpoint keeps what a spilled request needs (filter metadata namespace).
METADATA = "overspill.spillover"
# Carries the remote's path prefix from the header filter to the Lua filter (which alone may
# change `:path`); any value a client sent is removed first.
PREFIX_HEADER = "x-overspill-path-prefix"
# Turned away before any work, or never sent: nothing ran, so trying the remote loses nothing.
RETRY_ON = "retriable-status-codes,reset-before-request,connect-failure,refused-stream"
# Attempt 1 local, attempt 2 remote; a third would find no sub-cluster.
NUM_RETRIES = 1
# Spill over in milliseconds: Envoy's default back-off waits up to 25 ms before a retry.
BACK_OFF = RetryPolicyRetryBackOff(
    base_interval=datetime.timedelta(milliseconds=1), max_interval=datetime.timedelta(milliseconds=5)
)
_OVERWRITE = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
_PREFIX_LUA = f"""function envoy_on_request(request)
  local headers = request:headers()
  local prefix = headers:get("{PREFIX_HEADER}")
  if prefix then
    headers:remove("{PREFIX_HEADER}")
    headers:replace(":path", prefix .. headers:get(":path"))
  end
end
"""
_PREFIX_FILTER = HttpFilter(
    name="envoy.filters.http.lua",
    typed_config=pack(Lua(default_source_code=DataSource(inline_string=_PREFIX_LUA))),
)
_CODEC_FILTER = HttpFilter(name="envoy.filters.http.upstream_codec", typed_config=pack(UpstreamCodec()))


def enabled(route: ModelRoute) -> bool:
    return route.spillover is not None and route.remote is not None


@functools.cache
def local_action(status_codes: tuple[int, ...], timeout: datetime.timedelta) -> bytes:
    """The local route's action but its cluster: the narrow retry policy, and Host rewritten per
    attempt (a remote endpoint's hostname is its authority; a local pod has none)."""
    retry_on = RETRY_ON if status_codes else RETRY_ON.removeprefix("retriable-status-codes,")
    policy = RetryPolicy(
        retry_on=retry_on,
        num_retries=NUM_RETRIES,
        retriable_status_codes=list(status_codes),
        retry_back_off=BACK_OFF,
    )
    return encode(RouteAction(timeout=timeout, retry_policy=policy, auto_host_rewrite=True))


def _metadata_ref(*path: str) -> str:
    return "%UPSTREAM_METADATA(" + ":".join((METADATA, *path)) + ")%"


def endpoint_metadata(remote: RemoteBackend) -> bytes:
    """A remote endpoint's metadata (`LbEndpoint.metadata`): its path prefix and headers, which
    the composite cluster's upstream filters apply to the attempts sent to it."""
    fields: dict = {"headers": dict(remote.headers_to_add)}
    if remote.path_prefix:
        fields["path_prefix"] = remote.path_prefix
    return encode(Metadata(filter_metadata={METADATA: Struct.from_dict(fields)}))


def _rewrite_filters(remotes: Sequence[RemoteBackend]) -> list[HttpFilter]:
    """Upstream filters that give an attempt sent to a remote host that remote's headers and path
    prefix (of any of `remotes`, whichever the host is). Values come from the host, so a local
    attempt (no metadata: empty values, which Envoy leaves out) goes as it came."""
    prefixed = any(r.path_prefix for r in remotes)
    names = dict.fromkeys(name for r in remotes for name, _ in r.headers_to_add)
    mutations = [Mutation(remove=PREFIX_HEADER)]
    if prefixed:
        mutations.append(_from_host(PREFIX_HEADER, _metadata_ref("path_prefix")))
    mutations += [_from_host(name, _metadata_ref("headers", name)) for name in names]
    header = HttpFilter(
        name="envoy.filters.http.header_mutation",
        typed_config=pack(HeaderMutation(mutations=Mutations(request_mutations=mutations))),
    )
    return [header, _PREFIX_FILTER] if prefixed else [header]


def _from_host(name: str, value: str) -> Mutation:
    return Mutation(
        append=HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)
    )


def composite_cluster(
    route: ModelRoute, connect_timeout: datetime.timedelta, lrs_metrics: list[str]
) -> bytes:
    """The model's composite cluster [local, remote], with its retry budget raised, and the
    local pods' ORCA metrics still reported (the router records them for the cluster it routes to)."""
    spill, remote = route.spillover, route.remote
    assert spill is not None and remote is not None
    config = ClusterConfig(
        clusters=[
            ClusterConfigClusterEntry(name=route.local_cluster),
            ClusterConfigClusterEntry(name=route.remote_cluster),
        ]
    )
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        ),
        http_filters=[*_rewrite_filters((remote,)), _CODEC_FILTER],
    )
    return encode(
        Cluster(
            name=route.spillover_cluster,
            connect_timeout=connect_timeout,
            lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
            cluster_type=ClusterCustomClusterType(name=COMPOSITE, typed_config=pack(config)),
            circuit_breakers=CircuitBreakers(
                thresholds=[CircuitBreakersThresholds(max_retries=spill.max_retries)]
            ),
            typed_extension_protocol_options={PROTOCOL_OPTIONS: pack(options)},
            lrs_report_endpoint_metrics=lrs_metrics,
        )
    )
