"""The Prometheus informer: offloading metrics read with PromQL over the HTTP API.

An External (or Object/Pods) metric's `name` is a metric name, to which
`selector.matchLabels` add label matchers, or a whole PromQL expression. Every series
the query returns is summed, as the HPA sums an external metric's values.
"""

from __future__ import annotations

import json
import math

import aiohttp

from api.metric_spec import MetricSpec
from metrics.source import MetricScope, Reading


def promql_for(spec: MetricSpec) -> str:
    if spec.is_promql_expression or not spec.selector:
        return spec.name
    matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(spec.selector.items()))
    return f"{spec.name}{{{matchers}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class PrometheusInformer:
    """Queries one Prometheus server; never raises, every failure becomes a `Reading` error."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout: float = 3.0):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url  # seed 002 writes the address as host:port
        self.session = session
        self.timeout = timeout

    async def read(self, spec: MetricSpec, scope: MetricScope | None = None) -> Reading:
        if spec.type in ("Resource", "ContainerResource"):
            return Reading(
                None,
                f"{spec.type} metrics come from metrics-server; the Prometheus informer "
                "reads External, Object and Pods metrics",
            )
        query = promql_for(spec)
        try:
            async with self.session.get(
                f"{self.url}/api/v1/query",
                params={"query": query},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                status, text = resp.status, await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Reading(
                None, f"prometheus unreachable at {self.url}: {type(exc).__name__} {exc}".strip(), query
            )
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return Reading(None, f"prometheus at {self.url} answered HTTP {status}: {text[:200]!r}", query)
        if body.get("status") != "success":
            return Reading(None, f"prometheus error for {query!r}: {body.get('error', body)}", query)
        return _total(body.get("data"), query)


def _total(data: object, query: str) -> Reading:
    """The sum of an instant vector's samples (or a scalar); any other shape is an error, not a crash."""
    try:
        rtype, result = data.get("resultType"), data.get("result")  # type: ignore[union-attr]
        if rtype == "scalar":
            values = [result[1]]
        elif rtype == "vector":
            values = [series["value"][1] for series in result or []]
        else:
            return Reading(
                None, f"query {query!r} returned a {rtype}, want an instant vector or scalar", query
            )
        numbers = [v for v in (float(v) for v in values) if not math.isnan(v)]
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        return Reading(None, f"query {query!r}: unexpected answer from prometheus ({exc})", query)
    if not numbers:
        return Reading(None, f"query {query!r} returned no series", query)
    return Reading(sum(numbers), None, query)
