"""What each ModelDeployment's status says in the cluster, and the Events beside it.

The leader writes, through the status subresource with a merge patch, only when something
a user would see has changed (a steady model writes nothing), at most once per model per
reconcile; a conflict is retried. The status carries the offload state machine's timers as
timestamps, so a new leader (or a restarted one) resumes where the last one stopped.
Events mark what happened (offloading on and off, an outage, errors), de-duplicated as
Kubernetes does: the same event again bumps its count instead of adding another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from api.crd import MODEL_API, ModelDeployment, ObjectKey, format_time
from api.status import ModelStatus, Phase
from reconciler.kubeapi import ApiError, Backoff, KubeApi
from reconciler.offload import OffloadMachine
from reconciler.saved import saved_fields

log = logging.getLogger("overspill.status")
OFFLOADING_PHASES = (Phase.OFFLOADING, Phase.RELEASING, Phase.OUTAGE)


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:1024],
        "observedGeneration": generation,
    }


def desired_status(
    model: ModelDeployment,
    status: ModelStatus,
    machine: OffloadMachine | None,
    to_wall: Callable[[float], float],
) -> dict:
    """The CR's `status` for what the controller knows now (condition times filled in by the writer)."""
    gen = model.meta.generation
    metrics_ok = all(m.current is not None for m in status.metrics)
    missing = [f"{m.spec.describe()}: {m.error}" for m in status.metrics if m.current is None]
    first = status.metrics[0] if status.metrics else None
    errors = status.errors + [f"{status.key}: {r}" for r in status.rejections]
    conditions = [
        _condition(
            "Ready",
            status.phase != Phase.INVALID and not status.rejections,
            "Invalid"
            if status.phase == Phase.INVALID
            else ("EnvoyRejected" if status.rejections else "Routed"),
            errors[-1] if errors else "served through Envoy",
            gen,
        ),
        _condition(
            "Offloading",
            status.remote_percent > 0,
            status.phase.value,
            status.reason or status.phase.value,
            gen,
        ),
        _condition(
            "MetricsAvailable",
            metrics_ok,
            ("NoMetrics" if not status.metrics else "Read")
            if metrics_ok
            else ("MetricStale" if status.stale_metrics else "MetricUnavailable"),
            ("stale: " + ", ".join(status.stale_metrics) + "; " if status.stale_metrics else "")
            + ("; ".join(missing) if missing else f"{len(status.metrics)} metric(s) read"),
            gen,
        ),
        _condition(
            "RemoteAvailable",
            status.remote_usable,
            _remote_reason(status),
            status.remote_credentials
            or (
                ", ".join(f"{url} {'reachable' if ok else 'unreachable'}" for url, ok in status.remotes)
                if len(status.remotes) > 1
                else status.remote or "no remoteBackend and no --default-remote"
            ),
            gen,
        ),
        _remote_allowed(status, gen),
    ]

    return {
        **saved_fields(status, machine, to_wall),  # what a restart or a new leader resumes from
        "offloadingStatus": status.phase in OFFLOADING_PHASES and status.remote_percent > 0,
        "readyEndpoints": status.ready_endpoints,
        "metric": "-"
        if first is None
        else f"{'-' if first.current is None else _num(first.current)}/{_num(first.spec.target.threshold)}",
        "metrics": [
            {
                "name": m.spec.describe(),
                "type": m.spec.type,
                "current": None if m.current is None else round(m.current, 4),
                "target": m.spec.target.threshold,
                "targetType": m.spec.target.type,
                "over": m.over,
                "error": m.error or "",
            }
            for m in status.metrics
        ],
        "remote": status.remote or "",
        "policies": status.policies_dict(),
        "remotes": [{"remote": url, "reachable": ok} for url, ok in status.remotes],
        "observedGeneration": gen,
        "errors": errors,
        "conditions": conditions,
    }


def _remote_allowed(status: ModelStatus, generation: int) -> dict:
    """`RemoteAllowed`: False, with the Policy and the rule not met, while the model's local
    Policies keep its remote from traffic (or cannot be read, which holds offloading off)."""
    remotely = status.remote_policies
    note = f"; enforced by the remote: {', '.join(remotely)}" if remotely else ""
    if status.refused:
        message = "; ".join(r.message for r in status.refused)
        return _condition("RemoteAllowed", False, status.refused[0].reason, message + note, generation)
    if status.remote is None:
        return _condition(
            "RemoteAllowed", True, "NoRemote", "no remote to send traffic to" + note, generation
        )
    if status.local_policies:
        message = f"{status.remote} satisfies {', '.join(status.local_policies)}"
        return _condition("RemoteAllowed", True, "PoliciesMet", message + note, generation)
    return _condition("RemoteAllowed", True, "NoPolicies", "no local Policy attached" + note, generation)


