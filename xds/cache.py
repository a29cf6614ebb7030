"""The versioned resource cache: per-model bundles in, per-scope views out.

Like go-control-plane's snapshot cache, but incremental: a change replaces one model's
bundle, and each view (the resources one scope of nodes sees) updates only the resources
that bundle touches. A view keeps a version per type that moves only when its content does,
a short log of which names changed at which version (so Delta streams send only what
changed), and the clusters it recently dropped (so a node still routing to one keeps it
until its new routes are in: make-before-break).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xds import runtime, wire
from xds.resources import ROUTE_CONFIG_NAME
from xds.types import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, RUNTIME

ModelKey = tuple[str, str]
LOG_LENGTH = 256  # changes a Delta stream may lag behind before it gets a full comparison
RETIRE_SECONDS = 300.0  # how long a dropped cluster stays available to nodes that still route to it


@dataclass(frozen=True)
class Resource:
    """One named resource, serialized once: its Any envelope, its Delta envelope, a content version."""

    name: str
    version: str
    any: bytes
    delta: bytes

    @classmethod
    def of(cls, type_url: str, name: str, body: bytes) -> Resource:
        version = hashlib.blake2b(body, digest_size=8).hexdigest()
        any_body = wire.any_bytes(type_url, body)
        return cls(name, version, any_body, wire.delta_resource(name, version, any_body))


@dataclass(frozen=True)
class ModelBundle:
    """One model's serialized resources: the unit a change replaces in every view."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    clusters: tuple[Resource, ...]
    endpoints: Resource
    vhost: bytes
    runtime_key: str
    runtime_entry: bytes

    @property
    def key(self) -> ModelKey:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Scope:
    """Which models a node receives, from its bootstrap `node.metadata.overspill`.

    `namespaces` (a list) and `matchLabels` (ModelDeployment labels) narrow the set; a node
    without them receives every model (an edge gateway). `listenerPort` gives the node its
    own listener port, as a sidecar beside a gateway on one host needs.
    """

    namespaces: frozenset[str] | None = None
    match_labels: tuple[tuple[str, str], ...] = ()
    listener_port: int | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> Scope:
        conf = (metadata or {}).get("overspill") or {}
        if not isinstance(conf, dict):
            return cls()
        namespaces = conf.get("namespaces")
        if isinstance(namespaces, str):
            namespaces = [n.strip() for n in namespaces.split(",") if n.strip()]
        labels = conf.get("matchLabels") or {}
        port = conf.get("listenerPort")
        return cls(
            frozenset(str(n) for n in namespaces) if namespaces else None,
            tuple(sorted((str(k), str(v)) for k, v in labels.items())) if isinstance(labels, dict) else (),
            _port(port),
        )

    def admits(self, bundle: ModelBundle) -> bool:
        if self.namespaces is not None and bundle.namespace not in self.namespaces:
            return False
        labels = dict(bundle.labels)
        return all(labels.get(k) == v for k, v in self.match_labels)

    def __str__(self) -> str:
        parts = []
        if self.namespaces is not None:
            parts.append("namespaces=" + ",".join(sorted(self.namespaces)))
        if self.match_labels:
            parts.append("labels=" + ",".join(f"{k}={v}" for k, v in self.match_labels))
        if self.listener_port:
            parts.append(f"listenerPort={self.listener_port}")
        return " ".join(parts) or "all"


def _port(value: Any) -> int | None:
    """A port from node metadata, where protobuf Struct turns every number into a float."""
    try:
        port = int(float(value))
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


@dataclass
class RouteDeps:
    """What a route configuration version needs a node to hold before it may be sent there."""

    cluster_version: int = 0
    endpoint_version: int = 0
    runtime_version: int = 0
    eds_names: frozenset[str] = frozenset()
    clusters: frozenset[str] = frozenset()


