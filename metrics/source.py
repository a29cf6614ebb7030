"""What every metric source answers: a reading, or why there is none. Sources never raise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from api.metric_spec import MetricSpec


@dataclass(frozen=True)
class Reading:
    """A metric's value summed over what it covers, or why there is none.

    `pods` is set when the source knows how many pods the sum covers (the metrics APIs do),
    so an AverageValue target divides by exactly those, as the HPA does.
    """

    total: float | None
    error: str | None = None
    query: str = ""
    pods: int | None = None


@dataclass(frozen=True)
class MetricScope:
    """Where a model's metric is read: its namespace and its workload's pods."""

    namespace: str = "default"
    pod_selector: str = ""  # the workload's `spec.selector`, as a label selector string


class MetricSource(Protocol):
    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading: ...


class NoSource:
    """Used when no metric source is configured: every metric says so on the model's status."""

    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        return Reading(None, "no metric source configured (use --prometheus-url or --kubernetes)")
