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
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from api.crd import ModelDeployment, ObjectKey, ObservedStatus, RemoteBackend, Spillover
from api.desired import ModelKey, ModelRoute, service_domains
from api.status import EnvoyRejection, MetricStatus, ModelStatus, Phase
from metrics.hpa import compare
from metrics.source import MetricScope, MetricSource, NoSource, Reading, Request
from reconciler import credentials
from reconciler.claims import HostClaims
from reconciler.logs import some
from reconciler.offload import Decision, OffloadMachine
from reconciler.policy import Verdict, allowed_remotes, policy_keys, resolve, with_remote_policies
from reconciler.probe import RemoteProbe
from reconciler.resolve import Backend, pod_count, pod_selector, resolve_backend
from reconciler.store import ObjectStore

log = logging.getLogger("overspill.reconciler")
METRIC_ERROR_REPEAT = 300.0  # seconds before the same metric error is logged again
RECONCILE_CHUNK = 500  # models decided in one turn of the loop after an evaluation (~50 ms)
# Phases in which traffic goes, or may soon go, to the remote: its reachability is checked every round.
REMOTE_PHASES = {Phase.ACTIVATING, Phase.OFFLOADING, Phase.RELEASING, Phase.OUTAGE, Phase.REMOTE_DOWN}


# The models whose route changed: the new route, or None for a model no longer routed.
Publish = Callable[[dict[ModelKey, ModelRoute | None]], object]
# After each reconcile: the models decided, with status and state machine, and the models
# removed (the CR status writer).
Reconciled = Callable[
    [list[tuple[ModelDeployment, ModelStatus, OffloadMachine | None]], list[ObjectKey]], object
]


