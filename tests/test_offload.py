"""The offload state machine on a fake clock, and HPA target arithmetic."""

from __future__ import annotations

import pytest

from api.crd import Behavior
from api.metric_spec import MetricSpec, MetricTarget
from api.status import MetricStatus, Phase
from metrics.hpa import compare
from reconciler.offload import Decision, OffloadMachine

CPU = MetricSpec("Resource", "cpu", MetricTarget("Utilization", 90))
QUEUE = MetricSpec("External", "queue_depth", MetricTarget("Value", 10))


def status(over: bool | None, spec: MetricSpec = CPU) -> MetricStatus:
    if over is None:
        return MetricStatus(spec, None, None, "no reading")
    return MetricStatus(spec, spec.target.threshold + (1 if over else -1), over)


class Model:
    """One machine driven on a fake clock: `at(t, over...)` steps it at time t."""

    def __init__(self, percentage=50.0, activation=0.0, buffer=30.0, ready=2, remote=True):
        self.behavior = Behavior(percentage, activation, buffer)
        self.machine = OffloadMachine()
        self.ready = ready
        self.remote = remote

    def at(self, now: float, *over: bool | None, specs=(CPU, QUEUE)) -> Decision:
        metrics = [status(o, s) for o, s in zip(over, specs, strict=False)]
        return self.machine.step(now, self.behavior, metrics, self.ready, self.remote)


def test_standby_while_under():
    m = Model()
    for t in range(0, 100, 5):
        d = m.at(t, False)
        assert (d.phase, d.remote_percent) == (Phase.STANDBY, 0.0)


def test_over_offloads_immediately_without_activation_delay():
    m = Model(percentage=50)
    m.at(0, False)
    d = m.at(1, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)
    assert "Resource/cpu" in d.reason


def test_activation_delay_holds_back_until_it_has_passed():
    m = Model(percentage=40, activation=10)
    assert m.at(0, True).phase == Phase.ACTIVATING
    assert m.at(0, True).remote_percent == 0.0
    d = m.at(9.9, True)
    assert (d.phase, d.remote_percent) == (Phase.ACTIVATING, 0.0)
    d = m.at(10, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 40.0)


def test_a_dip_under_resets_the_activation_delay():
    m = Model(activation=10)
    m.at(0, True)
    m.at(8, True)
    assert m.at(9, False).phase == Phase.STANDBY
    assert m.at(10, True).phase == Phase.ACTIVATING
    assert m.at(19.5, True).phase == Phase.ACTIVATING  # would have fired at t=10 without the dip
    d = m.at(20, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)


def test_stays_on_during_the_buffer_and_releases_exactly_after_it():
    m = Model(percentage=50, buffer=30)
    assert m.at(0, True).phase == Phase.OFFLOADING
    d = m.at(5, False)
    assert (d.phase, d.remote_percent) == (Phase.RELEASING, 50.0)
    assert "30s" in d.reason
    d = m.at(34.9, False)
    assert (d.phase, d.remote_percent) == (Phase.RELEASING, 50.0)
    d = m.at(35, False)
    assert (d.phase, d.remote_percent) == (Phase.STANDBY, 0.0)


def test_going_over_again_during_release_resets_the_buffer():
    m = Model(buffer=30)
    m.at(0, True)
    m.at(5, False)
    assert m.at(30, False).phase == Phase.RELEASING
    d = m.at(31, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)
    assert m.at(32, False).phase == Phase.RELEASING
    assert m.at(61.9, False).phase == Phase.RELEASING  # 30 s counted from t=32, not t=5
    assert m.at(62, False).phase == Phase.STANDBY


def test_zero_buffer_releases_on_the_first_reading_under():
    m = Model(buffer=0)
    m.at(0, True)
    assert m.at(1, False).phase == Phase.STANDBY


def test_no_ready_endpoints_is_an_outage_with_all_traffic_remote():
    m = Model(percentage=30, ready=0)
    for over in (False, True, None):
        d = m.at(0, over)
        assert (d.phase, d.remote_percent) == (Phase.OUTAGE, 100.0)


def test_outage_ends_when_endpoints_come_back():
    m = Model(ready=0)
    assert m.at(0, False).phase == Phase.OUTAGE
    m.ready = 1
    assert (m.at(1, False).phase, m.at(1, False).remote_percent) == (Phase.STANDBY, 0.0)


