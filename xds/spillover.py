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

from api.desired import ModelRoute
from xds import failover
from xds import resources as res
from xds.fields import Fields, uint32

COMPOSITE = "envoy.clusters.composite"
_COMPOSITE = Fields("envoy.extensions.clusters.composite.v3.ClusterConfig")
_ENTRY = Fields("envoy.extensions.clusters.composite.v3.ClusterConfig.ClusterEntry")
_CLUSTER = Fields("envoy.config.cluster.v3.Cluster")
_BREAKERS = Fields("envoy.config.cluster.v3.CircuitBreakers")
_THRESHOLDS = Fields("envoy.config.cluster.v3.CircuitBreakers.Thresholds")


def composite_cluster(route: ModelRoute) -> bytes:
    """The model's composite cluster [local, remote], with its retry budget (Envoy's `max_retries`
    circuit breaker, 3 by default) raised, and the local pods' ORCA metrics still reported (the
    router records them for the cluster the route names)."""
    spill = route.spillover
    assert spill is not None and route.remote is not None
    config = _COMPOSITE.clusters(_ENTRY.name(route.local_cluster)) + _COMPOSITE.clusters(
        _ENTRY.name(route.remote_cluster)
    )
    budget = _BREAKERS.thresholds(_THRESHOLDS.max_retries(uint32(spill.max_retries)))
    return (
        failover.custom_cluster(route.spillover_cluster, COMPOSITE, _COMPOSITE.pack(config))
        + _CLUSTER.circuit_breakers(budget)
        + b"".join(_CLUSTER.lrs_report_endpoint_metrics(m) for m in res.LRS_ORCA)
        + failover.upstream_options(route)
    )


def clusters(route: ModelRoute) -> list[tuple[str, bytes]]:
    """(name, Cluster) of the model's spill-over: its composite when on, else none."""
    if route.spillover is None or route.remote is None:
        return []
    return [(route.spillover_cluster, composite_cluster(route))]
