"""The Prometheus informer: offloading metrics read with PromQL over the HTTP API.

An External (or Object/Pods) metric's `name` is a metric name, to which
`selector.matchLabels` add label matchers, or a whole PromQL expression. Every series
the query returns is summed, as the HPA sums an external metric's values.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from api.metric_spec import MetricSpec
from metrics.source import READ_CONCURRENCY, MetricScope, Reading, Request


def promql_for(spec: MetricSpec) -> str:
    if spec.is_promql_expression or not spec.selector:
        return spec.name
    matchers = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(spec.selector.items()))
    return f"{spec.name}{{{matchers}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class PrometheusInformer:
    """Queries one Prometheus server; never raises, every failure becomes a `Reading` error."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        timeout: float = 3.0,
        observe: Callable[[float], None] | None = None,
    ):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url  # seed 002 writes the address as host:port
        self.session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.queries = 0  # sent, for the benchmark and /metrics
        self.observe = observe  # each query's seconds, answered or not
        self._plan: _Plan | None = None

    async def read(self, spec: MetricSpec, scope: MetricScope | None = None) -> Reading:
        if spec.type in ("Resource", "ContainerResource"):
            return _not_here(spec)
        query = promql_for(spec)
        data, error = await self._query(query)
        return Reading(None, error, query) if error is not None else _total(data, query)

    async def read_many(self, requests: Sequence[Request]) -> list[Reading]:
        """Models whose metric differs only in its label values are read with one query per
        metric, `sum by (labels) (name{label=~"v1|v2|…"})`, each taking its own series; any
        other query is sent once however many models ask it. 10,000 models, a few queries."""
        plan = self._plan
        if plan is None or not plan.reads(requests):
            plan = self._plan = _Plan.of(requests)
        out: list[Reading | None] = [None] * len(requests)
        for i, reading in plan.answered.items():
            out[i] = reading
        slots = asyncio.Semaphore(READ_CONCURRENCY)

        async def single(query: str, members: list[int]) -> None:
            async with slots:
                data, error = await self._query(query)
            reading = Reading(None, error, query) if error is not None else _total(data, query)
            for i in members:
                out[i] = reading

        async def batch(b: _Batch) -> None:
            async with slots:
                data, error = await self._query(b.query, b.form)
            if error is not None:
                # The same failure as last time gives the same Reading objects, which the
                # controller recognizes as unchanged without comparing 500 of them.
                if b.failed is None or b.failed[0] != error:
                    b.failed = (error, [Reading(None, error, query) for _, query, _ in b.members])
                for (i, _, _), reading in zip(b.members, b.failed[1], strict=True):
                    out[i] = reading
                return
            b.failed = None
            values = _by_labels(data, b.labels)
            for i, query, key in b.members:
                value = values.get(key)
                out[i] = Reading(
                    value, None if value is not None else f"query {query!r} returned no series", query
                )

        await asyncio.gather(
            *(single(q, m) for q, m in plan.singles.items()), *(batch(b) for b in plan.batches)
        )
        return [r if r is not None else Reading(None, "not read") for r in out]

    async def _query(self, query: str, form: bytes | None = None) -> tuple[object, str | None]:
        """The `data` of an instant query's answer, or why there is none. A long query (a batch)
        is POSTed, as URLs have limits; the API takes both. `form` is the query already
        form-encoded (a batch's, kept: encoding it is a dict lookup per character)."""
        self.queries += 1
        if len(query) <= 2000:
            request = self.session.get(
                f"{self.url}/api/v1/query", params={"query": query}, timeout=self._timeout
            )
        else:
            request = self.session.post(
                f"{self.url}/api/v1/query",
                data=form if form is not None else urlencode({"query": query}).encode(),
                headers=_FORM,
                timeout=self._timeout,
            )
        started = time.monotonic()
        try:
            async with request as resp:
                status, text = resp.status, await resp.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return None, f"prometheus unreachable at {self.url}: {type(exc).__name__} {exc}".strip()
        finally:
            if self.observe is not None:
                self.observe(time.monotonic() - started)
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return None, f"prometheus at {self.url} answered HTTP {status}: {text[:200]!r}"
        if body.get("status") != "success":
            return None, f"prometheus error for {query!r}: {body.get('error', body)}"
        return body.get("data"), None


