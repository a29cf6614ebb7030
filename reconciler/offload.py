"""The per-model offload state machine: when to spill over, how much, and when to come back.

Pure and clock-agnostic (`now` is passed in) so its timing is tested on a fake clock.
Semantics (seeds 000, 002): any metric over its target, for `activationDelaySeconds`, turns
offloading on at `percentage` %; it turns off only once every metric has stayed under its
target for `bufferDurationSeconds`. No ready local endpoint means 100 % remote; no usable
remote means 0 %. A metric without a reading neither triggers nor releases: it keeps the
last decision, as the peers that flap when their metric source goes away do not, until it
has been without one for `metricStaleAfterSeconds`: then `onStaleMetric` decides (hold the
decision, all local, or offload `percentage` %) until readings return.

`behavior.mode: Proportional` replaces the fixed share with the one that keeps the local metric
at its target (see `proportional`); the outage and remote rules are the same in both modes.
Before the first readings (a restart) the timers stay as restored, so a running delay or buffer
goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from api.crd import Behavior
from api.status import MetricStatus, Phase
from reconciler.proportional import ShareController


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
    share: float = 0.0  # Proportional: the share decided, percent (applied unless the remote is down)
    shares: ShareController = field(default_factory=ShareController)
    proportional: bool = False  # the mode of the last step

    @property
    def waiting(self) -> bool:
        """An activation delay, a buffer duration or (Proportional) a moving average is running:
        time alone will change the decision."""
        if self.proportional:
            return self.share > 0 or self.over_since is not None
        return (not self.triggered and self.over_since is not None) or (
            self.triggered and self.under_since is not None
        )

    def resume(self, now: float, behavior: Behavior, remote_percent: float) -> None:
        """Carry on from a share a previous leader decided: held for the buffer duration, as if
        just recommended, so a failover moves no traffic."""
        if behavior.proportional and self.triggered and remote_percent > 0:
            self.share = remote_percent
            self.shares.settle(now, behavior, remote_percent)
            self.last = Decision(Phase.OFFLOADING, remote_percent, "resumed from status")

    def step(
        self,
        now: float,
        behavior: Behavior,
        metrics: list[MetricStatus],
        ready_endpoints: int,
        remote_usable: bool,
        stale: Sequence[str] = (),
    ) -> Decision:
        """Decide; `stale` names the metrics without a reading for `metricStaleAfterSeconds`."""
        over = [m for m in metrics if m.over is True]
        all_under = bool(metrics) and all(m.over is False for m in metrics)
        if metrics:  # none read yet (just restarted): the timers carry on as they were
            self.over_since = (now if self.over_since is None else self.over_since) if over else None
            self.under_since = (now if self.under_since is None else self.under_since) if all_under else None
        self.proportional = behavior.proportional

        if stale and behavior.on_stale_metric != "hold" and ready_endpoints > 0:
            decision = self._stale(now, behavior, stale, remote_usable)
        elif behavior.proportional:
            decision = self._proportional(now, behavior, metrics, over, ready_endpoints, remote_usable)
        else:
            decision = self._fixed(now, behavior, over, all_under, ready_endpoints, remote_usable)
        if stale and behavior.on_stale_metric == "hold":
            decision = Decision(
                decision.phase, decision.remote_percent, f"{decision.reason}; stale: {', '.join(stale)}"
            )
        if (
            self.last is None
            or decision.phase != self.last.phase
            or decision.remote_percent != self.last.remote_percent
        ):
            self.changed_at = now
        self.last = decision
        return decision

    def _stale(self, now: float, behavior: Behavior, stale: Sequence[str], remote_usable: bool) -> Decision:
        """The safe state the user chose for a metric gone stale; readings coming back resume
        from it (after `offload`, the buffer duration runs before the share lowers)."""
        names = ", ".join(stale)
        if behavior.on_stale_metric == "local":
            self.triggered, self.triggered_at, self.share = False, None, 0.0
            self.shares.reset()
            return Decision(
                Phase.STANDBY, 0.0, f"metric stale: {names}; onStaleMetric local: all traffic local"
            )
        if not self.triggered:
            self.triggered, self.triggered_at = True, now
        self.under_since = None
        self.share = behavior.percentage
        self.shares.settle(now, behavior, behavior.percentage)
        if not remote_usable:
            return Decision(
                Phase.REMOTE_DOWN,
                0.0,
                f"metric stale: {names}; offloading wanted but the remote is unavailable",
            )
        return Decision(
            Phase.OFFLOADING,
            behavior.percentage,
            f"metric stale: {names}; onStaleMetric offload: {behavior.percentage:g}% to the remote",
        )

    def _proportional(self, now, behavior, metrics, over, ready_endpoints, remote_usable) -> Decision:
        applied = self.last.remote_percent if self.last is not None else 0.0
        if ready_endpoints > 0 and self.shares.observe(now, behavior, metrics, applied):
            recommended = self.shares.recommend(behavior, self.share)
        else:
            recommended = self.share  # no reading (or no local side to read): hold
        if (
            self.share == 0
            and recommended > 0
            and (not over or now - self.over_since < behavior.activation_delay_seconds)
        ):
            recommended = 0.0  # switching on waits out the activation delay, as in Fixed mode
        if ready_endpoints > 0:
            self.share = self.shares.settle(now, behavior, recommended)
        if self.share > 0 and not self.triggered:
            self.triggered, self.triggered_at = True, now
        elif self.share == 0:
            self.triggered, self.triggered_at = False, None
        # Releasing: nothing is recommended any more and only the buffer holds the share.
        self.under_since = (
            (self.under_since if self.under_since is not None else now)
            if self.share > 0 and recommended == 0
            else None
        )
        if ready_endpoints == 0:
            return self._decide(now, behavior, over, False, ready_endpoints, remote_usable)
        if self.share > 0:
            if not remote_usable:
                return Decision(Phase.REMOTE_DOWN, 0.0, "offloading wanted but the remote is unavailable")
            until = self.shares.held_until(behavior, self.share)
            if recommended == 0:
                left = 0.0 if until is None else until - now
                return Decision(
                    Phase.RELEASING, self.share, f"demand under target; releasing in {max(left, 0):.0f}s"
                )
            if until is not None:
                reason = f"held at {self.share:g}% for the buffer duration (recommended {recommended:g}%)"
            elif self.share >= behavior.percentage:
                reason = f"{self.share:g}% to the remote (the cap): demand over target"
            else:
                reason = f"{self.share:g}% to the remote keeps the local metric at target"
            return Decision(Phase.OFFLOADING, self.share, reason)
        if over:
            left = behavior.activation_delay_seconds - (now - self.over_since)
            if left > 0:
                return Decision(Phase.ACTIVATING, 0.0, f"over target; offloading in {left:.0f}s")
            return Decision(Phase.STANDBY, 0.0, "over target, within tolerance")
        all_under = bool(metrics) and all(m.over is False for m in metrics)
        return Decision(
            Phase.STANDBY, 0.0, "every metric under target" if all_under else "waiting for readings"
        )

    def _fixed(self, now, behavior, over, all_under, ready_endpoints, remote_usable) -> Decision:
        if not self.triggered and over and now - self.over_since >= behavior.activation_delay_seconds:
            self.triggered, self.triggered_at = True, now
        elif self.triggered and all_under and now - self.under_since >= behavior.buffer_duration_seconds:
            self.triggered, self.triggered_at = False, None
        return self._decide(now, behavior, over, all_under, ready_endpoints, remote_usable)

    def _decide(self, now, behavior, over, all_under, ready_endpoints, remote_usable) -> Decision:
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
