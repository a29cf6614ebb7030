"""What the control plane knows about each model: the one record that status, logs and metrics read.

The reconciler writes a `ModelStatus` per model on every reconcile; `/status`, `overspill
status`, the own-metrics collector (and later the CR's status subresource) only read it,
so a deleted model disappears from all of them at once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

from api.crd import ObjectKey
from api.metric_spec import MetricSpec


class Phase(StrEnum):
    STANDBY = "Standby"  # watching; all traffic local
    ACTIVATING = "Activating"  # a metric is over, waiting out activationDelaySeconds
    OFFLOADING = "Offloading"  # percentage % to the remote
    RELEASING = "Releasing"  # still offloading; every metric under, waiting out the buffer
    OUTAGE = "Outage"  # no ready local endpoint; 100 % to the remote
    REMOTE_DOWN = "RemoteUnavailable"  # offloading wanted but no usable remote; all local
    INVALID = "Invalid"  # cannot be routed as written (missing Service, port, a Host taken)


@dataclass(frozen=True)
class MetricStatus:
    """How one metric stands now: what the decision and the CR status are made of.

    `current` is in the target's units (already divided by pods for AverageValue);
    `over` is None when there is no usable reading.
    """

    spec: MetricSpec
    current: float | None
    over: bool | None
    error: str | None = None


@dataclass(frozen=True)
class EnvoyRejection:
    """An Envoy refused a response carrying this model's resources (a NACK).

    Held until that Envoy accepts a later version of the same type or goes away.
    """

    node: str
    type: str  # CDS, EDS, LDS, RDS, RTDS
    version: str
    message: str

    def __str__(self) -> str:
        return f"Envoy {self.node} rejected {self.type} version {self.version}: {self.message}"


@dataclass(frozen=True)
class PolicyRefusal:
    """A remote kept from a model's traffic by one of its local Policies.

    `reason` is `PolicyViolation` (the remote does not satisfy a rule), `PolicyNotFound` or
    `PolicyInvalid` (the Policy cannot be read, so no remote is allowed until it can).
    """

    remote: str  # RemoteBackend.url
    policy: str  # namespace/name
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class ModelStatus:
    """Everything known about one model after a reconcile.

    The counters live here, not in prometheus-client children, so a deleted model's
    series (counters included) disappear with its status.
    """

    key: ObjectKey
    phase: Phase = Phase.STANDBY
    remote_percent: float = 0.0
    reason: str = ""
    ready_endpoints: int = 0
    remote: str | None = None  # the preferred remote
    remote_usable: bool = False  # any remote usable
    remotes: list[tuple[str, bool]] = field(default_factory=list)  # each remote in order: url, usable
    spillover: bool = False  # Envoy retries what the local pods turn away on the remote now
    remote_credentials: str | None = None  # why a remote's credentials cannot be read (no value in it)
    metrics: list[MetricStatus] = field(default_factory=list)
    stale_metrics: list[str] = field(default_factory=list)  # without a reading for metricStaleAfterSeconds
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rejections: list[EnvoyRejection] = field(default_factory=list)
    local_policies: list[str] = field(default_factory=list)  # namespace/name, enforced here
    remote_policies: list[str] = field(default_factory=list)  # names passed to the remote
    refused: list[PolicyRefusal] = field(default_factory=list)  # remotes the local Policies keep out
    last_transition: float | None = None
    transitions: Counter[str] = field(default_factory=Counter)  # phase -> entries into it
    metric_read_errors: Counter[str] = field(default_factory=Counter)  # metric -> failed reads
    xds_nacks: Counter[str] = field(default_factory=Counter)  # xDS type -> NACKs

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def name(self) -> str:
        return self.key.name

    def to_dict(self) -> dict:
        return {
            "phase": self.phase.value,
            "state": self.phase.value,
            "remotePercent": self.remote_percent,
            "reason": self.reason,
            "readyEndpoints": self.ready_endpoints,
            "remote": self.remote,
            "remoteUsable": self.remote_usable,
            "remotes": [{"remote": url, "usable": usable} for url, usable in self.remotes],
            "spillover": self.spillover,
            "metrics": [
                {
                    "name": m.spec.describe(),
                    "value": m.current,
                    "target": m.spec.target.threshold,
                    "targetType": m.spec.target.type,
                    "over": m.over,
                    "error": m.error,
                }
                for m in self.metrics
            ],
            "staleMetrics": self.stale_metrics,
            "errors": self.errors + [f"{self.key}: {r}" for r in self.rejections],
            "warnings": self.warnings,
            "policies": self.policies_dict(),
            "lastTransitionSecondsAgo": None
            if self.last_transition is None
            else round(time.monotonic() - self.last_transition, 1),
        }

    def policies_dict(self) -> dict:
        """The Policies part of /status and of the CR's status."""
        return {
            "enforcedLocally": self.local_policies,
            "enforcedRemotely": self.remote_policies,
            "refused": [
                {"remote": r.remote, "policy": r.policy, "reason": r.reason, "message": r.message}
                for r in self.refused
            ],
        }
