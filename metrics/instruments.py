"""The control plane's own Prometheus metrics, the numbers the Grafana dashboard draws.

Per-model series are not set by the code that decides: a custom collector reads the
models' status (`api.status.ModelStatus`) at scrape time, prometheus-client's documented
pattern for state owned elsewhere, so a deleted model's series (counters included)
disappear with it. Process-wide counters (xDS traffic, evaluations) are plain instruments.
One `Instruments` per process, on its own registry so tests can run several side by side.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from api.desired import loads_by_side
from api.load import ClusterLoad
from api.status import ModelStatus, Phase
from metrics.exposition import Family, Registry, TextCollector, labels

LABELS = ["namespace", "name"]
# Seconds, for the xDS timings: a push on loopback is ACKed in a millisecond or two, a burst's flush
# waits up to half a second, a route held for its clusters up to 5 s (xds.stream.HOLD_LIMIT).
XDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds, for an evaluation round and a metric read (a source's timeout is 3 s by default).
WORK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CountedHistogram(Collector):
    """A histogram that takes many equal observations at once (`observe(value, count)`).

    One ACK can carry the weight decisions of thousands of models (one decision time per push, as
    a whole evaluation round is published at once): counting them one by one would cost O(models)
    per Envoy per push, where this costs one bisect.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]):
        self.name, self.documentation = name, documentation
        self.bounds = [*buckets, math.inf]
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def collect(self):
        cumulative, buckets = 0, []
        for bound, n in zip(self.bounds, self.counts, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class ControllerCollector(TextCollector):
    """Every model's state, read from its status when Prometheus scrapes, and the evaluation count."""

    def __init__(self, models: Callable[[], Iterable[ModelStatus]], evaluations: Callable[[], int]):
        self.models = models
        self.evaluations = evaluations

    def families(self) -> Iterable[Family]:
        phase = Family(
            "overspill_model_offload_state", "1 for the model's current offload phase, 0 for the others"
        )
        weight = Family(
            "overspill_model_remote_weight_percent", "Percent of the model's requests routed to the remote"
        )
        value = Family(
            "overspill_model_metric_value", "Last reading of an offloading metric, in its target's units"
        )
        target = Family("overspill_model_metric_target", "Target of an offloading metric")
        stale = Family(
            "overspill_model_metric_stale",
            "1 while an offloading metric has had no reading for metricStaleAfterSeconds",
        )
        ready = Family("overspill_model_ready_endpoints", "Ready local endpoints of the model's Service")
        errors = Family(
            "overspill_model_config_errors", "1 while a ModelDeployment cannot be routed as written"
        )
        transitions = Family("overspill_model_transitions", "Offload phase changes", "counter")
        read_errors = Family(
            "overspill_metric_read_errors",
            "Failed offloading-metric reads (unreachable, error, empty)",
            "counter",
        )
        nacks = Family(
            "overspill_model_xds_nacks", "xDS NACKs of responses carrying this model's resources", "counter"
        )
        refused = Family(
            "overspill_model_remote_refused",
            "1 while a local Policy keeps this remote from the model's traffic (reason: PolicyViolation, "
            "PolicyNotFound, PolicyInvalid)",
        )
        rejections = Family(
            "overspill_model_xds_rejections",
            "Envoy NACKs of this model's resources that still stand (per Envoy and xDS type): the"
            " Envoy keeps its last good configuration for the model",
        )
        for s in self.models():
            ids = labels(("name", s.name), ("namespace", s.namespace))
            rejections.add(ids, len(s.rejections))
            for r in s.refused:
                refused.add(
                    f"{ids},{labels(('policy', r.policy), ('reason', r.reason), ('remote', r.remote))}", 1
                )
            for p in Phase:
                phase.add(f"{ids},{labels(('phase', p.value))}", 1 if p == s.phase else 0)
            weight.add(ids, s.remote_percent)
            ready.add(ids, s.ready_endpoints)
            errors.add(ids, 1 if s.phase == Phase.INVALID or s.errors else 0)
            # Zero before the first failure: rate() and increase() see that one too.
            counted = dict.fromkeys((m.spec.describe() for m in s.metrics), 0) | s.metric_read_errors
            for m in s.metrics:
                name = m.spec.describe()
                each = f"{labels(('metric', name))},{ids}"
                target.add(each, m.spec.target.threshold)
                if m.current is not None:
                    value.add(each, m.current)
                stale.add(each, 1 if name in s.stale_metrics else 0)
            for p, n in s.transitions.items():
                transitions.add(f"{ids},{labels(('phase', p))}", n)
            for metric, n in counted.items():
                read_errors.add(f"{labels(('metric', metric))},{ids}", n)
            for t, n in s.xds_nacks.items():
                nacks.add(f"{ids},{labels(('type', t))}", n)
        rounds = Family("overspill_evaluations", "Evaluation rounds of all models", "counter")
        rounds.add("", self.evaluations())
        return (
            phase,
            weight,
            value,
            target,
            stale,
            ready,
            errors,
            transitions,
            read_errors,
            nacks,
            refused,
            rejections,
            rounds,
        )


class OriginCollector(Collector):
    """Rejected documents per origin (a file, a watch), read from the object store."""

    def __init__(self, rejected: Callable[[], Mapping[str, int]]):
        self.rejected = rejected

    def collect(self):
        family = GaugeMetricFamily(
            "overspill_invalid_objects", "Documents rejected by validation, per origin", labels=["origin"]
        )
        for origin, n in sorted(self.rejected().items()):
            family.add_metric([origin], n)
        yield family


class TaskCollector(Collector):
    """The event loop's tasks, counted at scrape time (the scrape runs on the loop): a count that
    only grows is a leak, which the soak (`make soak`) watches beside RSS and open files."""

    def collect(self):
        family = GaugeMetricFamily(
            "overspill_asyncio_tasks", "asyncio tasks alive on the control plane's loop"
        )
        try:
            family.add_metric([], len(asyncio.all_tasks()))
        except RuntimeError:  # scraped off the loop (a test's registry): nothing to count
            pass
        yield family


class StateFileCollector(Collector):
    """The offload state file of `--state-dir`: replacements written, and failures to read or
    write it (each also logged, and the last one shown in /status)."""

    def __init__(self, writes: Callable[[], int], errors: Callable[[], Mapping[str, int]]):
        self.writes, self.errors = writes, errors

    def collect(self):
        writes = CounterMetricFamily("overspill_state_file_writes", "Offload state file replacements")
        writes.add_metric([], self.writes())
        errors = CounterMetricFamily(
            "overspill_state_file_errors",
            "Offload state file reads (unreadable, corrupt: ignored) and writes that failed",
            labels=["operation"],
        )
        for operation, n in sorted(self.errors().items()):
            errors.add_metric([operation], n)
        yield from (writes, errors)


class LoadCollector(TextCollector):
    """Envoy's load reports per model and side, summed over the Envoys, read when Prometheus scrapes."""

    def __init__(self, clusters: Callable[[], Mapping[str, ClusterLoad]], reporting: Callable[[], int]):
        self.clusters = clusters
        self.reporting = reporting

    def families(self) -> Iterable[Family]:
        reporters = Family("overspill_envoy_load_reporters", "Envoys sending load reports")
        reporters.add("", self.reporting())
        in_flight = Family(
            "overspill_envoy_requests_in_flight", "Requests in flight, from Envoy's load reports"
        )
        rate = Family("overspill_envoy_request_rate", "Requests per second, from Envoy's load reports")
        errors = Family("overspill_envoy_error_rate", "Failed requests per second, from Envoy's load reports")
        for ((namespace, name), side), load in loads_by_side(self.clusters()).items():
            ids = labels(("name", name), ("namespace", namespace), ("side", side))
            in_flight.add(ids, load.in_flight)
            rate.add(ids, load.rate)
            errors.add(ids, load.errors)
        return (reporters, in_flight, rate, errors)


class Instruments:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or Registry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, CPU seconds
        r.register(TaskCollector())
        self.xds_streams = Gauge("overspill_xds_streams", "Connected xDS streams", registry=r)
        self.xds_pushes = Counter("overspill_xds_pushes", "xDS responses sent", ["type"], registry=r)
        self.xds_acks = Counter("overspill_xds_acks", "xDS responses ACKed", ["type"], registry=r)
        self.xds_nacks = Counter("overspill_xds_nacks", "xDS responses NACKed", ["type"], registry=r)
        self.xds_without_weight_layers = Gauge(
            "overspill_xds_streams_without_weight_layers",
            "Connected xDS streams whose node does not take the weight layers (weights sent in its"
            " routes instead: fix its bootstrap), per node cluster",
            ["node_cluster"],
            registry=r,
        )
        self.xds_bytes = Counter(
            "overspill_xds_sent_bytes", "Bytes of xDS responses sent", ["type"], registry=r
        )
        self.xds_scope_denied = Counter(
            "overspill_xds_scope_denied",
            "xDS streams whose client certificate denied them namespaces they asked for",
            registry=r,
        )
        self.xds_refused = Counter(
            "overspill_xds_refused_requests",
            "xDS requests that could not be read or taken (their stream was closed)",
            registry=r,
        )
        self.xds_connected = Gauge(
            "overspill_xds_connected_envoys",
            "Envoys connected, per scope (the models they take: all, namespaces=..., labels=...) and"
            " protocol (sotw, delta)",
            ["scope", "protocol"],
            registry=r,
        )
        self.xds_push_to_ack = Histogram(
            "overspill_xds_push_to_ack_seconds",
            "From an xDS response being sent to the Envoy's ACK of it, per type",
            ["type"],
            buckets=XDS_BUCKETS,
            registry=r,
        )
        self.decision_to_ack = CountedHistogram(
            "overspill_weight_decision_to_ack_seconds",
            "From a model's new remote share being decided to an Envoy's ACK of the response carrying"
            " it: one observation per model and Envoy",
            XDS_BUCKETS,
        )
        r.register(self.decision_to_ack)
        self.evaluation_duration = Histogram(
            "overspill_evaluation_duration_seconds",
            "An evaluation round: every model's metrics read, then the models whose readings changed decided",
            buckets=WORK_BUCKETS,
            registry=r,
        )
        self.metric_read_duration = Histogram(
            "overspill_metric_read_duration_seconds",
            "One request to a metric source (a PromQL query; a Kubernetes metrics API call)",
            ["source"],
            buckets=WORK_BUCKETS,
            registry=r,
        )

    def watch_controller(
        self, models: Callable[[], Iterable[ModelStatus]], evaluations: Callable[[], int]
    ) -> None:
        self.registry.register(ControllerCollector(models, evaluations))

    def watch_load(
        self, clusters: Callable[[], Mapping[str, ClusterLoad]], reporting: Callable[[], int]
    ) -> None:
        self.registry.register(LoadCollector(clusters, reporting))

    def watch_origins(self, rejected: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(OriginCollector(rejected))

    def watch_state_file(self, writes: Callable[[], int], errors: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(StateFileCollector(writes, errors))
