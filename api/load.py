"""Envoy's load reports as the rest of the control plane sees them: per cluster, summed over Envoys.

`xds.lrs` receives the reports and keeps these sums; `metrics.envoy` reads them as offloading
metrics. Neither imports the other: this is the shape they agree on, and the app layer hands
one's lookup to the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class ClusterLoad:
    """One cluster's load, summed over the latest report of every connected Envoy.

    Counts per report interval are kept as rates per second, so reports over different
    intervals (Envoys that reported late) add up. `orca` holds, per ORCA named metric, the sum
    of the values backends reported and how many requests carried one.
    """

    in_flight: int = 0
    rate: float = 0.0  # requests issued per second
    errors: float = 0.0  # requests that failed at the backend (5xx) per second
    finished: float = 0.0  # requests that completed (succeeded or failed) per second
    orca: dict[str, tuple[float, int]] = field(default_factory=dict)

    def add(self, other: ClusterLoad, sign: int = 1) -> None:
        self.in_flight += sign * other.in_flight
        self.rate += sign * other.rate
        self.errors += sign * other.errors
        self.finished += sign * other.finished
        for name, (total, count) in other.orca.items():
            was_total, was_count = self.orca.get(name, (0.0, 0))
            if was_count + sign * count <= 0:
                self.orca.pop(name, None)
            else:
                self.orca[name] = (was_total + sign * total, was_count + sign * count)


# What the app layer hands the metric source: the load of a cluster by name (None: not reported
# by any Envoy), how many Envoys are sending load reports, and where to say which clusters the
# metrics read (Envoys are asked to report those only).
LoadLookup = Callable[[str], ClusterLoad | None]
ReporterCount = Callable[[], int]
AskClusters = Callable[[frozenset[str]], None]


# --- the `envoy:` offloading metrics (read in `metrics.envoy`) ---

ENVOY_PREFIX = "envoy:"
ORCA_PREFIX = "envoy:orca:"
IN_FLIGHT, REQUEST_RATE, ERRORS = "envoy:requests_in_flight", "envoy:request_rate", "envoy:errors"
ENVOY_COUNTS = (IN_FLIGHT, REQUEST_RATE, ERRORS)
ENVOY_METRIC_TYPES = ("External", "Pods")
SIDE_LABEL = "side"


def envoy_metric_problem(mtype: str, name: str, selector: dict[str, str]) -> tuple[str, str] | None:
    """What is wrong with an `envoy:` metric, as (field under the metric source, message), or None."""
    if mtype not in ENVOY_METRIC_TYPES:
        return "metric.name", f"Envoy load metrics are External or Pods metrics, not {mtype}"
    if name not in ENVOY_COUNTS and not (name.startswith(ORCA_PREFIX) and len(name) > len(ORCA_PREFIX)):
        return (
            "metric.name",
            f"unknown Envoy load metric {name!r} (one of {', '.join(ENVOY_COUNTS)}, {ORCA_PREFIX}<name>)",
        )
    if set(selector) - {SIDE_LABEL}:
        return (
            "metric.selector.matchLabels",
            f"takes only {SIDE_LABEL} (local or remote) for Envoy load metrics",
        )
    side = selector.get(SIDE_LABEL)
    if side is not None and side not in ("local", "remote"):
        return f"metric.selector.matchLabels.{SIDE_LABEL}", f"must be local or remote, got {side!r}"
    if side == "remote" and name.startswith(ORCA_PREFIX):
        return (
            f"metric.selector.matchLabels.{SIDE_LABEL}",
            "ORCA metrics are reported for the local pods only",
        )
    return None
