"""Offloading metrics from Envoy's own load reports: `envoy:` metric names, read without Prometheus.

| `metric.name` | value |
|---|---|
| `envoy:requests_in_flight` | requests in flight to the model |
| `envoy:request_rate` | requests per second sent to the model |
| `envoy:errors` | requests per second that failed at a backend (5xx) |
| `envoy:orca:<name>` | the mean of ORCA named metric `<name>` the model's own pods returned |

The counts are summed over the local and the remote side (`selector.matchLabels: {side: local}`
or `remote` picks one) and over every connected Envoy: demand is measured before the split, so
offloading does not hide the load it reacts to. ORCA metrics come from the local pods only; a side
that has answered no request in the last interval reads 0. `External` metrics take `Value` or
`AverageValue` (per ready local pod), `Pods` metrics `AverageValue`, as the HPA does.

Envoys are asked to report the clusters of the models read here (`ask`), nothing else.
Other names go to the `fallback` source (Prometheus, the metrics APIs), so one model may mix them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from api.desired import SIDES, cluster_name, side_clusters
from api.load import (
    ENVOY_PREFIX,
    ERRORS,
    IN_FLIGHT,
    ORCA_PREFIX,
    REQUEST_RATE,
    SIDE_LABEL,
    AskClusters,
    ClusterLoad,
    LoadLookup,
    ReporterCount,
    envoy_metric_problem,
)
from api.metric_spec import MetricSpec
from metrics.source import MetricScope, MetricSource, NoSource, Reading, Request

_NOT_READ = Reading(None, "not read")  # a slot's placeholder: each is the fallback's or ours

COUNTS = {
    IN_FLIGHT: lambda load: float(load.in_flight),
    REQUEST_RATE: lambda load: load.rate,
    ERRORS: lambda load: load.errors,
}


def is_envoy_metric(spec: MetricSpec) -> bool:
    return spec.name.startswith(ENVOY_PREFIX)


class EnvoyLoadMetrics:
    """Answers `envoy:` metrics from the load report sums (`load(cluster name)`); the rest goes to
    `fallback`. Reading is a dictionary lookup per side: no query, no I/O."""

    def __init__(
        self,
        load: LoadLookup,
        reporting: ReporterCount,
        ask: AskClusters | None = None,
        fallback: MetricSource | None = None,
    ):
        self.load = load
        self.reporting = reporting
        self.ask = ask  # told, at each evaluation, the clusters whose load the models read
        self.fallback = fallback or NoSource()
        self._split: tuple[Sequence[Request], list[int], list[int], frozenset[str]] | None = None

    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        if not is_envoy_metric(spec):
            return await self.fallback.read(spec, scope)
        return self.read_now(spec, scope)

    async def read_many(self, requests: Sequence[Request]) -> list[Reading]:
        # The controller hands over the same list while no model's metrics change: which of them
        # are ours, and the clusters they read, are worked out once per list, not every 5 s.
        split = self._split
        if split is None or split[0] is not requests:
            mine = [i for i, (spec, _) in enumerate(requests) if is_envoy_metric(spec)]
            taken = set(mine)
            theirs = [i for i in range(len(requests)) if i not in taken]
            clusters = frozenset(
                cluster
                for s in (requests[i][1] for i in mine)
                for side in SIDES
                for cluster in side_clusters(s.namespace, s.model, side, s.remotes)
            )
            split = self._split = (requests, mine, theirs, clusters)
        _, mine, theirs, clusters = split
        if self.ask is not None:
            self.ask(clusters)
        if not mine:  # the usual case: the fallback reads them all
            return await self.fallback.read_many(requests)
        out: list[Reading] = [_NOT_READ] * len(requests)
        if theirs:
            other = await self.fallback.read_many([requests[i] for i in theirs])
            for i, reading in zip(theirs, other, strict=True):
                out[i] = reading
        for n, i in enumerate(mine):
            out[i] = self.read_now(*requests[i])
            if n % 1000 == 999:
                await asyncio.sleep(0)  # 10,000 models: let the streams have the loop
        return out

    def read_now(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        where = f"{scope.namespace}/{scope.model}"
        problem = envoy_metric_problem(spec.type, spec.name, spec.selector)  # caught when parsed too
        if problem is not None:
            return Reading(None, f"{spec.name}: {problem[0]}: {problem[1]}")
        if not self.reporting():
            return Reading(None, "no Envoy is sending load reports (bootstrap load_stats_config)", where)
        side = spec.selector.get(SIDE_LABEL)
        if spec.name.startswith(ORCA_PREFIX):
            return self._orca(spec.name[len(ORCA_PREFIX) :], scope, where)
        value_of = COUNTS[spec.name]
        total = 0.0
        for s in (side,) if side else SIDES:
            for cluster in side_clusters(scope.namespace, scope.model, s, scope.remotes):
                load = self.load(cluster)
                if load is not None:
                    total += value_of(load)
        return Reading(total, None, where)

    def _orca(self, name: str, scope: MetricScope, where: str) -> Reading:
        load = self.load(cluster_name(scope.namespace, scope.model, "local")) or ClusterLoad()
        total, count = load.orca.get(name, (0.0, 0))
        if count:
            return Reading(total / count, None, where)
        if not load.finished:
            return Reading(0.0, None, where)  # idle, or no answer yet: no load reported
        return Reading(
            None,
            f"the local pods answer requests but none returned ORCA metric {name!r} "
            "(header endpoint-load-metrics, named_metrics)",
            where,
        )
