"""Proportional offload and stale metrics on a fake clock, against a small model of the local side.

`Plant` stands for the local pods: their in-flight gauge is demand x (1 - remote share), the
relation a local-side metric has with the share, so the state machine is held in the same loop
it runs in for real (read, decide, the share lowers the reading).
"""

from __future__ import annotations

import random

import pytest

from api.crd import Behavior
from api.metric_spec import MetricSpec, MetricTarget
from api.status import MetricStatus, Phase
from metrics.hpa import compare
from reconciler.offload import Decision, OffloadMachine
from reconciler.proportional import demand_ratio

INFLIGHT = MetricSpec("External", "inflight", MetricTarget("Value", 10))
RATE = MetricSpec("External", "gateway_rps", MetricTarget("Value", 100))


def proportional(**kw) -> Behavior:
    fields = {
        "percentage": 80.0,
        "buffer_duration_seconds": 10.0,
        "mode": "Proportional",
        "smoothing_seconds": 0,
    }
    return Behavior(**(fields | kw))


class Plant:
    """The local side under a demand (in units of the target's metric), stepped once a second."""

    def __init__(self, behavior: Behavior, noise: float = 0.0, seed: int = 1):
        self.behavior = behavior
        self.machine = OffloadMachine()
        self.noise = noise
        self.random = random.Random(seed)
        self.share = 0.0
        self.log: list[tuple[float, Decision, float]] = []

    def reading(self, demand: float) -> float:
        local = demand * (1 - self.share / 100)
        return max(0.0, local * (1 + self.random.uniform(-self.noise, self.noise)))

    def run(self, demand, start: float, end: float) -> None:
        for t in range(int(start), int(end)):
            value = self.reading(demand(t) if callable(demand) else demand)
            d = self.machine.step(t, self.behavior, [compare(INFLIGHT, value, 1)], 1, True)
            self.share = d.remote_percent
            self.log.append((t, d, value))

    def phases(self) -> list[Phase]:
        out: list[Phase] = []
        for _, d, _ in self.log:
            if not out or out[-1] != d.phase:
                out.append(d.phase)
        return out


def test_demand_of_a_local_side_metric_is_local_over_the_local_fraction():
    metric = MetricStatus(INFLIGHT, 10.0, False)
    assert demand_ratio([metric], proportional(), share=0.0) == 1.0
    assert demand_ratio([metric], proportional(), share=0.6) == pytest.approx(2.5)
    assert demand_ratio([metric], proportional(metric_measures="Demand"), share=0.6) == 1.0
    # at 100 % remote the local side says nothing about demand
    assert demand_ratio([metric], proportional(), share=1.0) is None


def test_the_most_demanding_metric_decides():
    metrics = [MetricStatus(INFLIGHT, 15.0, True), MetricStatus(RATE, 300.0, True)]
    assert demand_ratio(metrics, proportional(metric_measures="Demand"), 0.0) == 3.0


def test_share_settles_where_the_local_metric_meets_its_target():
    plant = Plant(proportional())
    plant.run(5, 0, 10)  # half the target: all local
    assert plant.share == 0
    plant.run(25, 10, 60)  # 2.5x the target: 60 % must go remote
    assert plant.share == 60.0
    assert plant.log[-1][2] == pytest.approx(10.0)
    assert plant.log[-1][1].phase == Phase.OFFLOADING


def test_share_is_capped_at_percentage():
    plant = Plant(proportional(percentage=50))
    plant.run(40, 0, 20)
    assert plant.share == 50.0
    assert "cap" in plant.log[-1][1].reason


def test_share_rises_at_once_and_lowers_only_after_the_buffer():
    plant = Plant(proportional(buffer_duration_seconds=10))
    plant.run(20, 0, 5)
    assert plant.share == 50.0
    plant.run(40, 5, 6)  # demand doubles: up in one evaluation
    assert plant.share == 75.0
    plant.run(20, 6, 15)  # demand halves: the share is held while the window remembers 75 %
    assert {d.remote_percent for _, d, _ in plant.log[5:]} == {75.0}
    assert "held" in plant.log[-1][1].reason
    plant.run(20, 15, 20)
    assert plant.share == 50.0
    assert plant.log[-1][2] == pytest.approx(10.0)


