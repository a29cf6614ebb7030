"""The Kubernetes HPA `MetricSpec`: its types and its validation.

Users copy HPA metric blocks into `offloadingConfig.metrics`, so the shapes follow
`autoscaling/v2` exactly. How a reading is held against a target is `metrics.hpa`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from api.fields import Fields
from api.load import ENVOY_PREFIX, envoy_metric_problem

METRIC_TYPES = ("Resource", "ContainerResource", "Pods", "Object", "External")
# Which target types the HPA accepts for each metric type.
ALLOWED_TARGETS = {
    "Resource": ("Utilization", "AverageValue"),
    "ContainerResource": ("Utilization", "AverageValue"),
    "Pods": ("AverageValue",),
    "Object": ("Value", "AverageValue"),
    "External": ("Value", "AverageValue"),
}
_SOURCE_KEY = {
    "Resource": "resource",
    "ContainerResource": "containerResource",
    "Pods": "pods",
    "Object": "object",
    "External": "external",
}
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


@dataclass(frozen=True)
class MetricTarget:
    """`target` of a MetricSpec; `threshold` is the one number the current value is held against."""

    type: str
    threshold: float


@dataclass(frozen=True)
class ObjectRef:
    """`describedObject` of an Object metric."""

    kind: str
    name: str
    api_version: str = ""


@dataclass(frozen=True)
class MetricSpec:
    """One entry of `offloadingConfig.metrics` (HPA `MetricSpec`).

    `name` is the resource name for Resource metrics and the metric name (or, with the
    Prometheus informer, a PromQL expression) for the others.
    """

    type: str
    name: str
    target: MetricTarget
    selector: dict[str, str] = field(default_factory=dict)
    container: str | None = None
    described_object: ObjectRef | None = None

    @property
    def is_promql_expression(self) -> bool:
        return not _METRIC_NAME.match(self.name)

    def describe(self) -> str:
        return self._described

    @cached_property  # asked for each reading of each evaluation; frozen, so computed once
    def _described(self) -> str:
        return f"{self.type}/{self.name}"


def parse_metric(f: Fields) -> MetricSpec | None:
    """Parse one HPA MetricSpec; errors land in `f.errors` with their field path."""
    mtype = f.str("type", required=True)
    if mtype is None:
        return None
    if mtype not in METRIC_TYPES:
        f.error("type", f"must be one of {', '.join(METRIC_TYPES)}, got {mtype!r}")
        return None
    source = f.sub(_SOURCE_KEY[mtype])
    if not f.has(_SOURCE_KEY[mtype]):
        f.error(_SOURCE_KEY[mtype], f"is required for type {mtype}")
        return None

    container = described = None
    selector: dict[str, str] = {}
    if mtype in ("Resource", "ContainerResource"):
        name = source.str("name", required=True)
        if name is not None and name not in ("cpu", "memory"):
            source.error("name", f"must be cpu or memory, got {name!r}")
        if mtype == "ContainerResource":
            container = source.str("container", required=True)
        target_f = source.sub("target")
        target_owner = source
    else:
        metric = source.sub("metric")
        name = metric.str("name", required=True)
        selector = metric.sub("selector").string_map("matchLabels")
        # Seed 002's page shows `target` under `metric`; the HPA puts it beside `metric`.
        target_owner = source if source.has("target") or not metric.has("target") else metric
        target_f = target_owner.sub("target")
        if mtype == "Object":
            obj = source.sub("describedObject")
            kind, oname = obj.str("kind", required=True), obj.str("name", required=True)
            if kind and oname:
                described = ObjectRef(kind, oname, obj.str("apiVersion", "") or "")
        if name and selector and not _METRIC_NAME.match(name):
            metric.sub("selector").error(
                "matchLabels", "only applies when metric.name is a metric name, not a PromQL expression"
            )
    if name and name.startswith(ENVOY_PREFIX):
        problem = envoy_metric_problem(mtype, name, selector)
        if problem is not None:
            source.error(*problem)
            return None
    if not target_owner.has("target"):
        target_owner.error("target", "is required")
        return None
    target = _parse_target(target_f, mtype)
    if name is None or target is None:
        return None
    return MetricSpec(mtype, name, target, selector, container, described)


def _parse_target(f: Fields, mtype: str) -> MetricTarget | None:
    ttype = f.str("type", required=True)
    if ttype is None:
        return None
    allowed = ALLOWED_TARGETS[mtype]
    if ttype not in allowed:
        f.error("type", f"must be {' or '.join(allowed)} for a {mtype} metric, got {ttype!r}")
        return None
    key = {"Utilization": "averageUtilization", "AverageValue": "averageValue", "Value": "value"}[ttype]
    threshold = f.int(key, required=True) if ttype == "Utilization" else f.number(key, required=True)
    if threshold is None:
        return None
    if threshold <= 0:
        f.error(key, f"must be greater than 0, got {threshold}")
        return None
    return MetricTarget(ttype, float(threshold))
