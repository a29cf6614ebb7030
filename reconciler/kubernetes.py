"""The Kubernetes source: ModelDeployments and what they point at, from the API server.

One reflector per kind (and namespace, when `--namespace` narrows the watch) lists, then
watches from the list's resourceVersion with bookmarks on; a watch that ends resumes from
the last resourceVersion seen, a 410 Gone lists again (the relist replaces what that
reflector holds, so deletions missed meanwhile are caught), and errors back off with
jitter. It feeds the same object store as the directory source. Services, EndpointSlices,
workloads and Secrets are kept only while a ModelDeployment refers to them; one that becomes
referred to later is fetched at once, so a large cluster costs memory in proportion to
its models, not to everything it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.crd import MODEL_API, POLICY_API, ObjectKey
from reconciler.credentials import secret_keys
from reconciler.documents import Rejected, parse_object
from reconciler.kube import SERVICE_NAME_LABEL
from reconciler.kubeapi import ApiError, Backoff, Gone, KubeApi
from reconciler.store import ObjectStore

log = logging.getLogger("overspill.kubernetes")


@dataclass(frozen=True)
class Kind:
    """A watched kind: where it lives in the API and how its objects are named in documents."""

    kind: str
    api_version: str
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"
        return f"{path}/{name}" if name else path


MODELS = Kind("ModelDeployment", MODEL_API, "modeldeployments")
POLICIES = Kind("Policy", POLICY_API, "policies")
SERVICES = Kind("Service", "v1", "services")
SLICES = Kind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
DEPLOYMENTS = Kind("Deployment", "apps/v1", "deployments")
STATEFULSETS = Kind("StatefulSet", "apps/v1", "statefulsets")
SECRETS = Kind("Secret", "v1", "secrets")
KINDS = (MODELS, POLICIES, SERVICES, SLICES, DEPLOYMENTS, STATEFULSETS, SECRETS)
WORKLOADS = {k.kind: k for k in (DEPLOYMENTS, STATEFULSETS)}


@dataclass
class Interest:
    """What the ModelDeployments refer to: the only dependents worth keeping."""

    services: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name)
    workloads: set[tuple[str, str, str]] = field(default_factory=set)  # (kind, namespace, name)
    secrets: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name): remotes' credentials

    def wants(self, kind: str, obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace") or "default", meta.get("name") or ""
        if kind == "Service":
            return (ns, name) in self.services
        if kind == "EndpointSlice":
            return (ns, (meta.get("labels") or {}).get(SERVICE_NAME_LABEL, "")) in self.services
        if kind in WORKLOADS:
            return (kind, ns, name) in self.workloads
        if kind == "Secret":
            return (ns, name) in self.secrets
        return True


class KubernetesSource:
    def __init__(
        self,
        store: ObjectStore,
        api: KubeApi,
        namespaces: list[str] | None = None,
        watch_timeout: int = 300,
    ):
        self.store = store
        self.api = api
        self.namespaces = sorted(set(namespaces)) if namespaces else None
        self.watch_timeout = watch_timeout
        self.interest = Interest()
        # Whether a change to a ModelDeployment's status alone wakes the decisions: a follower
        # must act on the leader's writes; the leader need not act on its own (set by the app).
        self.status_changes_wake = True
        self.synced = asyncio.Event()  # every reflector has listed once
        self._listed: set[str] = set()
        self._models_listed = asyncio.Event()
        self._fetches: set[asyncio.Task] = set()

    def origin(self, kind: str, namespace: str | None) -> str:
        return f"kubernetes/{kind}/{namespace if self.namespaces else '*'}"

    async def run(self) -> None:
        """ModelDeployments first: what they refer to decides which dependents the other lists keep."""
        scopes = self.namespaces or [None]
        async with asyncio.TaskGroup() as tg:
            for ns in scopes:
                tg.create_task(self._reflect(MODELS, ns))
            await self._models_listed.wait()
            for kind in KINDS[1:]:
                for ns in scopes:
                    tg.create_task(self._reflect(kind, ns))

    # --- one reflector: list, watch, resume, relist ---

    async def _reflect(self, kind: Kind, namespace: str | None) -> None:
        origin = self.origin(kind.kind, namespace)
        backoff = Backoff()
        while True:
            try:
                items, rv = await self.api.list(kind.path(namespace))
                self._on_list(kind, origin, items)
                log.info(
                    "event=listed kind=%s namespace=%s objects=%d rv=%s",
                    kind.kind,
                    namespace or "*",
                    len(items),
                    rv,
                )
                backoff.reset()
                while True:  # each watch ends after its timeout; resume from the last version seen
                    rv = await self._watch(kind, origin, namespace, rv)
            except Gone:
                log.info(
                    "event=watch_expired kind=%s namespace=%s action=relist", kind.kind, namespace or "*"
                )
            except ApiError as exc:
                delay = backoff.next()
                hint = ""
                if exc.status == 404 and kind in (MODELS, POLICIES):
                    hint = "the CRD is not installed: kubectl apply -k manifests/crds"
                elif exc.status in (401, 403):
                    hint = "the service account lacks RBAC for it: see manifests/install/base/rbac.yaml"
                log.warning(
                    "event=watch_error kind=%s namespace=%s error=%r retry_in=%.1fs%s",
                    kind.kind,
                    namespace or "*",
                    str(exc),
                    delay,
                    f" hint={hint!r}" if hint else "",
                )
                await asyncio.sleep(delay)

    async def _watch(self, kind: Kind, origin: str, namespace: str | None, rv: str) -> str:
        events = self.api.watch(kind.path(namespace), rv, timeout_seconds=self.watch_timeout)
        async for event in events:
            obj = event.get("object") or {}
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self._on_event(kind, origin, event["type"], obj)
        return rv

    # --- into the store ---

    def _parse(self, kind: Kind, origin: str, raw: dict) -> tuple[Any | None, Rejected | None]:
        doc = dict(raw, apiVersion=kind.api_version, kind=kind.kind)  # list items carry neither
        return parse_object(doc, origin)

    def _on_list(self, kind: Kind, origin: str, items: list[dict]) -> None:
        objects, rejected = [], []
        for raw in items:
            if not self.interest.wants(kind.kind, raw):
                continue
            obj, rejection = self._parse(kind, origin, raw)
            if obj is not None:
                objects.append(obj)
            if rejection is not None:
                rejected.append(rejection)
        self.store.replace_origin(origin, objects, rejected)
        if kind is MODELS:
            self._refresh_interest()
        self._listed.add(origin)
        scopes = self.namespaces or [None]
        if all(self.origin(MODELS.kind, ns) in self._listed for ns in scopes):
            self._models_listed.set()
        if len(self._listed) == len(KINDS) * len(scopes):
            self.synced.set()

    def _on_event(self, kind: Kind, origin: str, type_: str, raw: dict) -> None:
        meta = raw.get("metadata") or {}
        key = ObjectKey(kind.kind, meta.get("namespace") or "default", meta.get("name") or "")
        before = _references(self.store.get(key)) if kind is MODELS else None
        if type_ == "DELETED" or not self.interest.wants(kind.kind, raw):
            if self.store.get(key) is not None or type_ == "DELETED":
                self.store.update(origin, deletes=[key])
        else:
            obj, rejection = self._parse(kind, origin, raw)
            held = self.store.get(key) if kind is MODELS else None
            quiet = (
                not self.status_changes_wake
                and obj is not None
                and held is not None
                and _same_but_status(obj, held)
            )
            self.store.update(
                origin, [obj] if obj else [], rejected=[rejection] if rejection else [], quiet=quiet
            )
        if kind is MODELS and _references(self.store.get(key)) != before:
            self._refresh_interest()  # a status write (most events) changes no reference

    def _refresh_interest(self) -> None:
        """Recompute what the models refer to; fetch what is new, drop what nobody needs any more."""
        new = Interest()
        for m in self.store.models():
            new.services.add((m.service.namespace, m.service.name))
            if m.source is not None and m.source.kind in WORKLOADS:
                new.workloads.add((m.source.kind, m.source.namespace, m.source.name))
            new.secrets.update((k.namespace, k.name) for k in secret_keys(m.meta.namespace, _remotes(m)))
        old, self.interest = self.interest, new
        # Before a kind's first list, that list brings what is wanted: fetching would double it.
        for ns, name in new.services - old.services:
            if self.origin("EndpointSlice", ns) in self._listed or self.origin("Service", ns) in self._listed:
                self._spawn(self._fetch_service(ns, name))
        for kind, ns, name in new.workloads - old.workloads:
            if self.origin(kind, ns) in self._listed:
                self._spawn(self._fetch_workload(WORKLOADS[kind], ns, name))
        for ns, name in new.secrets - old.secrets:
            if self.origin("Secret", ns) in self._listed:
                self._spawn(
                    self._fetch(SECRETS, ns, lambda ns=ns, name=name: self._get_one(SECRETS, ns, name))
                )
        for ns, name in old.secrets - new.secrets:  # a Secret nobody refers to is not kept
            self.store.update(self.origin("Secret", ns), deletes=[ObjectKey("Secret", ns, name)])
        for ns, name in old.services - new.services:
            self.store.update(self.origin("Service", ns), deletes=[ObjectKey("Service", ns, name)])
            slices = [s.key for s in self.store.endpoint_slices(ns, name)]
            if slices:
                self.store.update(self.origin("EndpointSlice", ns), deletes=slices)
        for kind, ns, name in old.workloads - new.workloads:
            self.store.update(self.origin(kind, ns), deletes=[ObjectKey(kind, ns, name)])

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch_service(self, ns: str, name: str) -> None:
        await self._fetch(SERVICES, ns, lambda: self._get_one(SERVICES, ns, name))
        await self._fetch(
            SLICES,
            ns,
            lambda: self._list_some(SLICES, ns, {"labelSelector": f"{SERVICE_NAME_LABEL}={name}"}),
        )

    async def _fetch_workload(self, kind: Kind, ns: str, name: str) -> None:
        await self._fetch(kind, ns, lambda: self._get_one(kind, ns, name))

    async def _get_one(self, kind: Kind, ns: str, name: str) -> list[dict]:
        try:
            return [await self.api.get(kind.path(ns, name))]
        except ApiError as exc:
            if exc.status == 404:
                return []
            raise

    async def _list_some(self, kind: Kind, ns: str, params: dict) -> list[dict]:
        items, _ = await self.api.list(kind.path(ns), params)
        return items

    async def _fetch(self, kind: Kind, ns: str, get: Callable) -> None:
        """A dependent a model now refers to: fetched once, then kept current by the watch."""
        backoff = Backoff()
        for _ in range(5):
            try:
                items = await get()
                break
            except ApiError as exc:
                log.warning("event=fetch_error kind=%s namespace=%s error=%r", kind.kind, ns, str(exc))
                await asyncio.sleep(backoff.next())
        else:
            return  # the next relist brings it
        origin = self.origin(kind.kind, ns)
        for raw in items:
            if not self.interest.wants(kind.kind, raw):
                continue  # no longer referred to by the time it came
            obj, rejection = self._parse(kind, origin, raw)
            held = self.store.get(obj.key) if obj is not None else None
            if held is not None and _older(obj.meta.resource_version, held.meta.resource_version):
                continue  # the watch brought a newer version meanwhile
            self.store.update(origin, [obj] if obj else [], rejected=[rejection] if rejection else [])


def _same_but_status(new, old) -> bool:
    """Whether a ModelDeployment changed only in status (and so in resourceVersion)."""
    meta = dataclasses.replace(new.meta, resource_version=old.meta.resource_version)
    return dataclasses.replace(new, meta=meta, observed=old.observed) == old


def _remotes(model) -> tuple:
    return model.offloading.remotes if model.offloading is not None else ()


def _references(model) -> tuple | None:
    """What of a ModelDeployment decides which dependents are kept."""
    if model is None:
        return None
    source = model.source
    return (model.service.namespace, model.service.name, source.kind if source else None,
            source.namespace if source else None, source.name if source else None,
            secret_keys(model.meta.namespace, _remotes(model)))  # fmt: skip


def _older(a: str, b: str) -> bool:
    return a.isdigit() and b.isdigit() and int(a) < int(b)