@dataclass
class _Reads:
    """What `evaluate` reads for one model, and the readings it took last (unchanged ones
    decide nothing, so an evaluation of 10,000 steady models decides none)."""

    model: ModelDeployment
    requests: list[Request]
    last: list[Reading] | None = None
    since: float = 0.0  # when these reads were first wanted: a metric never read is as old as that
    read_at: dict[str, float] = field(default_factory=dict)  # metric -> when it last had a reading
    stale_after: float = 0.0  # the model's metricStaleAfterSeconds, looked up once, not per read
    # Until when the same readings as `last` need nothing but counting (no metric going stale,
    # no error due to be logged again), and what counting them means: see `Controller.evaluate`.
    quiet_until: float = 0.0
    failing: tuple[str, ...] = ()  # metrics whose reading in `last` is an error
    fresh: tuple[str, ...] = ()  # and those read
    errors: Counter[str] | None = None  # the model's status.metric_read_errors


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
        self._routes: dict[ObjectKey, ModelRoute] = {}
        self.claims = HostClaims()
        self._everything = False
        self._new_standby: list[ObjectKey] = []  # decided for the first time, all local
        # Saved state of models not decided yet since the start, where it is not on their status
        # (a manifests directory's state file); and the models resumed from either, for one log line.
        self.restored: dict[ObjectKey, ObservedStatus] = {}
        self._resumed: list[ObjectKey] = []
        # What each model depends on, and the reverse: which models a key's change concerns.
        self._needs: dict[ObjectKey, tuple[tuple[ObjectKey, ...], tuple[str, int] | None]] = {}
        self._dependents: dict[ObjectKey, set[ObjectKey]] = {}
        self._remote_users: dict[tuple[str, int], set[ObjectKey]] = {}
        self._remotes: dict[tuple[str, int], RemoteBackend] = {}  # what to probe, per target
        # Per model with metrics: the model, what to read, and the last readings taken.
        self._reads: dict[ObjectKey, _Reads] = {}
        # Models whose state machine waits out a delay (time alone changes their decision): decided
        # at every evaluation. Kept as they are decided, so an evaluation need not ask all 10,000.
        self._waiting: set[ObjectKey] = set()
        self._backends: dict[ObjectKey, Backend] = {}  # each model's Service and endpoints, as last resolved
        self._read_list: tuple[list[tuple[ObjectKey, _Reads, list[Request]]], list[Request]] | None = None
        self.evaluations = 0
        self.on_evaluated: Callable[[float], None] | None = None  # an evaluation round's seconds
        # Per model and metric: the error last logged, and when.
        self._metric_errors: dict[ObjectKey, dict[str, tuple[str, float]]] = {}
        # Envoy NACKs still standing, per (stream, xDS type): the rejection and the models it concerns.
        self._rejections: dict[tuple[int, str], tuple[EnvoyRejection, tuple[ModelKey, ...]]] = {}
        # Policy refusals that began or ended in this reconcile, for one log line per Policy and event.
        self._policy_events: dict[tuple[str, str, str], list[tuple[ObjectKey, str]]] = {}
        # (event, metric, stale after, action) -> models and their metric's age (metric_stale, _fresh)
        self._stale_events: dict[tuple[str, str, float, str], list[tuple[ObjectKey, float]]] = {}
        self._unreadable: dict[ObjectKey, list[str]] = {}  # models whose remote credentials cannot be read

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every_interval(self.evaluate))
            tg.create_task(self._every_interval(self.probe_remotes))
            tg.create_task(self._react_forever())

    async def _every_interval(self, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            started = self.clock()
            await work()
            await asyncio.sleep(max(0.0, self.evaluation_interval - (self.clock() - started)))

    async def _react_forever(self) -> None:
        while True:
            await self.store.wait_changed()
            self.reconcile()

    async def evaluate(self) -> None:
        """Read every model's metrics, then decide again the models whose readings changed and
        those waiting out an activation delay or a buffer duration."""
        if not self.leading:
            return  # a follower acts on the leader's status writes, which wake it through the store
        started = time.monotonic()
        self.reconcile()  # take what the store holds now, so what is read is current
        if self._read_list is None:  # the same list while no model's reads change
            entries = [(key, entry, entry.requests) for key, entry in self._reads.items()]
            self._read_list = (entries, [r for _, _, reqs in entries for r in reqs])
        entries, wanted = self._read_list
        readings = await self.informer.read_many(wanted)
        changed = set()
        now = self.clock()
        events: dict[tuple[str, str, str], list[ObjectKey]] = {}
        end = 0
        reads, metric_event = self._reads, self._metric_event
        for key, entry, requests in entries:
            start, end = end, end + len(requests)
            taken = readings[start:end]
            if reads.get(key) is not entry or entry.requests is not requests:
                continue  # its metrics changed while they were read: the next evaluation reads them
            if now < entry.quiet_until and taken == entry.last:
                # The steady case (10,000 models, one Prometheus down or answering as before):
                # the same answers, nothing due, so only count them. Sources keep returning the
                # same Reading objects for an unchanged failure, so the comparison is by identity.
                for metric in entry.failing:
                    entry.errors[metric] += 1
                for metric in entry.fresh:
                    entry.read_at[metric] = now
                continue
            status = self._status_of(key)
            quiet_until, failing, fresh = math.inf, [], []
            for (spec, _), reading in zip(requests, taken, strict=True):
                metric = spec.describe()
                if reading.error:
                    failing.append(metric)
                    status.metric_read_errors[metric] += 1  # every failed read counts
                    if metric not in status.stale_metrics and entry.stale_after > 0:
                        goes_stale = entry.read_at.get(metric, entry.since) + entry.stale_after
                        if goes_stale <= now:
                            changed.add(key)  # it has just gone stale: decided now, not at the next change
                        quiet_until = min(quiet_until, goes_stale)
                else:
                    fresh.append(metric)
                    entry.read_at[metric] = now
                event = metric_event(key, metric, reading.error, now)
                if event is not None:
                    events.setdefault((event[0], metric, event[1]), []).append(key)
                if reading.error:
                    quiet_until = min(quiet_until, self._metric_errors[key][metric][1] + METRIC_ERROR_REPEAT)
            entry.quiet_until, entry.failing, entry.fresh = quiet_until, tuple(failing), tuple(fresh)
            entry.errors = status.metric_read_errors
            if taken == entry.last:
                continue  # the same answer as last time: nothing to decide
            entry.last = taken
            pods = pod_count(self.store, entry.model, status.ready_endpoints or 1)
            statuses = [
                compare(spec, r.total, r.pods or pods, r.error)
                for (spec, _), r in zip(requests, taken, strict=True)
            ]
            if self.readings.get(key) != statuses:
                self.readings[key] = statuses
                changed.add(key)
        self._log_metric_events(events)
        self.evaluations += 1
        todo = sorted(changed | self._waiting)
        for start in range(0, len(todo), RECONCILE_CHUNK):
            if start:
                await asyncio.sleep(0)  # let xDS streams and /readyz have the loop between chunks
            self.reconcile(todo[start : start + RECONCILE_CHUNK])
        if self.on_evaluated is not None:
            self.on_evaluated(time.monotonic() - started)

    async def probe_remotes(self) -> None:
        """Probe each distinct remote once (a bounded number at a time, see `RemoteProbe`), and
        decide again the models of those whose reachability changed."""
        if not self.leading:
            return
        hot = set()
        for target, users in self._remote_users.items():
            for key in users:
                status = self.status.get(key)
                if status is not None and (status.phase in REMOTE_PHASES or status.ready_endpoints == 0):
                    hot.add(target)
                    break
        due = self.probe.due(set(self._remote_users), hot)
        changed = await self.probe.check_all(self._remotes[t] for t in sorted(due) if t in self._remotes)
        self.reconcile({key for target in changed for key in self._remote_users.get(target, ())})

    def _metric_event(
        self, key: ObjectKey, metric: str, error: str | None, now: float
    ) -> tuple[str, str] | None:
        """("unavailable", error) when a model's metric becomes unavailable, its error changes or
        METRIC_ERROR_REPEAT has passed; ("available", "") when it is back; else None."""
        logged = self._metric_errors.get(key)
        if logged is None:
            if error is None:
                return None  # the usual case: read, and no error logged before
            logged = {}
        last = logged.get(metric)
        if error is None:
            if last is None:
                return None
            del logged[metric]
            if not logged:
                del self._metric_errors[key]
            return ("available", "")
        if last is not None and last[0] == error and now - last[1] < METRIC_ERROR_REPEAT:
            return None
        self._metric_errors.setdefault(key, {})[metric] = (error, now)
        return ("unavailable", error)

    def _log_metric_events(self, events: dict[tuple[str, str, str], list[ObjectKey]]) -> None:
        """One line per metric and error however many models share it (one Prometheus down is
        one line, not one per model); every failed read is counted on status and in /metrics."""
        for (kind, metric, error), keys in events.items():
            if kind == "available":
                log.info("event=metric_available metric=%s %s", metric, some(keys))
            else:
                log.warning("event=metric_unavailable metric=%s %s error=%r", metric, some(keys), error)

    def remotes_of(self, model: ModelDeployment) -> tuple[RemoteBackend, ...]:
        """The remotes the model may offload to, in order of preference: the one place the list
        is built, so whatever narrows it (Policies) narrows the probe, the status and the routes."""
        if model.offloading is None:
            return ()
        if model.offloading.remotes:
            return model.offloading.remotes
        return (self.default_remote,) if self.default_remote is not None else ()

    def _status_of(self, key: ObjectKey) -> ModelStatus:
        status = self.status.get(key)
        if status is None:
            status = self.status[key] = ModelStatus(key)
        return status

    @property
    def routes(self) -> list[ModelRoute]:
        """Every model's current route, in namespace/name order."""
        return [self._routes[k] for k in sorted(self._routes)]

    def reconcile(self, keys: Iterable[ObjectKey] = ()) -> None:
        """Decide again the models the store's changes touch, and `keys`; publish what changed.

        Work is proportional to the change: a model depends on its own object, its Service
        (whose key also stands for the Service's EndpointSlices) and its workload, and only the
        models depending on a changed key are decided, with those whose Host names it moves.
        """
        structural: set[ObjectKey] = set()  # models whose objects (or what they point at) changed
        if self._everything:  # who decides changed: every model is decided anew
            self._everything = False
            structural.update(m.key for m in self.store.models())
        for key in self.store.take_changes():
            if key.kind == "ModelDeployment":
                structural.add(key)
            structural.update(self._dependents.get(key, ()))
        # The others named in `keys` (their readings, a remote or a timer moved) keep what was
        # resolved for them last: Service, endpoints, Host names, dependencies and reads. Only
        # the decision is made again, at about half the cost (10,000 models with live metrics
        # are 10,000 such decisions every evaluation).
        dirty = structural | set(keys)
        if not dirty:
            return
        now = self.clock()
        backends: dict[ObjectKey, Backend] = {}
        moved: set[ObjectKey] = set()  # models whose Host names this change moves
        for key in sorted(structural | (dirty - self._backends.keys())):
            model = self.store.get(key)
            if model is None:
                moved |= self.claims.forget(key)
                continue
            backend = backends[key] = resolve_backend(self.store, model)
            if backend.port is None:
                moved |= self.claims.forget(key)
                continue
            ref = model.service
            domains = service_domains(ref.name, ref.namespace, backend.port.port, self.cluster_domain)
            # svc.ns.svc.<cluster domain> names one Service, so one model
            moved |= self.claims.want(key, domains, domains[-2], f"{ref.namespace}/{ref.name}")
        changes: dict[ModelKey, ModelRoute | None] = {}
        decided: list[ModelDeployment] = []
        removed: list[ObjectKey] = []
        for key in sorted(dirty | moved):
            model = self.store.get(key)
            if model is None:
                if self._forget(key):
                    removed.append(key)
                route = None
            else:
                backend = backends.get(key) or (
                    self._backends.get(key) if key not in structural and key not in moved else None
                )
                whole = backend is None or key in backends
                if whole:
                    self._track(model)
                try:
                    backend = backend or resolve_backend(self.store, model)
                    self._backends[key] = backend
                    route = self._reconcile_model(model, backend, now)
                except Exception as exc:  # a bug met by one model must not stop the others
                    log.exception("event=reconcile_error model=%s", model.key)
                    status = self._status_of(model.key)
                    status.errors = [f"{model.key}: internal error: {exc!r}"]
                    status.reason = status.errors[0]
                    route = self._routes.get(key)  # keeps serving as it was
                decided.append(model)
                if whole:
                    self._remember_reads(model)
                elif (entry := self._reads.get(key)) is not None:
                    entry.quiet_until = 0.0  # its stale metrics may have changed
                machine = self.machines.get(key)
                if machine is not None and machine.waiting:
                    self._waiting.add(key)
                else:
                    self._waiting.discard(key)
            if route != self._routes.get(key):
                changes[(key.namespace, key.name)] = route
                if route is None:
                    del self._routes[key]
                else:
                    self._routes[key] = route
        if changes:
            self.publish(changes)
        if self._new_standby:
            log.info("event=models_added phase=Standby %s", some(self._new_standby))
            self._new_standby = []
        if self._resumed:
            log.info("event=offload_state_resumed %s", some(self._resumed))
            self._resumed = []
        if self._policy_events:
            self._log_policy_events()
        if self._stale_events:
            self._log_stale_events()
        if self.on_reconciled is not None:
            try:
                self.on_reconciled(
                    [(m, self.status[m.key], self.machines.get(m.key)) for m in decided], removed
                )
            except Exception:  # reporting must never stop deciding and routing
                log.exception("event=reconciled_hook_error")

    def _track(self, model: ModelDeployment) -> None:
        """Index what `model` depends on, so a change to any of it decides the model again (a
        Policy's change decides only the models that name it)."""
        ref, source, remotes = model.service, model.source, self.remotes_of(model)
        needs = (
            (ObjectKey("Service", ref.namespace, ref.name),)
            + ((ObjectKey(source.kind, source.namespace, source.name),) if source is not None else ())
            + policy_keys(model)
            + credentials.secret_keys(model.meta.namespace, remotes)
        )
        targets = tuple((remote.host, remote.port) for remote in remotes)
        if self._needs.get(model.key) == (needs, targets):
            return
        self._untrack(model.key)
        self._needs[model.key] = (needs, targets)
        for need in needs:
            self._dependents.setdefault(need, set()).add(model.key)
        for target, remote in zip(targets, remotes, strict=True):
            self._remote_users.setdefault(target, set()).add(model.key)
            self._remotes[target] = remote

    def _remember_reads(self, model: ModelDeployment) -> None:
        """What `evaluate` reads for the model; built when it is decided, since its metrics and
        pods (the scope) can only change with the model or its workload, which decide it again."""
        if model.offloading is None or not model.offloading.metrics:
            self._reads.pop(model.key, None)
            self._read_list = None
            return
        scope = MetricScope(
            model.meta.namespace,
            pod_selector(self.store, model),
            model.meta.name,
            remotes=max(1, len(self.remotes_of(model))),
        )
        requests = [(spec, scope) for spec in model.offloading.metrics]
        entry = self._reads.get(model.key)
        if entry is None or entry.requests != requests:
            self._read_list = None
            self._reads[model.key] = _Reads(
                model, requests, since=self.clock(), stale_after=_stale_after(model)
            )
        else:  # the same reads (one in flight keeps its place); the pods may have changed
            entry.model, entry.last, entry.stale_after = model, None, _stale_after(model)
            entry.quiet_until = 0.0  # decided again: its stale metrics may have changed

    def _untrack(self, key: ObjectKey) -> None:
        needs, targets = self._needs.pop(key, ((), ()))
        for index, entries in ((self._dependents, needs), (self._remote_users, targets)):
            for entry in entries:
                users = index.get(entry)
                if users is not None:
                    users.discard(key)
                    if not users:
                        del index[entry]
                        if index is self._remote_users:
                            del self._remotes[entry]

    def _forget(self, key: ObjectKey) -> bool:
        """A model gone from the store: drop everything kept for it; False if nothing was."""
        self._untrack(key)
        self._reads.pop(key, None)
        self._read_list = None
        self.machines.pop(key, None)
        self._waiting.discard(key)
        self._backends.pop(key, None)
        self.readings.pop(key, None)
        self._metric_errors.pop(key, None)
        self._unreadable.pop(key, None)
        if self.status.pop(key, None) is None:
            return False
        log.info("event=model_removed model=%s", key)
        return True

    # --- leadership ---

    def lead(self) -> None:
        """Start deciding: every state machine resumes from the status the last leader wrote."""
        self.leading = True
        self.machines.clear()
        self._waiting.clear()
        self._everything = True

    def follow(self) -> None:
        self.leading = False
        self._everything = True

    def to_wall(self, t: float) -> float:
        """A state-machine time as wall-clock seconds, with one fixed offset: the same instant
        always maps to the same timestamp, so a steady model's status never changes."""
        return t + self._wall_offset

    def _to_clock(self, t: float | None) -> float | None:
        return None if t is None else t - self._wall_offset

    def _machine_for(self, model: ModelDeployment, status: ModelStatus, now: float) -> OffloadMachine:
        machine = self.machines.get(model.key)
        if machine is None:
            machine = self.machines[model.key] = OffloadMachine()
            seen = self.restored.pop(model.key, None) or model.observed
            if seen is not None:  # a restart or a new leader: carry on where the status says
                self._resume(model, status, machine, seen)
                if model.offloading is not None:  # a proportional share is held for the buffer
                    machine.resume(now, model.offloading.behavior, seen.remote_percent)
        return machine

    def _resume(
        self, model: ModelDeployment, status: ModelStatus, machine: OffloadMachine, seen: ObservedStatus
    ) -> None:
        """Take up a model's saved state: the timers (wall clock, so a delay or a buffer goes on
        from when it started), the decision it had (the same decision again is no transition) and
        a remote it found down (no traffic to it until a probe finds it up)."""
        machine.triggered = seen.triggered
        machine.triggered_at = self._to_clock(seen.triggered_at)
        machine.over_since = self._to_clock(seen.over_since)
        machine.under_since = self._to_clock(seen.under_since)
        try:
            phase = Phase(seen.phase)
        except ValueError:
            return
        if status.last_transition is None and seen.last_transition is not None:
            status.phase, status.remote_percent = phase, seen.remote_percent
            status.last_transition = self._to_clock(seen.last_transition)
        if phase == Phase.REMOTE_DOWN:
            for remote in self.remotes_of(model):
                self.probe.assume_down(remote)
        if machine.triggered or machine.over_since is not None or phase == Phase.REMOTE_DOWN:
            self._resumed.append(model.key)

    def _reconcile_model(self, model: ModelDeployment, backend: Backend, now: float) -> ModelRoute | None:
        status = self._status_of(model.key)
        status.errors = [str(r) for r in self.store.rejected_for(model.key)]
        status.warnings = []
        status.rejections = self._rejections_of(model.key)
        claim = None
        if backend.port is not None:
            claim = self.claims.claim(model.key)
            status.warnings = list(claim.warnings)
        error = backend.error or (claim.error if claim else None)
        if error is not None or claim is None:
            status.refused = []  # no route, so no remote to refuse
            status.errors.append(error or f"{model.key}: spec.serviceRef: cannot be resolved")
            self._record(model, status, Decision(Phase.INVALID, 0.0, status.errors[-1]), now)
            return None

        # First, so that saved state (a remote found down, say) counts in this very decision.
        machine = self._machine_for(model, status, now) if model.offloading and self.leading else None
        remotes, unreadable = self._with_credentials(model)
        allowed = self._apply_policies(model, status, remotes).allowed
        status.remote_credentials = "; ".join(unreadable) or None
        status.errors += [f"{model.key}: {e}" for e in unreadable]
        status.ready_endpoints = len(backend.endpoints)
        status.remotes = [(remote.url, self.probe.usable(remote)) for remote in remotes]
        status.remote = remotes[0].url if remotes else None
        # Envoy itself leaves a remote that fails for the next (see xds.failover): offloading
        # goes on while any remote the Policies allow is up. A remote whose credentials cannot
        # be read gets no traffic (its cluster stays, so it takes traffic as soon as they can).
        status.remote_usable = not unreadable and any(self.probe.usable(remote) for remote in allowed)
        status.metrics = self.readings.get(model.key, [])
        if model.offloading is None:
            decision = Decision(Phase.STANDBY, 0.0, "no offloadingConfig: all traffic local")
        elif machine is None:
            decision = self._followed(model, status)
        else:
            self._note_stale(model, status, self._stale_metrics(model, now), now)
            decision = machine.step(
                now,
                model.offloading.behavior,
                status.metrics,
                status.ready_endpoints,
                status.remote_usable,
                status.stale_metrics,
            )
        if status.refused and decision.phase == Phase.REMOTE_DOWN:
            first = status.refused[0]
            decision = Decision(
                decision.phase, 0.0, f"{decision.reason}: refused by Policy {first.policy} ({first.reason})"
            )
        self._record(model, status, decision, now)
        spillover = _spillover(model) if allowed and status.remote_usable else None
        status.spillover = spillover is not None
        return ModelRoute(
            model.meta.namespace,
            model.meta.name,
            claim.domains,
            backend.endpoints,
            tuple(with_remote_policies(remote, status.remote_policies) for remote in allowed),
            decision.remote_percent if allowed else 0.0,
            labels=tuple(sorted(model.meta.labels.items())),
            spillover=spillover,
        )

    def _with_credentials(self, model: ModelDeployment) -> tuple[tuple[RemoteBackend, ...], list[str]]:
        """The model's remotes with their credentials read from its namespace's Secrets, and what
        could not be read (logged once as it starts and once as it ends)."""
        remotes, unreadable = [], []
        for remote in self.remotes_of(model):
            remote, errors = credentials.resolve(self.store, model.meta.namespace, remote)
            remotes.append(remote)
            unreadable += errors
        self._note_credentials(model.key, unreadable)
        return tuple(remotes), unreadable

    def _note_credentials(self, key: ObjectKey, unreadable: list[str]) -> None:
        """One log line when a model's credentials become unreadable (naming the Secret key,
        never a value) and one when they can be read again."""
        before = self._unreadable.get(key)
        if unreadable == (before or []):
            return
        if unreadable:
            self._unreadable[key] = unreadable
            log.warning("event=credentials_unreadable model=%s error=%r", key, "; ".join(unreadable))
        else:
            del self._unreadable[key]
            log.info("event=credentials_readable model=%s", key)

    def _apply_policies(
        self, model: ModelDeployment, status: ModelStatus, remotes: list[RemoteBackend]
    ) -> Verdict:
        """Filter the model's remotes through its local Policies; keep the outcome on status (a
        Policy that cannot be read is an error there too) and note refusals that begin or end."""
        if not model.policies and not status.refused:  # the common case, kept cheap
            status.local_policies, status.remote_policies = [], []
            return Verdict(tuple(remotes), ())
        resolved = resolve(self.store, model)
        verdict = allowed_remotes(remotes, resolved)
        status.local_policies = resolved.local_names
        status.remote_policies = list(resolved.remote_names)
        status.errors.extend(f"{model.key}: spec.policies: {u.message}" for u in resolved.unresolved)
        # A refusal is the same while its remote, Policy and reason are; a new message (the Policy
        # edited, still refusing) is logged as a refusal again, without an end in between.
        before = {(r.remote, r.policy, r.reason): r for r in status.refused}
        after = {(r.remote, r.policy, r.reason): r for r in verdict.refused}
        began = [r for k, r in after.items() if before.get(k) != r]
        ended = [r for k, r in before.items() if k not in after]
        for event, refusals in (("remote_refused", began), ("remote_refusal_ended", ended)):
            for r in sorted(refusals, key=lambda r: (r.policy, r.remote)):
                self._policy_events.setdefault((event, r.policy, r.reason), []).append((model.key, r.message))
        status.refused = list(verdict.refused)
        return verdict

    def _log_policy_events(self) -> None:
        """One line per Policy and event however many models it concerns (a Policy edit can
        refuse the remote of every model naming it); `detail` is the first model's message."""
        for (event, policy, reason), items in sorted(self._policy_events.items()):
            keys = [key for key, _ in items]
            if event == "remote_refused":
                log.warning(
                    "event=%s policy=%s reason=%s %s detail=%r",
                    event,
                    policy,
                    reason,
                    some(keys),
                    items[0][1],
                )
            else:
                log.info("event=%s policy=%s reason=%s %s", event, policy, reason, some(keys))
        self._policy_events = {}

    def _stale_metrics(self, model: ModelDeployment, now: float) -> list[str]:
        """The model's metrics without a reading for `metricStaleAfterSeconds` (a source down
        or answering nothing counts the same)."""
        entry, after = self._reads.get(model.key), _stale_after(model)
        if entry is None or after <= 0:
            return []
        names = (spec.describe() for spec, _ in entry.requests)
        return [m for m in names if now - entry.read_at.get(m, entry.since) >= after]

    def _note_stale(self, model: ModelDeployment, status: ModelStatus, stale: list[str], now: float) -> None:
        """Keep the stale metrics on status; note each as it goes stale and as it returns, for one
        log line per metric and event however many models (a source gone stales them all)."""
        entry = self._reads.get(model.key)
        behavior = model.offloading.behavior if model.offloading else None
        for metric in stale:
            if metric not in status.stale_metrics and entry is not None and behavior is not None:
                age = now - entry.read_at.get(metric, entry.since)
                event = (
                    "metric_stale",
                    metric,
                    behavior.metric_stale_after_seconds,
                    behavior.on_stale_metric,
                )
                self._stale_events.setdefault(event, []).append((model.key, age))
        for metric in status.stale_metrics:
            if metric not in stale:
                self._stale_events.setdefault(("metric_fresh", metric, 0.0, ""), []).append((model.key, 0.0))
        status.stale_metrics = stale

    def _log_stale_events(self) -> None:
        for (event, metric, after, action), items in sorted(self._stale_events.items()):
            keys = [key for key, _ in items]
            if event == "metric_stale":
                log.warning(
                    "event=metric_stale metric=%s %s age=%.0fs stale_after=%gs action=%s",
                    metric,
                    some(keys),
                    max(age for _, age in items),
                    after,
                    action,
                )
            else:
                log.info("event=metric_fresh metric=%s %s", metric, some(keys))
        self._stale_events = {}

    def _followed(self, model: ModelDeployment, status: ModelStatus) -> Decision:
        """A follower's decision: the leader's, from status; an outage it sees itself at once."""
        if status.ready_endpoints == 0 and status.remote is not None and not status.refused:
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
        if decision.phase != previous:  # a Proportional share moving within a phase is no transition
            status.transitions[decision.phase.value] += 1
        if previous is None and decision.phase == Phase.STANDBY:
            self._new_standby.append(model.key)  # the usual start: one summary line (see reconcile)
            return
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


def _stale_after(model: ModelDeployment) -> float:
    return model.offloading.behavior.metric_stale_after_seconds if model.offloading else 0.0


def _spillover(model: ModelDeployment) -> Spillover | None:
    """The model's spill-over settings when it is on. Only with a usable remote allowed: a remote
    found down would turn each shed request into a wait for a connection that fails. The
    decisions still set the steady share."""
    spill = model.offloading.behavior.spillover if model.offloading else None
    return spill if spill is not None and spill.enabled else None
