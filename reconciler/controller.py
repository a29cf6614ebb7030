"""The reconcile loop: store and live readings in, one offload decision per model, routes out.

Metrics are read every `evaluation_interval`; a change in the store (an endpoint going
unready, a CR edited) is acted on at once with the last readings, so an outage does not
wait for the next evaluation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from metrics.hpa import MetricSpec, MetricStatus, compare
from metrics.instruments import Instruments
from metrics.prometheus import Reading
from reconciler.crd import ModelDeployment, ObjectKey, RemoteBackend
from reconciler.offload import Decision, OffloadMachine, Phase
from reconciler.store import ObjectStore
from xds.resources import ModelRoute, service_domains
from xds.snapshot import Translator

log = logging.getLogger("overspill.reconciler")


class Informer(Protocol):
    async def read(self, spec: MetricSpec) -> Reading: ...


class NoInformer:
    """Used when no metric source is configured: every metric says so on the model's status."""

    async def read(self, spec: MetricSpec) -> Reading:
        return Reading(None, "no metric source configured (use --prometheus-url)")


@dataclass
class ModelStatus:
    """Everything known about one model after a reconcile; feeds /status, logs and CR status."""

    key: ObjectKey
    phase: str = Phase.STANDBY.value
    remote_percent: float = 0.0
    reason: str = ""
    ready_endpoints: int = 0
    remote: str | None = None
    remote_usable: bool = False
    metrics: list[MetricStatus] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    last_transition: float | None = None

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "state": self.phase,
            "remotePercent": self.remote_percent,
            "reason": self.reason,
            "readyEndpoints": self.ready_endpoints,
            "remote": self.remote,
            "remoteUsable": self.remote_usable,
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
            "errors": self.errors,
            "warnings": self.warnings,
            "lastTransitionSecondsAgo": None
            if self.last_transition is None
            else round(time.monotonic() - self.last_transition, 1),
        }


class RemoteProbe:
    """TCP reachability of remotes: a remote that refuses connections gets no traffic."""

    def __init__(self, timeout: float = 1.0, failures_to_down: int = 2):
        self.timeout = timeout
        self.failures_to_down = failures_to_down
        self._failures: dict[tuple[str, int], int] = {}

    def usable(self, remote: RemoteBackend) -> bool:
        return self._failures.get((remote.host, remote.port), 0) < self.failures_to_down

    async def check(self, remote: RemoteBackend) -> None:
        target = (remote.host, remote.port)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*target), self.timeout)
            writer.close()
            was_down = not self.usable(remote)
            self._failures[target] = 0
            if was_down:
                log.info("event=remote_up remote=%s:%d", *target)
        except (TimeoutError, OSError) as exc:
            self._failures[target] = self._failures.get(target, 0) + 1
            if self._failures[target] == self.failures_to_down:
                log.warning(
                    "event=remote_down remote=%s:%d error=%r", *target, str(exc) or type(exc).__name__
                )


