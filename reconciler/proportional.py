"""Proportional offload: the remote share that keeps the local metric at its target.

Pure and clock-agnostic, like `offload`. Each evaluation turns the readings into a demand
ratio D (demand over target) and recommends the share 1 - 1/D (D <= 1: nothing), capped at
`percentage` and rounded to a whole percent (the weight Envoy is given). As the HPA does:

- a metric measured on the local side only (`metricMeasures: Local`, the default: in-flight
  requests, queue depth) falls as offloading rises, so it is turned back into demand as
  local / (1 - share now); a `Demand` metric (counted before the split) is used as it is;
- with several metrics, the one asking the most decides;
- a reading beyond what the cap can serve counts as just that much (a queue that built up
  before offloading started would otherwise keep the estimate, and the share, high long after
  it has drained);
- while the local metric is within `tolerance` of its target the share does not move;
- while offloading, the demand is a moving average (time constant `smoothingSeconds`) so the
  share does not hunt on a noisy gauge; switching on takes the reading as it is;
- the share rises at once but lowers only to the highest share recommended over the last
  `bufferDurationSeconds` (the HPA's scale-down stabilization window).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from api.crd import Behavior
from api.status import MetricStatus

MIN_LOCAL_FRACTION = 0.01  # at 100 % remote a local-side metric says nothing about demand


def demand_ratio(metrics: list[MetricStatus], behavior: Behavior, share: float) -> float | None:
    """Demand over target of the most demanding metric with a reading; None if none can say.

    `share` is the remote share (0-1) the readings were taken under."""
    ratios = []
    for m in metrics:
        if m.current is None:
            continue
        target = m.spec.target.threshold
        ratio = m.current / target if target > 0 else (math.inf if m.current > 0 else 0.0)
        if behavior.metric_measures == "Local":
            if 1 - share < MIN_LOCAL_FRACTION:
                continue
            ratio /= 1 - share
        ratios.append(ratio)
    return max(ratios) if ratios else None


@dataclass
class ShareController:
    """The smoothed demand and the recent recommendations of one model."""

    demand: float | None = None  # smoothed demand ratio
    demand_at: float | None = None
    recommended: float = 0.0  # this evaluation's recommendation, percent
    # (time, recommended percent), oldest first; only those within the buffer duration are kept.
    window: deque[tuple[float, float]] = field(default_factory=deque)

    def observe(self, now: float, behavior: Behavior, metrics: list[MetricStatus], share: float) -> bool:
        """Fold this evaluation's readings into the demand estimate; False if none had a reading."""
        raw = demand_ratio(metrics, behavior, share / 100)
        if raw is None:
            return False
        if behavior.percentage < 100:
            raw = min(raw, 1 / (1 - behavior.percentage / 100))
        if share == 0 or self.demand is None or self.demand_at is None or behavior.smoothing_seconds <= 0:
            self.demand = raw  # not offloading: nothing to hunt, and switching on is as prompt as Fixed
        else:
            alpha = 1 - math.exp(-max(now - self.demand_at, 0.0) / behavior.smoothing_seconds)
            self.demand += alpha * (raw - self.demand)
        self.demand_at = now
        return True

    def recommend(self, behavior: Behavior, share: float) -> float:
        """The share (percent) that brings the local metric to its target, from the smoothed demand."""
        if self.demand is None:
            return share
        local = self.demand * (1 - share / 100) if behavior.metric_measures == "Local" else self.demand
        if share > 0 and abs(local - 1) <= behavior.tolerance:
            return share  # close enough: moving would only chase noise
        if self.demand <= 1 + (behavior.tolerance if share == 0 else 0.0):
            return 0.0
        return float(min(round(100 * (1 - 1 / self.demand)), behavior.percentage))

    def settle(self, now: float, behavior: Behavior, recommended: float) -> float:
        """The share to apply: the highest recommendation over the last buffer duration."""
        self.recommended = recommended
        self.window.append((now, recommended))
        while self.window and self.window[0][0] <= now - behavior.buffer_duration_seconds:
            self.window.popleft()
        return max((r for _, r in self.window), default=recommended)

    def held_until(self, behavior: Behavior, share: float) -> float | None:
        """When the share applied now stops being held by the window (None if nothing holds it)."""
        if self.recommended >= share:
            return None
        times = [t for t, r in self.window if r >= share]
        return max(times) + behavior.buffer_duration_seconds if times else None

    def reset(self) -> None:
        self.demand = self.demand_at = None
        self.recommended = 0.0
        self.window.clear()
