"""Spill-over inside Envoy: what the local pods turn away is retried on the remote at once.

With `behavior.spillover` on, a model's local route names a composite cluster
(`envoy.clusters.composite`) listing the local then the remote cluster: Envoy's first attempt
goes to the local pods, the one retry to the remote. The route's retry policy is narrow, because
inference is not idempotent (`resources.SPILL_RETRY_ON`): only a backend's own 429/503 (it turned
the request away before any work), a failed connection, a stream refused, or a reset before the
request was sent. Never a generic 5xx or a reset after the request went out. Envoy's
circuit-breaker overflow 503 carries `x-envoy-overloaded` and is never retried, so the local
limit must come from the pods.

The composite names the model's `.../remote` cluster, whatever stands behind it: one remote, or
the aggregate over several (`xds.failover`). The remote's rewrites are settings of the weighted
remote route, and a retry keeps the local route's request, so they are made per attempt from
the chosen host, as `xds.failover` makes them for several remotes: Host by `auto_host_rewrite`
(a remote endpoint's host name is its authority; a pod has none), the path prefix and headers
by the upstream filters of the cluster the route names, here the composite (Envoy runs the
route's cluster's upstream filters, not those of a cluster behind it). A pod's attempt goes as
it came, with no remote's credentials (the script removes what the injectors put there).
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCustomClusterType,
    ClusterLbPolicy,
)
from envoy_data_plane.envoy.extensions.clusters.composite.v3 import ClusterConfig, ClusterConfigClusterEntry

from api.desired import ModelRoute
from xds import failover
from xds import resources as res
from xds.encode import encode, pack
from xds.types import HTTP_OPTIONS

COMPOSITE = "envoy.clusters.composite"


def composite_cluster(route: ModelRoute) -> bytes:
    """The model's composite cluster [local, remote], with its retry budget (Envoy's `max_retries`
    circuit breaker, 3 by default) raised, and the local pods' ORCA metrics still reported (the
    router records them for the cluster the route names)."""
    spill = route.spillover
    assert spill is not None and route.remote is not None
    config = ClusterConfig(
        clusters=[
            ClusterConfigClusterEntry(name=route.local_cluster),
            ClusterConfigClusterEntry(name=route.remote_cluster),
        ]
    )
    cluster = Cluster(
        name=route.spillover_cluster,
        connect_timeout=res.CONNECT_TIMEOUT,
        lb_policy=ClusterLbPolicy.CLUSTER_PROVIDED,
        cluster_type=ClusterCustomClusterType(name=COMPOSITE, typed_config=pack(config)),
        circuit_breakers=CircuitBreakers(
            thresholds=[CircuitBreakersThresholds(max_retries=spill.max_retries)]
        ),
        lrs_report_endpoint_metrics=res.LRS_ORCA,
    )
    options = failover.upstream_options(route)
    if options is not None:
        cluster.typed_extension_protocol_options = {HTTP_OPTIONS: pack(options)}
    return encode(cluster)


def clusters(route: ModelRoute) -> list[tuple[str, bytes]]:
    """(name, Cluster) of the model's spill-over: its composite when on, else none."""
    if route.spillover is None or route.remote is None:
        return []
    return [(route.spillover_cluster, composite_cluster(route))]