class View:
    """The resources one scope of nodes sees."""

    def __init__(self, scope: Scope, listener: Resource, fallback_vhost: bytes, shards: int):
        self.scope = scope
        self.shards = shards
        self.fallback_vhost = fallback_vhost
        self.bundles: dict[ModelKey, ModelBundle] = {}
        self.resources: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        self.version: dict[str, int] = dict.fromkeys(PUSH_ORDER, 0)
        self.log: dict[str, deque[tuple[int, frozenset[str]]]] = {
            t: deque(maxlen=LOG_LENGTH) for t in PUSH_ORDER
        }
        self.retired: dict[str, dict[str, tuple[Resource, float]]] = {CLUSTER: {}, ENDPOINT: {}}
        self.route_deps = RouteDeps()
        self.encoded: dict[tuple[str, int], bytes] = {}  # whole-set SotW bodies, shared by the view's nodes
        self._interned: dict[frozenset[str], frozenset[str]] = {}
        self._shard_names = runtime.layer_names(shards)
        self._shard_entries: list[dict[str, bytes]] = [{} for _ in range(shards)]
        self.resources[LISTENER][listener.name] = listener
        for i in range(shards):
            self._rebuild_shard(i)
        self._rebuild_routes()
        for t in PUSH_ORDER:
            self.version[t] = 1

    def apply(self, changes: dict[ModelKey, ModelBundle | None]) -> None:
        """Replace the bundles in `changes` (None removes a model) and bump what changed."""
        touched: dict[str, set[str]] = {t: set() for t in PUSH_ORDER}
        shards: set[int] = set()
        vhosts_changed = False
        now = time.monotonic()
        for key, new in changes.items():
            if new is not None and not self.scope.admits(new):
                new = None
            old = self.bundles.get(key)
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
                del self.bundles[key]
            else:
                self.bundles[key] = new
        for i in shards:
            self._rebuild_shard(i)
            touched[RUNTIME].add(self._shard_names[i])
        for type_url in (CLUSTER, ENDPOINT, RUNTIME):
            self._bump(type_url, touched[type_url])
        if vhosts_changed:
            self._rebuild_routes()
            self._bump(ROUTE, {ROUTE_CONFIG_NAME})
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
                self.retired[type_url][r.name] = (r, now)
                touched.add(r.name)
        for r in new:
            if current.get(r.name) is not r:
                current[r.name] = r
                self.retired[type_url].pop(r.name, None)
                touched.add(r.name)

    def _bump(self, type_url: str, names: set[str]) -> None:
        if names:
            self.version[type_url] += 1
            self.log[type_url].append((self.version[type_url], frozenset(names)))

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
            + b"".join(wire.field(2, self.bundles[k].vhost) for k in sorted(self.bundles))
            + wire.field(2, self.fallback_vhost)
        )
        self.resources[ROUTE][name] = Resource.of(ROUTE, name, body)
        self.route_deps = RouteDeps(
            cluster_version=self.version[CLUSTER],
            endpoint_version=self.version[ENDPOINT],
            runtime_version=self.version[RUNTIME],
            eds_names=frozenset(self.resources[ENDPOINT]),
            clusters=frozenset(self.resources[CLUSTER]),
        )

    def _expire_retired(self, now: float) -> None:
        for retired in self.retired.values():
            for name in [n for n, (_, at) in retired.items() if now - at > RETIRE_SECONDS]:
                del retired[name]

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        """One shared copy of a subscription: a thousand nodes asking for the same ten thousand
        endpoint sets hold one set between them, not a thousand."""
        if len(self._interned) > 256:
            self._interned.clear()  # old subscriptions: sharing resumes with the next ones
        return self._interned.setdefault(names, names)

    def remember(self, type_url: str, version: int, body: bytes) -> None:
        for key in [k for k in self.encoded if k[0] == type_url and k[1] != version]:
            del self.encoded[key]  # only the current version is worth keeping
        self.encoded[(type_url, version)] = body

    def changed_since(self, type_url: str, version: int) -> frozenset[str] | None:
        """Names changed after `version`, or None when the log no longer reaches back that far."""
        if version >= self.version[type_url]:
            return frozenset()
        log = self.log[type_url]
        if not log or log[0][0] > version + 1:
            return None
        names: set[str] = set()
        for v, changed in log:
            if v > version:
                names |= changed
        return frozenset(names)

    def lookup(self, type_url: str, name: str) -> Resource | None:
        """A current resource, or a recently dropped cluster or endpoint set."""
        found = self.resources[type_url].get(name)
        if found is None and type_url in self.retired:
            entry = self.retired[type_url].get(name)
            found = entry[0] if entry else None
        return found


class ResourceCache:
    """Every model's bundle, and one view per scope of connected nodes."""

    def __init__(
        self, listener: Callable[[int | None], Resource], fallback_vhost: bytes, shards: int = runtime.SHARDS
    ):
        self.listener = listener  # the listener for a port (None: the default port)
        self.fallback_vhost = fallback_vhost
        self.shards = shards
        self.bundles: dict[ModelKey, ModelBundle] = {}
        self.views: dict[Scope, View] = {}
        self._subscribers: set[asyncio.Event] = set()
        self.ready = False  # set by the first commit: no stream is answered before a complete state

    def apply(self, changes: dict[ModelKey, ModelBundle | None]) -> None:
        for key, bundle in changes.items():
            if bundle is None:
                self.bundles.pop(key, None)
            else:
                self.bundles[key] = bundle
        for view in self.views.values():
            view.apply(changes)

    def view(self, scope: Scope) -> View:
        view = self.views.get(scope)
        if view is None:
            view = View(scope, self.listener(scope.listener_port), self.fallback_vhost, self.shards)
            view.apply(dict(self.bundles))
            self.views[scope] = view
        return view

    def commit(self) -> None:
        """Wake every stream once after a batch of changes, so they see a consistent state."""
        self.ready = True
        for event in self._subscribers:
            event.set()

    def subscribe(self, event: asyncio.Event) -> None:
        self._subscribers.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)
