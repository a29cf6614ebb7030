"""One scope's view of the resources: what a group of nodes with the same scope is served.

A view stores the resources per type, a version per type that moves only when its
content does, a short log of which names changed at which version (so a stream sends
only what changed), and the clusters it recently dropped (so a node still routing to one
keeps it until its new routes are in: make-before-break). Streams read it through the
methods below; only `ResourceCache` changes it.

Each model has its own route configuration; a routing scope per Host name (without port)
names it. The reconciler gives each Host name to one model, but a bare `svc` and a port-qualified
`svc:8080` may still go to two models: a scope has one key, so the first model by
namespace/name keeps the scope (as the reconciler keeps contested names) and the other's
Host with that name is answered 404.

Route configurations come in two forms: the one RTDS nodes get (the remote share comes in the
weight layers, so a weight change is no route change), and, for nodes that do not take those
layers, one with the current share written in (`ROUTE_WEIGHT_INLINE`: its own resources and
log, built for every model the first time such a node is served, then kept up to date).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from api.desired import ModelKey, model_of
from xds import runtime, wire
from xds.bundle import ModelBundle, Resource
from xds.scope import Scope
from xds.types import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    ROUTE_WEIGHT_INLINE,
    RUNTIME,
    SCOPED_ROUTE,
    SECRET,
)

LOG_LENGTH = 256  # changes a stream may lag behind before it gets a full comparison
RETIRE_SECONDS = 300.0  # how long a dropped cluster stays available to nodes that still route to it
ROUTE_FORMS = (ROUTE, ROUTE_WEIGHT_INLINE)
VIEW_TYPES = (*PUSH_ORDER, ROUTE_WEIGHT_INLINE)


@dataclass(frozen=True)
class RouteNeeds:
    """The versions of clusters, endpoints and weights a node must have answered before it may
    take the route configurations changed up to now (which clusters each one uses: `route_uses`)."""

    cluster_version: int = 0
    endpoint_version: int = 0
    runtime_version: int = 0


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

    def __init__(self, scope: Scope, listener: Resource, shards: int):
        self.scope = scope
        self.shards = shards
        self.resources: dict[str, dict[str, Resource]] = {t: {} for t in VIEW_TYPES}
        self._log = {t: ChangeLog() for t in VIEW_TYPES}
        self._bundles: dict[ModelKey, ModelBundle] = {}
        self._retired: dict[str, dict[str, tuple[Resource, float]]] = {CLUSTER: {}, ENDPOINT: {}}
        # A retired cluster -> ({route form: the version from which its model's routes no longer
        # use it}, whether the model itself went): what a stream needs to know whether its node's
        # routes may still use it, without keeping per node what each route configuration uses.
        self._dropped: dict[str, tuple[dict[str, int], bool]] = {}
        self.applied = 0  # bumps on every apply (retired clusters change or expire then)
        self._claims: dict[str, set[ModelKey]] = {}  # Host name -> the models with a scope for it
        self._shard_names = runtime.layer_names(shards)
        self._shard_entries: list[dict[str, bytes]] = [{} for _ in range(shards)]
        self.route_needs = {form: RouteNeeds() for form in ROUTE_FORMS}  # per route form
        self.weight_inline = False  # whether the ROUTE_WEIGHT_INLINE form is kept (see `keep_weight_inline`)
        self._sizes: dict[str, tuple[int, int]] = {}  # type -> (version, bytes of all its resources)
        # Weight changes, for the decision -> ACK histogram: (RUNTIME version, ROUTE_WEIGHT_INLINE
        # version or 0 when that form is not kept, {when decided (monotonic): models}), oldest first.
        self._weights: deque[tuple[int, int, Counter[float]]] = deque(maxlen=LOG_LENGTH)
        self.resources[LISTENER][listener.name] = listener
        for i in range(shards):
            self._rebuild_shard(i)
        for log in self._log.values():
            log.version = 1  # the initial content; nothing in the log, so a new node gets it all

    # --- reading (streams) ---

    @property
    def version(self) -> dict[str, int]:
        return {t: log.version for t, log in self._log.items()}

    def version_of(self, type_url: str) -> int:
        return self._log[type_url].version

    def size_of(self, type_url: str) -> int:
        """Bytes of every resource of a type: about what a node's first response of it weighs."""
        version = self.version_of(type_url)
        found = self._sizes.get(type_url)
        if found is None or found[0] != version:
            size = sum(len(r.any) for r in self.resources[type_url].values())
            found = self._sizes[type_url] = (version, size)
        return found[1]

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

    @property
    def layer_names(self) -> list[str]:
        return self._shard_names

    def dropped(self, cluster: str, form: str = ROUTE) -> tuple[int, bool] | None:
        """For a retired cluster: the version of route `form` from which no route uses it, and
        whether its model went (then the model's last routes use it while a node holds them)."""
        found = self._dropped.get(cluster)
        return (found[0].get(form, 0), found[1]) if found is not None else None

    def models(self) -> Collection[ModelKey]:
        return self._bundles.keys()

    def owner(self, type_url: str, name: str) -> ModelKey | None:
        """The model a resource of this view belongs to (a scope: the model it routes to)."""
        if type_url == SCOPED_ROUTE:
            claims = self._claims.get(name)
            return min(claims) if claims else None
        return model_of(name)

    def route_uses(self, name: str) -> tuple[frozenset[str], frozenset[str]]:
        """The clusters and the endpoint sets the current route configuration `name` routes to."""
        key = model_of(name)
        bundle = self._bundles.get(key) if key is not None else None
        if bundle is None:
            return frozenset(), frozenset()
        return frozenset(c.name for c in bundle.clusters), frozenset((bundle.endpoints.name,))

    # --- writing (the cache) ---

    def weights_taken(self, type_url: str, after: int, upto: int) -> tuple[tuple[float, int], ...]:
        """The weight decisions a node took by answering versions `after` (exclusive) to `upto` of
        `type_url` (RUNTIME, or ROUTE_WEIGHT_INLINE): (when decided, how many models)."""
        column = {RUNTIME: 0, ROUTE_WEIGHT_INLINE: 1}.get(type_url)
        if column is None or after <= 0:  # a first sync carries no decision of its own
            return ()
        found: Counter[float] = Counter()
        for entry in reversed(self._weights):
            version = entry[column]
            if not version:
                continue
            if version <= after:
                break
            if version <= upto:
                found.update(entry[2])
        return tuple(found.items())

    def apply(
        self, changes: dict[ModelKey, ModelBundle | None], decided: Mapping[ModelKey, float] | None = None
    ) -> None:
        """Replace the bundles in `changes` (None removes a model) and bump what changed;
        `decided` says when the models' weights in `changes` were decided, for `weights_taken`."""
        touched: dict[str, set[str]] = {t: set() for t in PUSH_ORDER}
        weights: Counter[float] = Counter()
        shards: set[int] = set()
        hosts: set[str] = set()
        dropped: list[tuple[str, bool]] = []
        now = time.monotonic()
        self.applied += 1
        touched[ROUTE_WEIGHT_INLINE] = set()
        for key, new in changes.items():
            if new is not None and not self.scope.admits(new):
                new = None
            old = self._bundles.get(key)
            if old is new:
                continue
            for type_url, old_res, new_res in (
                (SECRET, old.secrets if old else (), new.secrets if new else ()),
                (CLUSTER, old.clusters if old else (), new.clusters if new else ()),
                (ENDPOINT, (old.endpoints,) if old else (), (new.endpoints,) if new else ()),
                (ROUTE, (old.routes,) if old else (), (new.routes,) if new else ()),
            ):
                self._replace(type_url, old_res, new_res, touched[type_url], now)
            if self.weight_inline:
                old_res = (old.routes_weight_inline(),) if old else ()
                new_res = (new.routes_weight_inline(),) if new else ()
                self._replace(ROUTE_WEIGHT_INLINE, old_res, new_res, touched[ROUTE_WEIGHT_INLINE], now)
            if old is not None:
                kept = {c.name for c in new.clusters} if new is not None else set()
                dropped += [(c.name, new is None) for c in old.clusters if c.name not in kept]
            old_hosts = {r.name for r in old.scopes} if old else set()
            new_hosts = {r.name for r in new.scopes} if new else set()
            for host in old_hosts - new_hosts:
                self._claims[host].discard(key)
            for host in new_hosts:
                self._claims.setdefault(host, set()).add(key)
            hosts |= old_hosts | new_hosts
            if old is not None and (new is None or new.runtime_key != old.runtime_key):
                i = runtime.shard_of(old.runtime_key, self.shards)
                self._shard_entries[i].pop(old.runtime_key, None)
                shards.add(i)
            if new is not None and (old is None or new.runtime_entry != old.runtime_entry):
                if old is not None and decided is not None and key in decided:
                    weights[decided[key]] += 1
                i = runtime.shard_of(new.runtime_key, self.shards)
                if new.runtime_entry:
                    self._shard_entries[i][new.runtime_key] = new.runtime_entry
                else:  # not offloading: no key, the route's default applies
                    self._shard_entries[i].pop(new.runtime_key, None)
                shards.add(i)
            if new is None:
                del self._bundles[key]
            else:
                self._bundles[key] = new
        for host in hosts:  # once every bundle is in: the owner of a scope may have changed
            self._rescope(host, touched[SCOPED_ROUTE])
        for i in shards:
            self._rebuild_shard(i)
            touched[RUNTIME].add(self._shard_names[i])
        for type_url in (SECRET, CLUSTER, ENDPOINT, RUNTIME, SCOPED_ROUTE):
            self._log[type_url].bump(touched[type_url])
        for form in ROUTE_FORMS:
            if touched[form]:
                self._log[form].bump(touched[form])
                self.route_needs[form] = RouteNeeds(
                    cluster_version=self._log[CLUSTER].version,
                    endpoint_version=self._log[ENDPOINT].version,
                    # Routes with the weight written in need no layer.
                    runtime_version=self._log[RUNTIME].version if form == ROUTE else 0,
                )
        if weights:
            inline = self._log[ROUTE_WEIGHT_INLINE].version if self.weight_inline else 0
            self._weights.append((self._log[RUNTIME].version, inline, weights))
        for name, model_went in dropped:
            if name in self._retired[CLUSTER]:
                self._dropped[name] = ({f: self._log[f].version for f in ROUTE_FORMS}, model_went)
        self._expire_retired(now)

    def keep_weight_inline(self) -> None:
        """From now on keep the route configurations with the weights written in as well: a
        node without the weight layers is served. Builds them for every model once."""
        if self.weight_inline:
            return
        self.weight_inline = True
        current = self.resources[ROUTE_WEIGHT_INLINE]
        for bundle in self._bundles.values():
            routes = bundle.routes_weight_inline()
            current[routes.name] = routes
        self._log[ROUTE_WEIGHT_INLINE].bump(current)
        self.route_needs[ROUTE_WEIGHT_INLINE] = replace(self.route_needs[ROUTE], runtime_version=0)

    def _rescope(self, host: str, touched: set[str]) -> None:
        """The scope of `host` routes to the first model by namespace/name that has it, if any."""
        current = self.resources[SCOPED_ROUTE]
        claims = self._claims.get(host)
        if not claims:
            self._claims.pop(host, None)
            if current.pop(host, None) is not None:
                touched.add(host)
            return
        scope = next(r for r in self._bundles[min(claims)].scopes if r.name == host)
        held = current.get(host)
        if held is None or held.version != scope.version:
            current[host] = scope
            touched.add(host)

    def _replace(
        self,
        type_url: str,
        old: tuple[Resource, ...],
        new: tuple[Resource, ...],
        touched: set[str],
        now: float,
    ) -> None:
        current = self.resources[type_url]
        retired = self._retired.get(type_url)
        new_names = {r.name for r in new}
        for r in old:
            if r.name not in new_names and current.pop(r.name, None) is not None:
                if retired is not None:
                    retired[r.name] = (r, now)
                touched.add(r.name)
        for r in new:
            held = current.get(r.name)
            if held is None or held.version != r.version:  # the same content is not news
                current[r.name] = r
                if retired is not None:
                    retired.pop(r.name, None)
                    self._dropped.pop(r.name, None)
                touched.add(r.name)

    def _rebuild_shard(self, i: int) -> None:
        name = self._shard_names[i]
        self.resources[RUNTIME][name] = Resource.of(
            RUNTIME, name, wire.runtime(name, self._shard_entries[i].values())
        )

    def _expire_retired(self, now: float) -> None:
        for retired in self._retired.values():
            for name in [n for n, (_, at) in retired.items() if now - at > RETIRE_SECONDS]:
                del retired[name]
                self._dropped.pop(name, None)
