"""One scope's view of the resources: what a group of nodes with the same scope is served.

A view stores the resources per type, a version per type that moves only when its
content does, a short log of which names changed at which version (so a stream sends
only what changed), and the clusters it recently dropped (so a node still routing to one
keeps it until its new routes are in: make-before-break). Streams read it through the
methods below; only `ResourceCache` changes it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from api.desired import ModelKey
from xds import runtime, wire
from xds.bundle import ModelBundle, Resource
from xds.resources import ROUTE_CONFIG_NAME
from xds.scope import Scope
from xds.types import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, RUNTIME

LOG_LENGTH = 256  # changes a stream may lag behind before it gets a full comparison
RETIRE_SECONDS = 300.0  # how long a dropped cluster stays available to nodes that still route to it


@dataclass(frozen=True)
class RouteNeeds:
    """What the current route configuration needs a node to hold before it may be sent there."""

    cluster_version: int = 0
    endpoint_version: int = 0
    runtime_version: int = 0
    eds_names: frozenset[str] = frozenset()
    clusters: frozenset[str] = frozenset()


class ChangeLog:
    """Which names changed at which version, for the last `LOG_LENGTH` versions of one type."""

    def __init__(self) -> None:
        self.version = 0
        self._entries: deque[tuple[int, frozenset[str]]] = deque(maxlen=LOG_LENGTH)

    def bump(self, names: Iterable[str]) -> None:
        names = frozenset(names)
        if names:
            self.version += 1
            self._entries.append((self.version, names))

    def since(self, version: int) -> frozenset[str] | None:
        """Names changed after `version`, or None when the log no longer reaches back that far."""
        if version >= self.version:
            return frozenset()
        if not self._entries or self._entries[0][0] > version + 1:
            return None
        return frozenset().union(*(names for v, names in self._entries if v > version))


class View:
    """The resources one scope of nodes sees."""

    def __init__(self, scope: Scope, listener: Resource, fallback_vhost: bytes, shards: int):
        self.scope = scope
        self.shards = shards
        self.resources: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        self._log = {t: ChangeLog() for t in PUSH_ORDER}
        self._bundles: dict[ModelKey, ModelBundle] = {}
        self._retired: dict[str, dict[str, tuple[Resource, float]]] = {CLUSTER: {}, ENDPOINT: {}}
        self._fallback_vhost = fallback_vhost
        self._shard_names = runtime.layer_names(shards)
        self._shard_entries: list[dict[str, bytes]] = [{} for _ in range(shards)]
        self.route_needs = RouteNeeds()
        self.resources[LISTENER][listener.name] = listener
        for i in range(shards):
            self._rebuild_shard(i)
        self._rebuild_routes()
        for log in self._log.values():
            log.version = 1  # the initial content; nothing in the log, so a new node gets it all

    # --- reading (streams) ---

    @property
    def version(self) -> dict[str, int]:
        return {t: log.version for t, log in self._log.items()}

    def version_of(self, type_url: str) -> int:
        return self._log[type_url].version

    def changed_since(self, type_url: str, version: int) -> frozenset[str] | None:
        return self._log[type_url].since(version)

    def lookup(self, type_url: str, name: str) -> Resource | None:
        """A current resource, or a recently dropped cluster or endpoint set."""
        found = self.resources[type_url].get(name)
        if found is None and type_url in self._retired:
            entry = self._retired[type_url].get(name)
            found = entry[0] if entry else None
        return found

    def retired_names(self, type_url: str) -> Collection[str]:
        return self._retired.get(type_url, {}).keys()

    def models(self) -> Collection[ModelKey]:
        return self._bundles.keys()

    # --- writing (the cache) ---

    def apply(self, changes: dict[ModelKey, ModelBundle | None]) -> None:
        """Replace the bundles in `changes` (None removes a model) and bump what changed."""
        touched: dict[str, set[str]] = {t: set() for t in PUSH_ORDER}
        shards: set[int] = set()
        vhosts_changed = False
        now = time.monotonic()
        for key, new in changes.items():
            if new is not None and not self.scope.admits(new):
                new = None
            old = self._bundles.get(key)
            if old is new:
                continue
            for type_url, old_res, new_res in (
                (CLUSTER, old.clusters if old else (), new.clusters if new else ()),
                (ENDPOINT, (old.endpoints,) if old else (), (new.endpoints,) if new else ()),
            ):
                self._replace(type_url, old_res, new_res, touched[type_url], now)
            if old is not None and (new is None or new.runtime_key != old.runtime_key):
                i = runtime.shard_of(old.runtime_key, self.shards)
                self._shard_entries[i].pop(old.runtime_key, None)
                shards.add(i)
            if new is not None and (old is None or new.runtime_entry != old.runtime_entry):
                i = runtime.shard_of(new.runtime_key, self.shards)
                self._shard_entries[i][new.runtime_key] = new.runtime_entry
                shards.add(i)
            vhosts_changed |= (old.vhost if old else None) != (new.vhost if new else None)
            if new is None:
                del self._bundles[key]
            else:
                self._bundles[key] = new
        for i in shards:
            self._rebuild_shard(i)
            touched[RUNTIME].add(self._shard_names[i])
        for type_url in (CLUSTER, ENDPOINT, RUNTIME):
            self._log[type_url].bump(touched[type_url])
        if vhosts_changed:
            self._rebuild_routes()
            self._log[ROUTE].bump((ROUTE_CONFIG_NAME,))
        self._expire_retired(now)

    def _replace(
        self,
        type_url: str,
        old: tuple[Resource, ...],
        new: tuple[Resource, ...],
        touched: set[str],
        now: float,
    ) -> None:
        current = self.resources[type_url]
        new_names = {r.name for r in new}
        for r in old:
            if r.name not in new_names and current.pop(r.name, None) is not None:
                self._retired[type_url][r.name] = (r, now)
                touched.add(r.name)
        for r in new:
            if current.get(r.name) is not r:
                current[r.name] = r
                self._retired[type_url].pop(r.name, None)
                touched.add(r.name)

    def _rebuild_shard(self, i: int) -> None:
        name = self._shard_names[i]
        self.resources[RUNTIME][name] = Resource.of(
            RUNTIME, name, wire.runtime(name, self._shard_entries[i].values())
        )

    def _rebuild_routes(self) -> None:
        """The one route configuration: a byte join of the models' virtual hosts, in a stable order."""
        name = ROUTE_CONFIG_NAME
        body = (
            wire.text(1, name)
            + b"".join(wire.field(2, self._bundles[k].vhost) for k in sorted(self._bundles))
            + wire.field(2, self._fallback_vhost)
        )
        self.resources[ROUTE][name] = Resource.of(ROUTE, name, body)
        self.route_needs = RouteNeeds(
            cluster_version=self._log[CLUSTER].version,
            endpoint_version=self._log[ENDPOINT].version,
            runtime_version=self._log[RUNTIME].version,
            eds_names=frozenset(self.resources[ENDPOINT]),
            clusters=frozenset(self.resources[CLUSTER]),
        )

    def _expire_retired(self, now: float) -> None:
        for retired in self._retired.values():
            for name in [n for n, (_, at) in retired.items() if now - at > RETIRE_SECONDS]:
                del retired[name]