@pytest.mark.parametrize("ready", [0, 3])
def test_no_usable_remote_gets_no_traffic(ready):
    m = Model(ready=ready, remote=False)
    d = m.at(0, True)
    assert d.remote_percent == 0.0
    assert d.phase == Phase.REMOTE_DOWN


def test_remote_coming_back_resumes_offloading():
    m = Model(remote=False)
    assert m.at(0, True).remote_percent == 0.0
    m.remote = True
    d = m.at(1, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)


def test_no_reading_does_not_trigger():
    m = Model(activation=0)
    for t in range(0, 300, 10):
        d = m.at(t, None)
        assert d.remote_percent == 0.0
        assert d.phase == Phase.STANDBY


def test_no_reading_does_not_release():
    m = Model(buffer=30)
    assert m.at(0, True).phase == Phase.OFFLOADING
    for t in range(1, 300, 10):
        d = m.at(t, None)
        assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)
        assert "no reading" in d.reason


def test_lost_reading_during_release_does_not_count_toward_the_buffer():
    m = Model(buffer=30)
    m.at(0, True)
    m.at(1, False)
    m.at(20, None)
    assert m.at(40, False).phase == Phase.RELEASING  # the buffer restarts at t=40
    assert m.at(69, False).phase == Phase.RELEASING
    assert m.at(70, False).phase == Phase.STANDBY


def test_any_metric_over_triggers():
    m = Model()
    d = m.at(0, False, True)
    assert (d.phase, d.remote_percent) == (Phase.OFFLOADING, 50.0)
    assert "External/queue_depth" in d.reason
    assert "Resource/cpu" not in d.reason


def test_release_needs_every_metric_under():
    m = Model(buffer=10)
    m.at(0, True, True)
    assert m.at(1, False, True).phase == Phase.OFFLOADING
    assert m.at(50, False, True).phase == Phase.OFFLOADING
    assert m.at(51, False, None).phase == Phase.OFFLOADING  # one without a reading: not all under
    assert m.at(52, False, False).phase == Phase.RELEASING
    assert m.at(62, False, False).phase == Phase.STANDBY


def test_one_metric_over_and_another_without_reading_triggers():
    m = Model()
    assert m.at(0, None, True).phase == Phase.OFFLOADING


def test_no_metrics_means_waiting():
    m = Model()
    d = m.machine.step(0, m.behavior, [], 2, True)
    assert (d.phase, d.remote_percent) == (Phase.STANDBY, 0.0)


def test_changed_at_marks_transitions_only():
    m = Model()
    m.at(0, False)
    assert m.machine.changed_at == 0
    m.at(5, False)
    assert m.machine.changed_at == 0
    m.at(7, True)
    assert m.machine.changed_at == 7
    m.at(9, True)
    assert m.machine.changed_at == 7


def test_percentage_of_100_and_0():
    assert Model(percentage=100).at(0, True).remote_percent == 100.0
    assert Model(percentage=0).at(0, True).remote_percent == 0.0


# --- HPA arithmetic ---


def test_compare_value_target_uses_the_raw_total():
    spec = MetricSpec("External", "q", MetricTarget("Value", 10))
    assert compare(spec, 12, pods=4) == MetricStatus(spec, 12, True)
    assert compare(spec, 10, pods=4).over is False  # the HPA acts only above the target


def test_compare_average_value_divides_by_pods():
    spec = MetricSpec("Pods", "inflight", MetricTarget("AverageValue", 10))
    s = compare(spec, 36, pods=4)
    assert (s.current, s.over) == (9, False)
    s = compare(spec, 44, pods=4)
    assert (s.current, s.over) == (11, True)


def test_compare_average_value_with_no_pods_divides_by_one():
    spec = MetricSpec("External", "q", MetricTarget("AverageValue", 10))
    s = compare(spec, 11, pods=0)
    assert (s.current, s.over) == (11, True)


def test_compare_utilization_is_already_a_percentage():
    s = compare(CPU, 95, pods=3)
    assert (s.current, s.over) == (95, True)


def test_compare_without_reading():
    s = compare(CPU, None, pods=3, error="prometheus unreachable")
    assert (s.current, s.over, s.error) == (None, None, "prometheus unreachable")
    assert compare(CPU, None, pods=3).error == "no reading"
