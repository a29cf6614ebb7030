"""The object store: the one place the sources write and the decisions read.

Sources replace what they know per origin (a file, or a Kubernetes watch); the store keeps
the last valid version of an object whose new version is invalid, so a bad edit never
takes a serving model down, and it remembers why the edit was rejected.
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
        self._written: dict[str, int] = {}
        self._rejected: dict[str, list[Rejected]] = {}
        self.revision = 0
        self._changed = asyncio.Event()

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
        self._by_origin[origin] = held
        self._written[origin] = self.revision
        self._resolve(old.keys() | held.keys(), prefer=origin)
        if rejected:
            self._rejected[origin] = rejected
        else:
            self._rejected.pop(origin, None)
        self._bump()

    def remove_origin(self, origin: str) -> None:
        old = self._by_origin.pop(origin, {})
        self._written.pop(origin, None)
        self._resolve(old.keys())
        self._rejected.pop(origin, None)
        self._bump()

    def _resolve(self, keys: Iterable[ObjectKey], prefer: str | None = None) -> None:
        for key in keys:
            holders = [o for o, objs in self._by_origin.items() if key in objs]
            if not holders:
                self._objects.pop(key, None)
                continue
            winner = prefer if prefer in holders else max(holders, key=lambda o: self._written[o])
            self._objects[key] = self._by_origin[winner][key]

    def _bump(self) -> None:
        self.revision += 1
        self._changed.set()

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
        return [
            o
            for o in self._objects.values()
            if isinstance(o, EndpointSlice)
            and o.meta.namespace == namespace
            and o.service_name == service_name
        ]

    def rejected(self) -> list[Rejected]:
        return [r for items in self._rejected.values() for r in items]

    def rejected_by_origin(self) -> dict[str, int]:
        """Rejected documents per origin, 0 for origins that loaded cleanly."""
        return {origin: len(self._rejected.get(origin, ())) for origin in self._by_origin}

    def rejected_for(self, key: ObjectKey) -> list[Rejected]:
        return [r for r in self.rejected() if r.key == key]
