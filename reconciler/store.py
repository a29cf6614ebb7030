"""The object store: the one place the sources write and the decisions read.

Sources write per origin: a file replaces everything it held (`replace_origin`); a
Kubernetes watch changes objects one at a time (`update`). The store keeps the last valid
version of an object whose new version is invalid, so a bad edit never takes a serving
model down, and it remembers why the edit was rejected. Lookups the decisions make per
model (a Service, its EndpointSlices, a workload) are indexed, so a reconcile costs the
same per model whatever the number of models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from api.crd import ModelDeployment, ObjectKey, Policy
from reconciler.documents import Rejected
from reconciler.kube import EndpointSlice, Service, Workload


class ObjectStore:
    """Objects by key, rejected documents by origin, and a revision that bumps on every change."""

    def __init__(self) -> None:
        self._objects: dict[ObjectKey, Any] = {}
        # Each origin's own objects; when two hold one key, the origin written last wins.
        self._by_origin: dict[str, dict[ObjectKey, Any]] = {}
        self._holders: dict[ObjectKey, set[str]] = {}
        self._written: dict[str, int] = {}
        self._rejected: dict[str, list[Rejected]] = {}
        self._rejected_by_key: dict[ObjectKey, set[Rejected]] = {}  # what a model's status shows
        self._slices: dict[tuple[str, str], dict[ObjectKey, EndpointSlice]] = {}  # (ns, service) -> slices
        self.revision = 0
        self._changed = asyncio.Event()
        # Keys whose object or rejection changed since the decisions last took them: what to
        # decide again. An EndpointSlice change also names its Service, which models refer to.
        self._dirty: set[ObjectKey] = set()

    # --- writing (sources) ---

    def replace_origin(self, origin: str, objects: Iterable[Any], rejected: Iterable[Rejected] = ()) -> None:
        """Make `origin` hold exactly `objects`, except where a rejected document stands in for one.

        An object whose new document was rejected keeps its last valid version; when the
        whole origin is unreadable (no keys at all), everything it held stays.
        """
        rejected = list(rejected)
        new = {o.key: o for o in objects}
        old = self._by_origin.get(origin, {})
        keep = {r.key for r in rejected if r.key is not None}
        if any(r.key is None for r in rejected) and not new:
            keep = set(old)
        held = {k: v for k, v in old.items() if k in keep and k not in new} | new
        self._hold(origin, held, old.keys() - held.keys())
        self._set_rejected(origin, rejected)
        self._bump()

    def update(
        self,
        origin: str,
        upserts: Iterable[Any] = (),
        deletes: Iterable[ObjectKey] = (),
        rejected: Iterable[Rejected] = (),
        quiet: bool = False,
    ) -> None:
        """Change some of `origin`'s objects: a watch's events. A rejected new version keeps the old one.

        `quiet` stores the change without waking the decisions (a change they need not act on)."""
        upserts, deletes, rejected = list(upserts), set(deletes), list(rejected)
        touched = {o.key for o in upserts} | deletes | {r.key for r in rejected}
        held = self._by_origin.setdefault(origin, {})  # changed in place: O(change), not O(origin)
        self._written[origin] = self.revision
        dirty = set(self._dirty) if quiet else None
        for key in deletes:
            if held.pop(key, None) is not None:
                self._drop_holder(origin, key)
        for obj in upserts:
            if held.get(obj.key) is not obj:
                held[obj.key] = obj
                self._holders.setdefault(obj.key, set()).add(origin)
                self._resolve(obj.key, prefer=origin)
        standing = [r for r in self._rejected.get(origin, ()) if r.key not in touched] + rejected
        self._set_rejected(origin, standing)
        if dirty is not None:
            self._dirty = dirty  # nothing the decisions need to see again
            self.revision += 1
        else:
            self._bump()

    def remove_origin(self, origin: str) -> None:
        old = self._by_origin.get(origin, {})
        self._hold(origin, {}, set(old))
        del self._by_origin[origin]
        self._written.pop(origin, None)
        self._set_rejected(origin, [])
        self._bump()

    def _set_rejected(self, origin: str, rejected: list[Rejected]) -> None:
        old = set(self._rejected.get(origin, ()))
        for r in old.symmetric_difference(rejected):
            if r.key is not None:
                self._dirty.add(r.key)
        for r in old:
            if r.key is not None:
                self._rejected_by_key[r.key].discard(r)
                if not self._rejected_by_key[r.key]:
                    del self._rejected_by_key[r.key]
        for r in rejected:
            if r.key is not None:
                self._rejected_by_key.setdefault(r.key, set()).add(r)
        if rejected:
            self._rejected[origin] = rejected
        else:
            self._rejected.pop(origin, None)

    def _hold(self, origin: str, held: dict[ObjectKey, Any], dropped: Iterable[ObjectKey]) -> None:
        old = self._by_origin.get(origin, {})
        self._by_origin[origin] = held
        self._written[origin] = self.revision
        for key in dropped:
            self._drop_holder(origin, key)
        for key, obj in held.items():
            if old.get(key) is obj:
                continue
            self._holders.setdefault(key, set()).add(origin)
            self._resolve(key, prefer=origin)

    def _drop_holder(self, origin: str, key: ObjectKey) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(origin)
            if not holders:
                del self._holders[key]
        self._resolve(key)

    def _resolve(self, key: ObjectKey, prefer: str | None = None) -> None:
        holders = self._holders.get(key)
        previous = self._objects.get(key)
        if not holders:
            current = None
        else:
            winner = prefer if prefer in holders else max(holders, key=lambda o: self._written[o])
            current = self._by_origin[winner][key]
        if previous is current:
            return
        self._dirty.add(key)
        for obj in (previous, current):
            if isinstance(obj, EndpointSlice):
                self._dirty.add(ObjectKey("Service", obj.meta.namespace, obj.service_name))
        if isinstance(previous, EndpointSlice):
            self._slices.get((previous.meta.namespace, previous.service_name), {}).pop(key, None)
        if current is None:
            self._objects.pop(key, None)
            return
        self._objects[key] = current
        if isinstance(current, EndpointSlice):
            self._slices.setdefault((current.meta.namespace, current.service_name), {})[key] = current

    def _bump(self) -> None:
        self.revision += 1
        self._changed.set()

    def take_changes(self) -> set[ObjectKey]:
        """The keys changed since the last call (see `_dirty`)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    async def wait_changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    # --- reading (decisions) ---

    def get(self, key: ObjectKey) -> Any | None:
        return self._objects.get(key)

    def models(self) -> list[ModelDeployment]:
        return sorted(
            (o for o in self._objects.values() if isinstance(o, ModelDeployment)), key=lambda m: m.key
        )

    def policies(self) -> list[Policy]:
        return [o for o in self._objects.values() if isinstance(o, Policy)]

    def service(self, namespace: str, name: str) -> Service | None:
        return self._objects.get(ObjectKey("Service", namespace, name))

    def workload(self, kind: str, namespace: str, name: str) -> Workload | None:
        return self._objects.get(ObjectKey(kind, namespace, name))

    def endpoint_slices(self, namespace: str, service_name: str) -> list[EndpointSlice]:
        return list(self._slices.get((namespace, service_name), {}).values())

    def rejected(self) -> list[Rejected]:
        return [r for items in self._rejected.values() for r in items]

    def rejected_by_origin(self) -> dict[str, int]:
        """Rejected documents per origin, 0 for origins that loaded cleanly."""
        return {origin: len(self._rejected.get(origin, ())) for origin in self._by_origin}

    def rejected_for(self, key: ObjectKey) -> list[Rejected]:
        return sorted(self._rejected_by_key.get(key, ()), key=lambda r: (r.origin, r.errors))
