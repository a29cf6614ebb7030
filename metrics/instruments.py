"""The control plane's own Prometheus metrics, the numbers the Grafana dashboard draws.

One `Instruments` per process, on its own registry so tests can run several side by side.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from reconciler.offload import Phase


class Instruments:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["namespace", "name"]
        self.offload_state = Gauge(
            "overspill_model_offload_state",
            "1 for the model's current offload phase, 0 for the others",
            [*labels, "phase"],
            registry=r,
        )
        self.remote_weight = Gauge(
            "overspill_model_remote_weight_percent",
            "Percent of the model's requests routed to the remote",
            labels,
            registry=r,
        )
        self.metric_value = Gauge(
            "overspill_model_metric_value",
            "Last reading of an offloading metric, in its target's units",
            [*labels, "metric"],
            registry=r,
        )
        self.metric_target = Gauge(
            "overspill_model_metric_target", "Target of an offloading metric", [*labels, "metric"], registry=r
        )
        self.ready_endpoints = Gauge(
            "overspill_model_ready_endpoints",
            "Ready local endpoints of the model's Service",
            labels,
            registry=r,
        )
        self.transitions = Counter(
            "overspill_model_transitions", "Offload phase changes", [*labels, "phase"], registry=r
        )
        self.metric_errors = Counter(
            "overspill_metric_read_errors",
            "Failed offloading-metric reads (unreachable, error, empty)",
            [*labels, "metric"],
            registry=r,
        )
        self.invalid_objects = Gauge(
            "overspill_invalid_objects",
            "Documents rejected by validation, per origin",
            ["origin"],
            registry=r,
        )
        self.model_errors = Gauge(
            "overspill_model_config_errors",
            "1 while a ModelDeployment cannot be routed as written",
            labels,
            registry=r,
        )
        self.xds_streams = Gauge("overspill_xds_streams", "Connected xDS streams", registry=r)
        self.xds_pushes = Counter("overspill_xds_pushes", "xDS responses sent", ["type"], registry=r)
        self.xds_acks = Counter("overspill_xds_acks", "xDS responses ACKed", ["type"], registry=r)
        self.xds_nacks = Counter("overspill_xds_nacks", "xDS responses NACKed", ["type"], registry=r)
        self.xds_bytes = Counter(
            "overspill_xds_sent_bytes", "Bytes of xDS responses sent", ["type"], registry=r
        )
        self.model_xds_nacks = Counter(
            "overspill_model_xds_nacks",
            "xDS NACKs of responses carrying this model's resources",
            [*labels, "type"],
            registry=r,
        )
        self.evaluations = Counter("overspill_evaluations", "Evaluation rounds of all models", registry=r)

    def set_phase(self, namespace: str, name: str, phase: Phase) -> None:
        for p in Phase:
            self.offload_state.labels(namespace, name, p.value).set(1 if p == phase else 0)

    def forget_model(self, namespace: str, name: str) -> None:
        """Drop a deleted model's series so dashboards do not show it forever."""
        for gauge in (
            self.offload_state,
            self.remote_weight,
            self.metric_value,
            self.metric_target,
            self.ready_endpoints,
            self.model_errors,
        ):
            for labels in list(gauge._metrics):  # prometheus_client keeps children by label tuple
                if labels[:2] == (namespace, name):
                    gauge.remove(*labels)
