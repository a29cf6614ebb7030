"""HPA arithmetic: how a reading is held against its target.

Follows `autoscaling/v2` exactly: a Value target compares the raw value, an AverageValue
target divides by the number of pods, Utilization is usage over requests.
"""

from __future__ import annotations

import math

from api.metric_spec import MetricSpec
from api.status import MetricStatus


def compare(spec: MetricSpec, total: float | None, pods: int, error: str | None = None) -> MetricStatus:
    """Hold a reading against its target as the HPA does.

    `total` is the metric summed over what it covers (all series, all pods); AverageValue
    targets (the only kind Pods metrics take) are per pod, so they divide by `pods` (at
    least 1). A Utilization reading is already a percentage of requests.
    """
    if total is None:
        return MetricStatus(spec, None, None, error or "no reading")
    current = total / max(pods, 1) if spec.target.type == "AverageValue" else total
    if not math.isfinite(current):  # +Inf from a division by zero in PromQL, or sums past 1e308
        return MetricStatus(
            spec, None, None, f"{spec.describe()}: the reading is not a finite number ({total})"
        )
    return MetricStatus(spec, current, current > spec.target.threshold)
