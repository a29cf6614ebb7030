"""Offloading metrics from the Kubernetes metrics APIs, as the HPA reads them (seed 002's default).

`Resource` and `ContainerResource` come from `metrics.k8s.io` PodMetrics of the workload's
pods (found through its selector), with the HPA's arithmetic: utilization is the summed
usage over the summed requests of the ready pods that have metrics. Pods the HPA would
treat specially are handled as it does: a pod without metrics counts as 0 % of its
request when the others say "over", as 100 % when they say "under", and if that flips
the verdict there is no verdict (the last decision holds), just as the HPA then does not
scale. Unready pods are left out. A ready pod whose container has no request for the
resource is an error on the model's status, as it is for the HPA.
`Pods` and `Object` come from `custom.metrics.k8s.io`, `External` from
`external.metrics.k8s.io`, unless a Prometheus source is given for those.

The API is reached through an injected `get(path, params) -> JSON` so this layer needs no
Kubernetes client of its own. A namespace's pods and PodMetrics are listed once per
evaluation and shared by every model in it (selectors are matched here), so a thousand
models cost two API calls per namespace per evaluation, not two thousand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from api.fields import parse_quantity
from api.metric_spec import MetricSpec
from metrics.source import MetricScope, MetricSource, Reading, Request, read_each

Get = Callable[[str, dict], Awaitable[dict]]


def timed(get: Get, observe: Callable[[float], None]) -> Get:
    """`get`, each call's seconds (answered or failed) passed to `observe`."""

    async def call(path: str, params: dict) -> dict:
        started = time.monotonic()
        try:
            return await get(path, params)
        finally:
            observe(time.monotonic() - started)

    return call


METRICS = "/apis/metrics.k8s.io/v1beta1"
CUSTOM = "/apis/custom.metrics.k8s.io/v1beta2"
EXTERNAL = "/apis/external.metrics.k8s.io/v1beta1"


@dataclass(frozen=True)
class PodSample:
    """One pod as the HPA sees it: ready or not, its request and its usage (None: no metrics)."""

    name: str
    ready: bool
    request: float | None
    usage: float | None