def test_within_tolerance_the_share_does_not_move():
    plant = Plant(proportional())
    plant.run(20, 0, 3)
    assert plant.share == 50.0
    plant.run(21.5, 3, 30)  # local 10.75: within 10 % of target
    assert plant.share == 50.0
    plant.run(23, 30, 31)  # local 11.5: over the band, the share follows
    assert plant.share == 57.0


def test_demand_metric_is_used_as_it_is():
    behavior = proportional(metric_measures="Demand")
    machine = OffloadMachine()
    for t in range(10):  # the gateway's rate does not fall as offloading rises
        d = machine.step(t, behavior, [compare(RATE, 400, 1)], 1, True)
    assert d.remote_percent == 75.0


def test_release_happens_a_buffer_after_demand_falls_under_target():
    plant = Plant(proportional(buffer_duration_seconds=10))
    plant.run(5, 0, 5)
    plant.run(20, 5, 10)
    plant.run(5, 10, 30)
    releasing = [t for t, d, _ in plant.log if d.phase == Phase.RELEASING]
    assert releasing[0] == 10
    assert "releasing in 9s" in plant.log[10][1].reason
    assert plant.log[18][1].phase == Phase.RELEASING
    assert plant.log[19][1].phase == Phase.STANDBY  # 10 s after the last recommendation over 0
    assert plant.phases() == [Phase.STANDBY, Phase.OFFLOADING, Phase.RELEASING, Phase.STANDBY]


def test_a_long_burst_holds_steady_in_proportional_mode_and_cycles_in_fixed():
    """The issue's scenario on the model: a 60 s burst at 3x the target, buffer 10 s. Fixed 80 %
    pushes the local metric under its target, releases after the buffer, is swamped and switches
    on again; Proportional keeps the local metric at its target without leaving Offloading."""

    def burst(t):
        return 30 if 10 <= t < 70 else 5

    fixed = Plant(Behavior(80, 0, 10))
    fixed.run(burst, 0, 70)
    prop = Plant(proportional())
    prop.run(burst, 0, 70)
    cycles = [p for p in fixed.phases() if p == Phase.OFFLOADING]
    assert len(cycles) >= 3  # on, released, on again, ...
    assert max(v for t, _, v in fixed.log if t >= 10) == 30  # swamped after each release
    assert prop.phases() == [Phase.STANDBY, Phase.OFFLOADING]
    assert all(abs(v - 10) <= 2 for t, _, v in prop.log if t >= 11)


def test_smoothing_keeps_a_noisy_gauge_from_hunting():
    """+-30 % noise on every reading: without smoothing the window's maximum ratchets the
    share up to the noise's peaks; with it the share stays near the excess and seldom moves."""
    raw = Plant(proportional(smoothing_seconds=0), noise=0.3)
    raw.run(25, 0, 120)
    smooth = Plant(proportional(smoothing_seconds=5), noise=0.3)
    smooth.run(25, 0, 120)
    late = [d.remote_percent for t, d, _ in smooth.log if t >= 30]
    assert all(50 <= s <= 70 for s in late), late
    changes = sum(1 for a, b in zip(late, late[1:], strict=False) if a != b)
    assert changes <= 15
    mean_local = sum(v for t, _, v in smooth.log if t >= 30) / len(late)
    assert abs(mean_local - 10) <= 2
    assert max(d.remote_percent for t, d, _ in raw.log if t >= 30) > max(late)


def test_activation_delay_applies_to_switching_on():
    plant = Plant(proportional(activation_delay_seconds=5))
    plant.run(20, 0, 5)
    assert {d.phase for _, d, _ in plant.log} == {Phase.ACTIVATING}
    plant.run(20, 5, 6)
    assert plant.share == 50.0


def test_outage_and_remote_down_as_in_fixed_mode():
    machine = OffloadMachine()
    behavior = proportional()
    d = machine.step(0, behavior, [compare(INFLIGHT, 20, 1)], 1, False)
    assert (d.phase, d.remote_percent) == (Phase.REMOTE_DOWN, 0.0)
    d = machine.step(1, behavior, [compare(INFLIGHT, 20, 1)], 0, True)
    assert (d.phase, d.remote_percent) == (Phase.OUTAGE, 100.0)
    d = machine.step(2, behavior, [compare(INFLIGHT, 20, 1)], 1, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)