def _num(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"


@dataclass
class _Written:
    status: dict  # what was last written, conditions with their times
    uid: str


class StatusWriter:
    """Writes models' status and Events; `sync` after each reconcile, from the leader only."""

    def __init__(self, api: KubeApi, component: str = "overspill", concurrency: int = 8):
        self.api = api
        self.component = component
        self._written: dict[ObjectKey, _Written] = {}
        self._pending: dict[ObjectKey, tuple[ModelDeployment, dict]] = {}
        # Models with a write in flight: one at a time per model, or an older status sent just
        # before a newer one could land after it and stay on the CR.
        self._writing: set[ObjectKey] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._events: dict[
            tuple[str, str, str], tuple[str, int]
        ] = {}  # (uid, reason, message) -> (name, count)
        self._rejected_written: dict[ObjectKey, tuple[str, ...]] = {}
        self.writes = 0
        self.conflicts = 0

    def sync(self, items: Iterable[tuple[ModelDeployment, dict]], removed: Iterable[ObjectKey] = ()) -> None:
        """Queue a write for every model whose visible status changed; returns at once."""
        for key in removed:
            self._written.pop(key, None)
        for model, desired in items:
            written = self._written.get(model.key)
            previous = written.status if written and written.uid == model.meta.uid else _from_cluster(model)
            status = _with_condition_times(desired, previous)
            if previous is not None and _visible(status) == _visible(previous):
                continue
            self._pending[model.key] = (model, status)
            if model.key not in self._writing:  # else the write in flight takes this one next
                self._writing.add(model.key)
                self._spawn(self._write(model.key, previous))

    def sync_rejected(self, rejected: Iterable[tuple[ObjectKey, tuple[str, ...]]]) -> None:
        """ModelDeployments that never parsed (so the controller has no model for them) still get
        their errors on status, once per distinct set of errors."""
        for key, errors in rejected:
            if self._rejected_written.get(key) == errors:
                continue
            self._rejected_written[key] = errors
            message = "; ".join(errors)
            status = {
                "phase": Phase.INVALID.value,
                "offloadingStatus": False,
                "remotePercent": 0,
                "errors": list(errors),
                "conditions": [
                    dict(
                        _condition("Ready", False, "Invalid", message, 0),
                        lastTransitionTime=format_time(time.time()),
                    )
                ],
            }
            path = f"/apis/{MODEL_API}/namespaces/{key.namespace}/modeldeployments/{key.name}/status"
            self._spawn(self._patch_quietly(key, path, status))

    async def _patch_quietly(self, key: ObjectKey, path: str, status: dict) -> None:
        async with self._slots:
            try:
                await self.api.merge_patch(path, {"status": status})
                self.writes += 1
            except ApiError as exc:
                self._rejected_written.pop(key, None)  # try again on the next sync
                log.warning("event=status_write_error model=%s error=%r", key, str(exc))

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, key: ObjectKey, previous: dict | None) -> None:
        """Write the model's pending status, then whatever became pending meanwhile, in order."""
        try:
            while key in self._pending:
                written = await self._write_one(key, previous)
                if written is None:
                    return
                previous = written
        finally:
            self._writing.discard(key)

    async def _write_one(self, key: ObjectKey, previous: dict | None) -> dict | None:
        """The pending status written (None if it could not be), and its Event."""
        async with self._slots:
            model, status = self._pending.pop(key)
            ns, name = model.meta.namespace, model.meta.name
            path = f"/apis/{MODEL_API}/namespaces/{ns}/modeldeployments/{name}/status"
            backoff = Backoff(base=0.1, cap=2.0)
            for attempt in range(5):
                try:
                    await self.api.merge_patch(path, {"status": status})
                    break
                except ApiError as exc:
                    if exc.status == 404:
                        return None  # deleted meanwhile
                    if exc.status == 409:
                        self.conflicts += 1
                    log.warning(
                        "event=status_write_error model=%s attempt=%d error=%r", key, attempt + 1, str(exc)
                    )
                    await asyncio.sleep(backoff.next())
            else:
                return None  # the next reconcile tries again: nothing was recorded as written
            self.writes += 1
            self._written[key] = _Written(status, model.meta.uid)
        await self._event_for(model, previous, status)
        return status

    async def _event_for(self, model: ModelDeployment, before: dict | None, after: dict) -> None:
        old, new = (before or {}).get("phase"), after.get("phase")
        reason, kind, message = None, "Normal", ""
        if new != old:
            if new == Phase.OFFLOADING.value and old not in (Phase.RELEASING.value, Phase.OUTAGE.value):
                reason, message = "OffloadingStarted", f"{after['remotePercent']:g}% to {after['remote']}"
            elif new == Phase.OUTAGE.value:
                reason, kind, message = (
                    "Outage",
                    "Warning",
                    "no ready local endpoint: all traffic to the remote",
                )
            elif new == Phase.STANDBY.value and old in (p.value for p in OFFLOADING_PHASES):
                reason, message = "OffloadingStopped", "every metric under target for the buffer duration"
            elif new == Phase.INVALID.value:
                reason, kind, message = "InvalidSpec", "Warning", "; ".join(after["errors"])
            elif new == Phase.REMOTE_DOWN.value:
                reason, kind, message = "RemoteUnavailable", "Warning", after["remote"] or "no remote"
        if reason is None:
            new_errors = [e for e in after["errors"] if e not in (before or {}).get("errors", [])]
            if new_errors:
                reason, kind, message = "Error", "Warning", new_errors[-1]
        if reason is not None:
            await self.event(model, reason, message, kind)
        refused = _refused_condition(after)
        if refused is not None and refused != _refused_condition(before or {}):
            await self.event(model, refused[0], refused[1], "Warning")  # a Policy now keeps the remote out

    async def event(self, model: ModelDeployment, reason: str, message: str, kind: str = "Normal") -> None:
        """Record an Event on the model; the same reason and message again bumps the count."""
        now = format_time(time.time())
        key = (model.meta.uid, reason, message)
        ns = model.meta.namespace
        try:
            if key in self._events:
                name, count = self._events[key]
                await self.api.merge_patch(
                    f"/api/v1/namespaces/{ns}/events/{name}", {"count": count + 1, "lastTimestamp": now}
                )
                self._events[key] = (name, count + 1)
                return
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{model.meta.name}.", "namespace": ns},
                "involvedObject": {
                    "apiVersion": MODEL_API,
                    "kind": "ModelDeployment",
                    "name": model.meta.name,
                    "namespace": ns,
                    "uid": model.meta.uid,
                },
                "reason": reason,
                "message": message[:1024],
                "type": kind,
                "source": {"component": self.component},
                "reportingComponent": self.component,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            }
            created = await self.api.create(f"/api/v1/namespaces/{ns}/events", body)
            self._events[key] = ((created.get("metadata") or {}).get("name", ""), 1)
            if len(self._events) > 10_000:
                self._events.pop(next(iter(self._events)))
        except ApiError as exc:
            log.warning("event=event_write_error model=%s reason=%s error=%r", model.key, reason, str(exc))

    async def drain(self) -> None:
        """Wait for the writes in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _refused_condition(status: dict) -> tuple[str, str] | None:
    """The reason and message of a False `RemoteAllowed` condition, or None."""
    for c in status.get("conditions") or []:
        if c.get("type") == "RemoteAllowed" and c.get("status") == "False":
            return c.get("reason", ""), c.get("message", "")
    return None


def _from_cluster(model: ModelDeployment) -> dict | None:
    return model.raw_status or None


def _visible(status: dict) -> dict:
    """What a user would see change: everything but the condition times."""
    return dict(
        status,
        conditions=[{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status["conditions"]],
    )


def _with_condition_times(desired: dict, previous: dict | None) -> dict:
    """Keep a condition's lastTransitionTime while its status stays; stamp it when it changes."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    now = format_time(time.time())
    conditions = []
    for c in desired["conditions"]:
        old = before.get(c["type"])
        same = old is not None and old.get("status") == c["status"] and old.get("lastTransitionTime")
        conditions.append(dict(c, lastTransitionTime=old["lastTransitionTime"] if same else now))
    return dict(desired, conditions=conditions)


def _remote_reason(status: ModelStatus) -> str:
    if status.remote is None:
        return "NoRemote"
    if status.remote_credentials:  # its Secret or key is missing: no traffic until it can be read
        return "CredentialsUnreadable"
    return "Reachable" if status.remote_usable else "Unreachable"