class Controller:
    def __init__(
        self,
        store: ObjectStore,
        translator: Translator,
        instruments: Instruments,
        informer: Informer | None = None,
        evaluation_interval: float = 5.0,
        default_remote: RemoteBackend | None = None,
        cluster_domain: str = "cluster.local",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.translator = translator
        self.instruments = instruments
        self.informer = informer or NoInformer()
        self.evaluation_interval = evaluation_interval
        self.default_remote = default_remote
        self.cluster_domain = cluster_domain
        self.clock = clock
        self.probe = RemoteProbe()
        self.machines: dict[ObjectKey, OffloadMachine] = {}
        self.readings: dict[ObjectKey, list[MetricStatus]] = {}
        self.status: dict[ObjectKey, ModelStatus] = {}
        self.routes: list[ModelRoute] = []

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._evaluate_forever())
            tg.create_task(self._react_forever())

    async def _evaluate_forever(self) -> None:
        while True:
            started = self.clock()
            await self.evaluate()
            await asyncio.sleep(max(0.0, self.evaluation_interval - (self.clock() - started)))

    async def _react_forever(self) -> None:
        while True:
            await self.store.wait_changed()
            self.reconcile()

    async def evaluate(self) -> None:
        """Read every model's metrics and probe every remote, then reconcile."""
        models = self.store.models()
        remotes = {(r.host, r.port): r for m in models if (r := self.remote_of(m)) is not None}
        results = await asyncio.gather(
            *(self._read_metrics(m) for m in models), *(self.probe.check(r) for r in remotes.values())
        )
        for model, statuses in zip(models, results, strict=False):
            self.readings[model.key] = statuses
        self.instruments.evaluations.inc()
        self.reconcile()

    async def _read_metrics(self, model: ModelDeployment) -> list[MetricStatus]:
        if model.offloading is None:
            return []
        specs = model.offloading.metrics
        readings = await asyncio.gather(*(self.informer.read(s) for s in specs))
        pods = self._pod_count(model)
        statuses = []
        for spec, reading in zip(specs, readings, strict=True):
            if reading.error:
                self.instruments.metric_errors.labels(
                    model.meta.namespace, model.meta.name, spec.describe()
                ).inc()
                log.warning(
                    "event=metric_unavailable model=%s metric=%s error=%r",
                    model.key,
                    spec.describe(),
                    reading.error,
                )
            statuses.append(compare(spec, reading.total, pods, reading.error))
        return statuses

    def _pod_count(self, model: ModelDeployment) -> int:
        if model.source is not None:
            workload = self.store.workload(model.source.kind, model.source.namespace, model.source.name)
            if workload is not None:
                return workload.ready_replicas or workload.replicas
        status = self.status.get(model.key)
        return status.ready_endpoints if status else 1

    def remote_of(self, model: ModelDeployment) -> RemoteBackend | None:
        if model.offloading is None:
            return None
        return model.offloading.remote or self.default_remote

    def reconcile(self) -> None:
        """Decide every model from what is known now and publish the routes."""
        now = self.clock()
        routes: list[ModelRoute] = []
        claimed: dict[str, ObjectKey] = {}
        statuses: dict[ObjectKey, ModelStatus] = {}
        for model in self.store.models():
            status = ModelStatus(model.key)
            statuses[model.key] = status
            status.errors = [str(r) for r in self.store.rejected_for(model.key)]
            route = self._route_for(model, status, claimed, now)
            if route is not None:
                routes.append(route)
        for key in self.status.keys() - statuses.keys():
            self.machines.pop(key, None)
            self.readings.pop(key, None)
            self.instruments.forget_model(key.namespace, key.name)
            log.info("event=model_removed model=%s", key)
        self.status = statuses
        self.routes = routes
        self.translator.publish(routes)

    def _route_for(
        self, model: ModelDeployment, status: ModelStatus, claimed: dict[str, ObjectKey], now: float
    ) -> ModelRoute | None:
        ns, name = model.meta.namespace, model.meta.name
        ref = model.service
        service = self.store.service(ref.namespace, ref.name)
        port = service.port_for(ref.target_port) if service else None
        if service is None:
            status.errors.append(
                f"{model.key}: spec.serviceRef: Service {ref.namespace}/{ref.name} not found"
            )
        elif port is None:
            wanted = ref.target_port if ref.target_port is not None else "(none given, and it has several)"
            status.errors.append(
                f"{model.key}: spec.serviceRef.targetPort: Service {ref.namespace}/{ref.name} "
                f"has no port {wanted}"
            )
        self.instruments.model_errors.labels(ns, name).set(1 if status.errors else 0)
        if service is None or port is None:
            status.phase, status.reason = "Invalid", status.errors[-1]
            return None

        domains = service_domains(ref.name, ref.namespace, port.port, self.cluster_domain)
        fqdn = domains[-2]  # svc.ns.svc.<cluster domain>: one Service, so one model
        if fqdn in claimed:
            status.errors.append(
                f"{model.key}: spec.serviceRef: Service {ref.namespace}/{ref.name} is already "
                f"routed by ModelDeployment {claimed[fqdn]}"
            )
            status.phase, status.reason = "Invalid", status.errors[-1]
            self.instruments.model_errors.labels(ns, name).set(1)
            return None
        # A bare Service name is ambiguous across namespaces: the first model keeps it.
        for d in domains:
            if d in claimed:
                status.warnings.append(f"Host {d!r} also names Service of {claimed[d]}, which keeps it")
        domains = tuple(d for d in domains if d not in claimed)
        claimed.update(dict.fromkeys(domains, model.key))

        endpoints = self._endpoints(ref.namespace, ref.name, port)
        remote = self.remote_of(model)
        status.ready_endpoints = len(endpoints)
        status.remote = f"{remote.scheme}://{remote.authority}{remote.path_prefix}" if remote else None
        status.remote_usable = remote is not None and self.probe.usable(remote)
        status.metrics = self.readings.get(model.key, [])

        machine = self.machines.setdefault(model.key, OffloadMachine())
        previous = machine.last
        if model.offloading is None:
            decision = Decision(Phase.STANDBY, 0.0, "no offloadingConfig: all traffic local")
        else:
            decision = machine.step(
                now, model.offloading.behavior, status.metrics, len(endpoints), status.remote_usable
            )
        status.phase, status.remote_percent, status.reason = (
            decision.phase.value,
            decision.remote_percent,
            decision.reason,
        )
        status.last_transition = machine.changed_at
        self._observe(model, status, previous, decision)
        return ModelRoute(
            ns,
            name,
            domains,
            endpoints,
            remote,
            decision.remote_percent if remote else 0.0,
            labels=tuple(sorted(model.meta.labels.items())),
        )

    def _endpoints(self, namespace: str, service: str, port) -> tuple[tuple[str, int], ...]:
        found = set()
        for s in self.store.endpoint_slices(namespace, service):
            numbers = [p.port for p in s.ports if p.name == port.name] or (
                [s.ports[0].port] if len(s.ports) == 1 and not port.name else []
            )
            if not numbers and isinstance(port.target_port, int):
                numbers = [port.target_port]
            for e in s.endpoints:
                if e.ready:
                    found.update((e.address, n) for n in numbers)
        return tuple(sorted(found))

    def _observe(
        self, model: ModelDeployment, status: ModelStatus, previous: Decision | None, decision: Decision
    ) -> None:
        ns, name = model.meta.namespace, model.meta.name
        i = self.instruments
        i.set_phase(ns, name, decision.phase)
        i.remote_weight.labels(ns, name).set(decision.remote_percent)
        i.ready_endpoints.labels(ns, name).set(status.ready_endpoints)
        for m in status.metrics:
            i.metric_target.labels(ns, name, m.spec.describe()).set(m.spec.target.threshold)
            if m.current is not None:
                i.metric_value.labels(ns, name, m.spec.describe()).set(m.current)
        if (
            previous is None
            or previous.phase != decision.phase
            or previous.remote_percent != decision.remote_percent
        ):
            i.transitions.labels(ns, name, decision.phase.value).inc()
            values = " ".join(f"{m.spec.describe()}={m.current}" for m in status.metrics)
            log.info(
                "event=offload_decision model=%s from=%s to=%s remote_percent=%g reason=%r %s",
                model.key,
                previous.phase.value if previous else "-",
                decision.phase.value,
                decision.remote_percent,
                decision.reason,
                values,
            )