_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
BATCH = 500  # models per batched query: a set of literals Prometheus matches as a set


@dataclass
class _Batch:
    """One batched query and, for each model it reads, its index among the requests, its own
    query (named in its errors) and the label values that pick its series from the answer."""

    query: str
    labels: tuple[str, ...]
    members: list[tuple[int, str, tuple[str, ...]]]
    failed: tuple[str, list[Reading]] | None = None  # the last failure and the readings it gave

    @functools.cached_property
    def form(self) -> bytes:
        return urlencode({"query": self.query}).encode()


@dataclass
class _Plan:
    """The queries that read a list of requests. The controller asks the same list (the same
    request objects) every evaluation until a model changes, so the plan is made once, not
    10,000 selectors escaped every 5 s."""

    requests: list[Request]
    answered: dict[int, Reading]  # never asked (Resource metrics come from metrics-server)
    singles: dict[str, list[int]]  # query -> the requests it answers
    batches: list[_Batch]

    def reads(self, requests: Sequence[Request]) -> bool:
        return len(requests) == len(self.requests) and all(
            a is b for a, b in zip(requests, self.requests, strict=True)
        )

    @classmethod
    def of(cls, requests: Sequence[Request]) -> _Plan:
        answered: dict[int, Reading] = {}
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        singles: dict[str, list[int]] = {}
        for i, (spec, _) in enumerate(requests):
            if spec.type in ("Resource", "ContainerResource"):
                answered[i] = _not_here(spec)
            elif _batchable(spec):
                groups.setdefault((spec.name, tuple(sorted(spec.selector))), []).append(i)
            else:
                singles.setdefault(promql_for(spec), []).append(i)
        for key, members in list(groups.items()):
            if len({tuple(sorted(requests[i][0].selector.items())) for i in members}) == 1:
                singles.setdefault(promql_for(requests[members[0]][0]), []).extend(groups.pop(key))
        batches = []
        for (name, labels), members in groups.items():
            for j in range(0, len(members), BATCH):
                specs = [(i, requests[i][0]) for i in members[j : j + BATCH]]
                matchers = ",".join(
                    f'{k}=~"{_escape("|".join(sorted({_regex_literal(s.selector[k]) for _, s in specs})))}"'
                    for k in labels
                )
                batches.append(
                    _Batch(
                        f"sum by ({','.join(labels)}) ({name}{{{matchers}}})",
                        labels,
                        [(i, promql_for(s), tuple(s.selector[k] for k in labels)) for i, s in specs],
                    )
                )
        return cls(list(requests), answered, singles, batches)


_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_REGEX_SPECIAL = set(".+*?()|[]{}^$\\/")


def _not_here(spec: MetricSpec) -> Reading:
    return Reading(
        None,
        f"{spec.type} metrics come from metrics-server; the Prometheus informer reads External, "
        "Object and Pods metrics",
    )


def _batchable(spec: MetricSpec) -> bool:
    return (
        not spec.is_promql_expression
        and bool(spec.selector)
        and all(_LABEL.match(k) and _regex_literal(v) is not None for k, v in spec.selector.items())
    )


def _regex_literal(value: str) -> str | None:
    """`value` as an RE2 literal, or None when it holds characters kept out of batches."""
    out = []
    for c in value:
        if c.isascii() and (c.isalnum() or c in "_-:"):
            out.append(c)
        elif c in _REGEX_SPECIAL:
            out.append("\\" + c)
        else:
            return None
    return "".join(out)


def _by_labels(data: object, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """A `sum by (labels)` vector as {label values: value}; NaN and odd shapes are left out."""
    found = {}
    try:
        for series in data.get("result") or []:  # type: ignore[union-attr]
            metric = series.get("metric") or {}
            value = float(series["value"][1])
            if not math.isnan(value):
                found[tuple(str(metric.get(k, "")) for k in labels)] = value
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        return {}
    return found


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
