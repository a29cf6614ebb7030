"""What every metric source answers: a reading, or why there is none. Sources never raise."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
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
    model: str = ""  # the ModelDeployment's name (Envoy's load reports are per model)
    remotes: int = 1  # how many remotes it has: with several, their load is reported per remote


Request = tuple[MetricSpec, MetricScope]
READ_CONCURRENCY = 32  # reads in flight at once, so 10,000 models do not open 10,000 connections


class MetricSource(Protocol):
    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading: ...

    async def read_many(self, requests: Sequence[Request]) -> list[Reading]:
        """One reading per request, in order. Sources that can answer many in one query do."""
        ...


async def read_each(source: MetricSource, requests: Sequence[Request]) -> list[Reading]:
    """`read_many` for sources that read one at a time: a bounded number in flight."""
    slots = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(request: Request) -> Reading:
        async with slots:
            return await source.read(*request)

    return list(await asyncio.gather(*(one(r) for r in requests)))


class NoSource:
    """Used when no metric source is configured: every metric says so on the model's status."""

    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        return Reading(None, "no metric source configured (use --prometheus-url or --kubernetes)")

    async def read_many(self, requests: Sequence[Request]) -> list[Reading]:
        return [await self.read(*requests[0])] * len(requests) if requests else []
