"""The reconcile loop: store and live readings in, one offload decision per model, routes out.

Metrics are read every `evaluation_interval`; a change in the store (an endpoint going
unready, a CR edited) is acted on at once with the last readings, so an outage does not
wait for the next evaluation. The work per model is in small units: `resolve` (Service,
port, endpoints, pods), `claims` (Host names), `probe` (remote reachability) and
`offload` (the decision); this module orchestrates them and keeps each model's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from api.crd import ModelDeployment, ObjectKey, RemoteBackend
from api.desired import ModelKey, ModelRoute, service_domains
from api.status import EnvoyRejection, MetricStatus, ModelStatus, Phase
from metrics.hpa import compare
from metrics.source import MetricScope, MetricSource, NoSource
from reconciler.claims import HostClaims
from reconciler.offload import Decision, OffloadMachine
from reconciler.probe import RemoteProbe
from reconciler.resolve import pod_count, pod_selector, resolve_backend
from reconciler.store import ObjectStore

log = logging.getLogger("overspill.reconciler")
METRIC_ERROR_REPEAT = 300.0  # seconds before the same metric error is logged again


Publish = Callable[[list[ModelRoute]], object]
# After each reconcile: every model with its status and state machine (the CR status writer).
Reconciled = Callable[[list[tuple[ModelDeployment, ModelStatus, OffloadMachine | None]]], object]


class Controller:
    """Decides every model and hands the desired routes to `publish` (the Envoy side)."""

    def __init__(
        self,
        store: ObjectStore,
        publish: Publish,
        informer: MetricSource | None = None,
        evaluation_interval: float = 5.0,
        default_remote: RemoteBackend | None = None,
        cluster_domain: str = "cluster.local",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.store = store
        self.publish = publish
        self.informer = informer or NoSource()
        self.evaluation_interval = evaluation_interval
        self.default_remote = default_remote
        self.cluster_domain = cluster_domain
        self.clock = clock
        self.wall = wall
        self._wall_offset = wall() - clock()
        # Only the leader reads metrics and decides; a follower serves the decisions the
        # leader wrote on each model's status (`ModelDeployment.observed`).
        self.leading = True
        self.on_reconciled: Reconciled | None = None
        self.probe = RemoteProbe()
        self.machines: dict[ObjectKey, OffloadMachine] = {}
        self.readings: dict[ObjectKey, list[MetricStatus]] = {}
        self.status: dict[ObjectKey, ModelStatus] = {}
        self.routes: list[ModelRoute] = []
        self.evaluations = 0
        self._metric_errors: dict[tuple[ObjectKey, str], tuple[str, float]] = {}  # last logged, and when
        # Envoy NACKs still standing, per (stream, xDS type): the rejection and the models it concerns.
        self._rejections: dict[tuple[int, str], tuple[EnvoyRejection, tuple[ModelKey, ...]]] = {}

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
        if not self.leading:
            return  # a follower acts on the leader's status writes, which wake it through the store
        models = self.store.models()
        remotes = {(r.host, r.port): r for m in models if (r := self.remote_of(m)) is not None}
        results = await asyncio.gather(
            *(self._read_metrics(m) for m in models), *(self.probe.check(r) for r in remotes.values())
        )
        for model, statuses in zip(models, results, strict=False):
            self.readings[model.key] = statuses
        self.evaluations += 1
        self.reconcile()

    async def _read_metrics(self, model: ModelDeployment) -> list[MetricStatus]:
        if model.offloading is None:
            return []
        specs = model.offloading.metrics
        status = self._status_of(model.key)
        scope = MetricScope(model.meta.namespace, pod_selector(self.store, model))
        readings = await asyncio.gather(*(self.informer.read(s, scope) for s in specs))
        pods = pod_count(self.store, model, status.ready_endpoints or 1)
        statuses = []
        for spec, reading in zip(specs, readings, strict=True):
            if reading.error:
                status.metric_read_errors[spec.describe()] += 1
            self._log_metric(
                model.key, spec.describe(), reading.error, status.metric_read_errors[spec.describe()]
            )
            statuses.append(compare(spec, reading.total, reading.pods or pods, reading.error))
        return statuses

    def _log_metric(self, key: ObjectKey, metric: str, error: str | None, failures: int) -> None:
        """One line when a metric becomes unavailable (or its error changes) and one when it is
        back, not one per model per evaluation; the count is on status and in /metrics."""
        last = self._metric_errors.get((key, metric))
        if error is None:
            if last is not None:
                del self._metric_errors[(key, metric)]
                log.info("event=metric_available model=%s metric=%s", key, metric)
            return
        now = self.clock()
        if last is not None and last[0] == error and now - last[1] < METRIC_ERROR_REPEAT:
            return
        self._metric_errors[(key, metric)] = (error, now)
        log.warning(
            "event=metric_unavailable model=%s metric=%s failures=%d error=%r", key, metric, failures, error
        )

    def remote_of(self, model: ModelDeployment) -> RemoteBackend | None:
        if model.offloading is None:
            return None
        return model.offloading.remote or self.default_remote

    def _status_of(self, key: ObjectKey) -> ModelStatus:
        status = self.status.get(key)
        if status is None:
            status = self.status[key] = ModelStatus(key)
        return status

    def reconcile(self) -> None:
        """Decide every model from what is known now and publish the routes."""
        now = self.clock()
        routes: list[ModelRoute] = []
        claims = HostClaims()
        models = self.store.models()
        last = {(r.namespace, r.name): r for r in self.routes}
        for model in models:
            try:
                route = self._reconcile_model(model, claims, now)
            except Exception as exc:  # a bug met by one model must not stop the others
                log.exception("event=reconcile_error model=%s", model.key)
                status = self._status_of(model.key)
                status.errors = [f"{model.key}: internal error: {exc!r}"]
                status.reason = status.errors[0]
                route = last.get((model.meta.namespace, model.meta.name))  # keeps serving as it was
            if route is not None:
                routes.append(route)
        for key in self.status.keys() - {m.key for m in models}:
            del self.status[key]
            for gone in [k for k in self._metric_errors if k[0] == key]:
                del self._metric_errors[gone]
            self.machines.pop(key, None)
            self.readings.pop(key, None)
            log.info("event=model_removed model=%s", key)
        self.routes = routes
        self.publish(routes)
        if self.on_reconciled is not None:
            try:
                self.on_reconciled([(m, self.status[m.key], self.machines.get(m.key)) for m in models])
            except Exception:  # reporting must never stop deciding and routing
                log.exception("event=reconciled_hook_error")

    # --- leadership ---

    def lead(self) -> None:
        """Start deciding: every state machine resumes from the status the last leader wrote."""
        self.leading = True
        self.machines.clear()

    def follow(self) -> None:
        self.leading = False

    def to_wall(self, t: float) -> float:
        """A state-machine time as wall-clock seconds, with one fixed offset: the same instant
        always maps to the same timestamp, so a steady model's status never changes."""
        return t + self._wall_offset

    def _to_clock(self, t: float | None) -> float | None:
        return None if t is None else t - self._wall_offset

    def _machine_for(self, model: ModelDeployment) -> OffloadMachine:
        machine = self.machines.get(model.key)
        if machine is None:
            seen = model.observed
            machine = OffloadMachine()
            if seen is not None:  # a restart or a new leader: carry on where the status says
                machine.triggered = seen.triggered
                machine.triggered_at = self._to_clock(seen.triggered_at)
                machine.over_since = self._to_clock(seen.over_since)
                machine.under_since = self._to_clock(seen.under_since)
            self.machines[model.key] = machine
        return machine

    def _reconcile_model(self, model: ModelDeployment, claims: HostClaims, now: float) -> ModelRoute | None:
        status = self._status_of(model.key)
        status.errors = [str(r) for r in self.store.rejected_for(model.key)]
        status.warnings = []
        status.rejections = self._rejections_of(model.key)
        ref = model.service
        backend = resolve_backend(self.store, model)
        claim = None
        if backend.port is not None:
            domains = service_domains(ref.name, ref.namespace, backend.port.port, self.cluster_domain)
            # svc.ns.svc.<cluster domain> names one Service, so one model
            claim = claims.claim(model.key, domains, domains[-2], f"{ref.namespace}/{ref.name}")
            status.warnings = list(claim.warnings)
        error = backend.error or (claim.error if claim else None)
        if error is not None or claim is None:
            status.errors.append(error or f"{model.key}: spec.serviceRef: cannot be resolved")
            self._record(model, status, Decision(Phase.INVALID, 0.0, status.errors[-1]), now)
            return None

        remote = self.remote_of(model)
        status.ready_endpoints = len(backend.endpoints)
        status.remote = f"{remote.scheme}://{remote.authority}{remote.path_prefix}" if remote else None
        status.remote_usable = remote is not None and self.probe.usable(remote)
        status.metrics = self.readings.get(model.key, [])
        if model.offloading is None:
            decision = Decision(Phase.STANDBY, 0.0, "no offloadingConfig: all traffic local")
        elif not self.leading:
            decision = self._followed(model, status)
        else:
            machine = self._machine_for(model)
            decision = machine.step(
                now, model.offloading.behavior, status.metrics, status.ready_endpoints, status.remote_usable
            )
        self._record(model, status, decision, now)
        return ModelRoute(
            model.meta.namespace,
            model.meta.name,
            claim.domains,
            backend.endpoints,
            remote,
            decision.remote_percent if remote else 0.0,
            labels=tuple(sorted(model.meta.labels.items())),
        )

    def _followed(self, model: ModelDeployment, status: ModelStatus) -> Decision:
        """A follower's decision: the leader's, from status; an outage it sees itself at once."""
        if status.ready_endpoints == 0 and status.remote is not None:
            return Decision(Phase.OUTAGE, 100.0, "no ready local endpoint")
        seen = model.observed
        if seen is None:
            return Decision(Phase.STANDBY, 0.0, "waiting for the leader's first decision")
        try:
            phase = Phase(seen.phase)
        except ValueError:
            phase = Phase.STANDBY
        return Decision(phase, seen.remote_percent, "decided by the leader")

    def _record(self, model: ModelDeployment, status: ModelStatus, decision: Decision, now: float) -> None:
        """Write the decision on the model's status; count and log a change of phase or share."""
        changed = status.last_transition is None or (
            (status.phase, status.remote_percent) != (decision.phase, decision.remote_percent)
        )
        previous = status.phase if status.last_transition is not None else None
        status.phase, status.remote_percent, status.reason = (
            decision.phase,
            decision.remote_percent,
            decision.reason,
        )
        if not changed:
            return
        status.last_transition = now
        status.transitions[decision.phase.value] += 1
        values = " ".join(f"{m.spec.describe()}={m.current}" for m in status.metrics)
        log.info(
            "event=offload_decision model=%s from=%s to=%s remote_percent=%g reason=%r %s",
            model.key,
            previous.value if previous else "-",
            decision.phase.value,
            decision.remote_percent,
            decision.reason,
            values,
        )

    # --- what Envoys said about the routes (wired to the xDS server's callbacks) ---

    def envoy_rejected(self, stream: int, rejection: EnvoyRejection, models: Iterable[ModelKey]) -> None:
        models = tuple(models)
        self._rejections[(stream, rejection.type)] = (rejection, models)
        for ns, name in models:
            status = self.status.get(ObjectKey("ModelDeployment", ns, name))
            if status is not None:
                status.xds_nacks[rejection.type] += 1
                status.rejections = self._rejections_of(status.key)

    def envoy_accepted(self, stream: int, xds_type: str | None = None) -> None:
        """A later version was accepted (or, with no type, the Envoy went away): its NACKs are over."""
        if not self._rejections:
            return  # the common case, once per ACK of every Envoy
        gone = [k for k in self._rejections if k[0] == stream and (xds_type is None or k[1] == xds_type)]
        touched = {m for k in gone for m in self._rejections.pop(k)[1]}
        for ns, name in touched:
            status = self.status.get(ObjectKey("ModelDeployment", ns, name))
            if status is not None:
                status.rejections = self._rejections_of(status.key)

    def _rejections_of(self, key: ObjectKey) -> list[EnvoyRejection]:
        model = (key.namespace, key.name)
        return [r for r, models in self._rejections.values() if model in models]
