"""The per-model offload state machine: when to spill over, how much, and when to come back.

Pure and clock-agnostic (`now` is passed in) so its timing is tested on a fake clock.
Semantics (seeds 000, 002): any metric over its target, for `activationDelaySeconds`, turns
offloading on at `percentage` %; it turns off only once every metric has stayed under its
target for `bufferDurationSeconds`. No ready local endpoint means 100 % remote; no usable
remote means 0 %. A metric without a reading neither triggers nor releases: it keeps the
last decision, as the peers that flap when their metric source goes away do not. Before the
first readings (a restart) the timers stay as restored, so a running delay or buffer goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.crd import Behavior
from api.status import MetricStatus, Phase


@dataclass(frozen=True)
class Decision:
    """What one evaluation decided: the routing input and the words for status and logs."""

    phase: Phase
    remote_percent: float
    reason: str


@dataclass
class OffloadMachine:
    """Timers and the trigger latch of one model; `step` is called on every evaluation."""

    triggered: bool = False
    triggered_at: float | None = None
    over_since: float | None = None
    under_since: float | None = None
    last: Decision | None = None
    changed_at: float | None = None

    @property
    def waiting(self) -> bool:
        """An activation delay or a buffer duration is running: time alone will change the decision."""
        return (not self.triggered and self.over_since is not None) or (
            self.triggered and self.under_since is not None
        )

    def step(
        self,
        now: float,
        behavior: Behavior,
        metrics: list[MetricStatus],
        ready_endpoints: int,
        remote_usable: bool,
    ) -> Decision:
        over = [m for m in metrics if m.over is True]
        all_under = bool(metrics) and all(m.over is False for m in metrics)
        if metrics:  # none read yet (just restarted): the timers carry on as they were
            self.over_since = (now if self.over_since is None else self.over_since) if over else None
            self.under_since = (now if self.under_since is None else self.under_since) if all_under else None

        if not self.triggered and over and now - self.over_since >= behavior.activation_delay_seconds:
            self.triggered, self.triggered_at = True, now
        elif self.triggered and all_under and now - self.under_since >= behavior.buffer_duration_seconds:
            self.triggered, self.triggered_at = False, None

        decision = self._decide(now, behavior, over, ready_endpoints, remote_usable)
        if (
            self.last is None
            or decision.phase != self.last.phase
            or decision.remote_percent != self.last.remote_percent
        ):
            self.changed_at = now
        self.last = decision
        return decision

    def _decide(self, now, behavior, over, ready_endpoints, remote_usable) -> Decision:
        # The timers, not this step's readings, say which delay runs: the same while readings
        # come in, and what was restored before the first ones.
        if ready_endpoints == 0:
            if remote_usable:
                return Decision(Phase.OUTAGE, 100.0, "no ready local endpoint")
            return Decision(Phase.REMOTE_DOWN, 0.0, "no ready local endpoint and no usable remote")
        if self.triggered:
            if not remote_usable:
                return Decision(Phase.REMOTE_DOWN, 0.0, "offloading wanted but the remote is unavailable")
            if self.under_since is not None:
                left = behavior.buffer_duration_seconds - (now - self.under_since)
                return Decision(
                    Phase.RELEASING,
                    behavior.percentage,
                    f"every metric under target; releasing in {max(left, 0):.0f}s",
                )
            if over:
                names = ", ".join(m.spec.describe() for m in over)
                return Decision(Phase.OFFLOADING, behavior.percentage, f"over target: {names}")
            return Decision(Phase.OFFLOADING, behavior.percentage, "holding: a metric has no reading")
        if self.over_since is not None:
            left = behavior.activation_delay_seconds - (now - self.over_since)
            return Decision(Phase.ACTIVATING, 0.0, f"over target; offloading in {max(left, 0):.0f}s")
        at_rest = "every metric under target" if self.under_since is not None else "waiting for readings"
        return Decision(Phase.STANDBY, 0.0, at_rest)