def test_no_reading_holds_the_share():
    plant = Plant(proportional())
    plant.run(20, 0, 5)
    d = plant.machine.step(5, plant.behavior, [compare(INFLIGHT, None, 1)], 1, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)
    d = plant.machine.step(30, plant.behavior, [compare(INFLIGHT, None, 1)], 1, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)


# --- stale metrics: what the machine does with the metrics the controller says are stale ---

MISSING = [compare(INFLIGHT, None, 1, "prometheus unreachable")]


@pytest.mark.parametrize("mode", ["Fixed", "Proportional"])
def test_stale_local_sends_everything_local_and_readings_resume(mode):
    behavior = Behavior(60, 0, 10, mode=mode, on_stale_metric="local", smoothing_seconds=0)
    machine = OffloadMachine()
    assert machine.step(0, behavior, [compare(INFLIGHT, 30, 1)], 1, True).remote_percent == 60.0
    d = machine.step(1, behavior, MISSING, 1, True)  # not stale yet: holds
    assert d.remote_percent == 60.0
    d = machine.step(2, behavior, MISSING, 1, True, stale=["External/inflight"])
    assert (d.phase, d.remote_percent) == (Phase.STANDBY, 0.0)
    assert "External/inflight" in d.reason and "local" in d.reason
    d = machine.step(3, behavior, [compare(INFLIGHT, 30, 1)], 1, True)  # back, and over
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 60.0)


@pytest.mark.parametrize("mode", ["Fixed", "Proportional"])
def test_stale_offload_sends_percentage_then_releases_after_the_buffer(mode):
    behavior = Behavior(70, 0, 10, mode=mode, on_stale_metric="offload", smoothing_seconds=0)
    machine = OffloadMachine()
    assert machine.step(0, behavior, [compare(INFLIGHT, 2, 1)], 1, True).phase == Phase.STANDBY
    d = machine.step(5, behavior, MISSING, 1, True, stale=["External/inflight"])
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 70.0)
    assert "offload" in d.reason
    d = machine.step(6, behavior, [compare(INFLIGHT, 2, 1)], 1, True)  # back, and under
    assert (d.phase, d.remote_percent) == (Phase.RELEASING, 70.0)
    d = machine.step(16, behavior, [compare(INFLIGHT, 2, 1)], 1, True)
    assert (d.phase, d.remote_percent) == (Phase.STANDBY, 0.0)


def test_stale_hold_keeps_the_decision_and_names_the_metric():
    behavior = Behavior(60, 0, 10)
    machine = OffloadMachine()
    machine.step(0, behavior, [compare(INFLIGHT, 30, 1)], 1, True)
    d = machine.step(100, behavior, MISSING, 1, True, stale=["External/inflight"])
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 60.0)
    assert "stale: External/inflight" in d.reason


def test_stale_does_not_override_an_outage():
    behavior = Behavior(60, 0, 10, on_stale_metric="local")
    d = OffloadMachine().step(0, behavior, MISSING, 0, True, stale=["External/inflight"])
    assert (d.phase, d.remote_percent) == (Phase.OUTAGE, 100.0)


def test_a_new_leader_holds_the_share_it_finds_on_status_for_the_buffer():
    behavior = proportional(buffer_duration_seconds=10)
    machine = OffloadMachine(triggered=True)
    machine.resume(100, behavior, 60.0)
    d = machine.step(101, behavior, [compare(INFLIGHT, 10, 1)], 1, True)  # at target under 60 %
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 60.0)
    d = machine.step(102, behavior, [compare(INFLIGHT, 4, 1)], 1, True)  # demand 4/(1-0.6) = 10: no excess
    assert (d.phase, d.remote_percent) == (Phase.RELEASING, 60.0)
    d = machine.step(111, behavior, [compare(INFLIGHT, 4, 1)], 1, True)
    assert d.phase == Phase.STANDBY