def utilization(samples: list[PodSample], target: float) -> tuple[float | None, str | None]:
    """The HPA's utilization (percent of requests) and its verdict rules for missing metrics.

    Returns (utilization, None), or (None, why) when there is no verdict.
    """
    ready = [s for s in samples if s.ready]
    if not ready:
        return None, "no ready pod"
    no_request = [s.name for s in ready if not s.request]
    if no_request:
        return None, f"no request for this resource on pod(s) {', '.join(sorted(no_request)[:3])}"
    measured = [s for s in ready if s.usage is not None]
    if not measured:
        return None, "no pod metrics yet for any ready pod"
    requests = sum(s.request for s in measured)  # type: ignore[misc]
    value = 100 * sum(s.usage for s in measured) / requests  # type: ignore[misc]
    missing = [s for s in ready if s.usage is None]
    if missing:
        over = value > target
        fill = 0.0 if over else 1.0  # as the HPA: 0 % when scaling up, 100 % when scaling down
        total_requests = requests + sum(s.request for s in missing)  # type: ignore[misc]
        adjusted = (
            100 * (sum(s.usage for s in measured) + fill * sum(s.request for s in missing)) / total_requests
        )  # type: ignore[misc]
        if (adjusted > target) != over:
            return None, (
                f"{len(missing)} ready pod(s) without metrics leave the verdict open "
                f"({value:.0f}% measured, {adjusted:.0f}% assuming them {'idle' if over else 'full'})"
            )
    return value, None


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy a label selector string (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`,
    `a`, `!a`), as the API server's `labelSelector` would."""
    for term in _terms(selector):
        if " notin " in term or " in " in term:
            negate = " notin " in term
            key, _, values = term.partition(" notin " if negate else " in ")
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            present = key.strip() in labels and labels[key.strip()] in allowed
            if present == negate:
                return False
        elif "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.partition("==" if "==" in term else "=")
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _terms(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        terms.append(current.strip())
    return terms


RESOURCE_TYPES = ("Resource", "ContainerResource")  # read from metrics-server


class KubernetesMetrics:
    def __init__(self, get: Get, fallback: MetricSource | None = None, max_age: float = 1.0):
        self.get = get
        self.fallback = fallback  # Prometheus, for Pods/Object/External when configured
        self.max_age = max_age  # how long a namespace's pod lists serve every model reading them
        self._shared: dict[str, tuple[float, asyncio.Future]] = {}

    async def _listed(self, path: str, selector: str) -> list[dict]:
        """The items of a namespace-wide list that match `selector`, the list shared for `max_age`."""
        now = time.monotonic()
        entry = self._shared.get(path)
        if entry is None or now - entry[0] >= self.max_age:
            for key in [k for k, (at, _) in self._shared.items() if now - at >= self.max_age]:
                del self._shared[key]
            entry = self._shared[path] = (now, asyncio.ensure_future(self.get(path, {})))
        body = await asyncio.shield(entry[1])
        return [
            item
            for item in body.get("items") or []
            if selector_matches(selector, (item.get("metadata") or {}).get("labels") or {})
        ]

    async def read_many(self, requests: Sequence[Request]) -> list[Reading]:
        """Resource metrics from the shared pod lists; the others through the fallback's batched
        queries (Prometheus) when there is one."""
        if self.fallback is None:
            return await read_each(self, requests)
        mine = [i for i, (spec, _) in enumerate(requests) if spec.type in RESOURCE_TYPES]
        theirs = [i for i, (spec, _) in enumerate(requests) if spec.type not in RESOURCE_TYPES]
        own, other = await asyncio.gather(
            read_each(self, [requests[i] for i in mine]),
            self.fallback.read_many([requests[i] for i in theirs]),
        )
        out: dict[int, Reading] = dict(zip(mine, own, strict=True)) | dict(zip(theirs, other, strict=True))
        return [out[i] for i in range(len(requests))]

    async def read(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        try:
            if spec.type in RESOURCE_TYPES:
                return await self._resource(spec, scope)
            if self.fallback is not None:
                return await self.fallback.read(spec, scope)
            if spec.type == "Pods":
                return await self._pods(spec, scope)
            if spec.type == "Object":
                return await self._object(spec, scope)
            return await self._external(spec, scope)
        except Exception as exc:  # the API's errors, odd answers: never a crash
            return Reading(None, f"{spec.type} metric {spec.name}: {exc}")

    async def _resource(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        if not scope.pod_selector:
            return Reading(None, "spec.modelSourceRef: the workload (and its pod selector) is not known")
        pods = await self._listed(f"/api/v1/namespaces/{scope.namespace}/pods", scope.pod_selector)
        usage = await self._listed(f"{METRICS}/namespaces/{scope.namespace}/pods", scope.pod_selector)
        used = {
            (item.get("metadata") or {}).get("name"): _container_sum(
                item.get("containers") or [], spec, "usage"
            )
            for item in usage
        }
        samples = [
            PodSample(
                name=(p.get("metadata") or {}).get("name", ""),
                ready=_ready(p),
                request=_container_sum((p.get("spec") or {}).get("containers") or [], spec, "requests"),
                usage=used.get((p.get("metadata") or {}).get("name")),
            )
            for p in pods
            if not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        where = f"pods {scope.pod_selector} in {scope.namespace}"
        if spec.target.type == "Utilization":
            value, why = utilization(samples, spec.target.threshold)
            return Reading(
                value, None if why is None else f"{spec.name} utilization of {where}: {why}", where
            )
        measured = [s for s in samples if s.ready and s.usage is not None]
        if not measured:
            return Reading(None, f"no {spec.name} metrics for the ready {where}", where)
        return Reading(sum(s.usage for s in measured), None, where, pods=len(measured))  # type: ignore[misc]

    async def _pods(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        selector = ",".join(t for t in (scope.pod_selector, _selector(spec)) if t)
        body = await self.get(
            f"{CUSTOM}/namespaces/{scope.namespace}/pods/*/{spec.name}", {"labelSelector": selector}
        )
        values = [parse_quantity(i.get("value")) for i in body.get("items") or []]
        if not values:
            return Reading(None, f"custom metric {spec.name} has no value for pods {selector}")
        return Reading(sum(values), None, spec.name, pods=len(values))

    async def _object(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        obj = spec.described_object
        assert obj is not None
        resource = _plural(obj.kind)
        params = {"labelSelector": _selector(spec)} if spec.selector else {}
        body = await self.get(
            f"{CUSTOM}/namespaces/{scope.namespace}/{resource}/{obj.name}/{spec.name}", params
        )
        values = [parse_quantity(i.get("value")) for i in body.get("items") or []]
        if not values:
            return Reading(None, f"custom metric {spec.name} has no value for {obj.kind} {obj.name}")
        return Reading(sum(values), None, spec.name)

    async def _external(self, spec: MetricSpec, scope: MetricScope) -> Reading:
        params = {"labelSelector": _selector(spec)} if spec.selector else {}
        body = await self.get(f"{EXTERNAL}/namespaces/{scope.namespace}/{spec.name}", params)
        values = [parse_quantity(i.get("value")) for i in body.get("items") or []]
        if not values:
            return Reading(None, f"external metric {spec.name} returned no value")
        return Reading(sum(values), None, spec.name)


def _container_sum(containers: list[dict], spec: MetricSpec, field: str) -> float | None:
    """The resource's usage (PodMetrics) or requests (pod spec) summed over the pod's containers,
    or over the one container a ContainerResource metric names; None when none states it."""
    total, found = 0.0, False
    for c in containers:
        if spec.container is not None and c.get("name") != spec.container:
            continue
        source = c.get(field) if field == "usage" else (c.get("resources") or {}).get("requests")
        value = (source or {}).get(spec.name)
        if value is None:
            if field == "requests":
                return None  # the HPA needs every container's request
            continue
        total += parse_quantity(value)
        found = True
    return total if found else None


def _ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _selector(spec: MetricSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(spec.selector.items()))


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith(("s", "x", "ch", "sh")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    return lower + "s"
