"""/metrics as Prometheus reads it: the per-model families are written by our own text writer, so
what it writes must parse to exactly the series and values the models' status holds, odd names
included, beside prometheus-client's own instruments."""

from __future__ import annotations

import re
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from api.crd import ObjectKey
from api.metric_spec import MetricSpec, MetricTarget
from api.status import MetricStatus, ModelStatus, Phase, PolicyRefusal
from metrics.instruments import Instruments

ODD = 'we"ird\\name\nline'  # a quote, a backslash and a newline: each escaped in the text format


QUEUE = MetricSpec("External", "queue_depth", MetricTarget("Value", 10), selector={"model": "a"})
ODD_METRIC = MetricSpec("External", ODD, MetricTarget("AverageValue", 0.25))


def statuses() -> list[ModelStatus]:
    queue, odd = QUEUE, ODD_METRIC
    a = ModelStatus(
        ObjectKey("ModelDeployment", "team-a", "a"),
        phase=Phase.OFFLOADING,
        remote_percent=37.5,
        ready_endpoints=3,
        metrics=[MetricStatus(queue, 12.0, True), MetricStatus(odd, None, None, "timed out")],
        stale_metrics=[odd.describe()],
        refused=[PolicyRefusal("https://us.example", "team-a/eu-only", "PolicyViolation", "not in the EU")],
        transitions=Counter({"Offloading": 2, "Standby": 1}),
        metric_read_errors=Counter({odd.describe(): 4}),
        xds_nacks=Counter({"CDS": 1}),
    )
    b = ModelStatus(
        ObjectKey("ModelDeployment", "team-b", ODD),
        phase=Phase.INVALID,
        errors=["spec.percentage: must be 0-100"],
    )
    return [a, b]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_to_each_models_status_with_odd_names_escaped():
    instruments = Instruments()
    instruments.watch_controller(statuses, lambda: 7)
    instruments.xds_pushes.labels("CDS").inc(3)  # a prometheus-client instrument beside them
    got = samples(instruments.registry.exposition().decode())

    a = {"namespace": "team-a", "name": "a"}
    b = {"namespace": "team-b", "name": ODD}

    def at(name: str, labels: dict[str, str], **more: str) -> float | None:
        return got.get((name, frozenset((labels | more).items())))

    assert at("overspill_model_remote_weight_percent", a) == 37.5
    assert at("overspill_model_offload_state", a, phase="Offloading") == 1
    assert at("overspill_model_offload_state", a, phase="Standby") == 0
    assert at("overspill_model_ready_endpoints", a) == 3
    assert at("overspill_model_metric_value", a, metric=QUEUE.describe()) == 12
    assert at("overspill_model_metric_value", a, metric=ODD_METRIC.describe()) is None  # no reading
    assert at("overspill_model_metric_target", a, metric=ODD_METRIC.describe()) == 0.25
    assert at("overspill_model_metric_stale", a, metric=ODD_METRIC.describe()) == 1
    assert at("overspill_model_metric_stale", a, metric=QUEUE.describe()) == 0
    assert at("overspill_metric_read_errors_total", a, metric=ODD_METRIC.describe()) == 4
    assert at("overspill_metric_read_errors_total", a, metric=QUEUE.describe()) == 0  # zero before the first
    assert at("overspill_model_transitions_total", a, phase="Offloading") == 2
    assert at("overspill_model_xds_nacks_total", a, type="CDS") == 1
    assert (
        at(
            "overspill_model_remote_refused",
            a,
            remote="https://us.example",
            policy="team-a/eu-only",
            reason="PolicyViolation",
        )
        == 1
    )
    assert at("overspill_model_config_errors", b) == 1
    assert at("overspill_model_config_errors", a) == 0
    assert at("overspill_model_offload_state", b, phase="Invalid") == 1
    assert at("overspill_evaluations_total", {}) == 7
    assert at("overspill_xds_pushes_total", {}, type="CDS") == 3
    # What tests and tools read through the registry is the same text.
    assert instruments.registry.get_sample_value("overspill_model_remote_weight_percent", a) == 37.5
    assert instruments.registry.get_sample_value("overspill_model_config_errors", b) == 1


def test_every_family_is_declared_once_with_help_and_type():
    instruments = Instruments()
    instruments.watch_controller(statuses, lambda: 0)
    lines = instruments.registry.exposition().decode().splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    helps = {line.split()[2] for line in lines if line.startswith("# HELP ")}
    assert helps == set(types)
    assert "overspill_model_transitions_total" in types and "overspill_model_offload_state" in types


def test_labels_are_written_in_name_order_as_prometheus_client_writes_them():
    """Tools and tests that grep the text for `name{a="…",b="…"}` keep finding the per-model
    series: each series' labels come sorted by name, as in prometheus-client's own output."""
    instruments = Instruments()
    instruments.watch_controller(statuses, lambda: 0)
    series = [line for line in instruments.registry.exposition().decode().splitlines() if "{" in line]
    assert len(series) > 20
    for line in series:
        names = re.findall(r'(?:\{|,)([a-z_]+)="', line)
        assert names == sorted(names), line
    assert 'overspill_model_config_errors{name="a",namespace="team-a"} 0.0' in series
