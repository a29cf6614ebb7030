"""From desired state to cached resources, re-serializing only what changed.

Each model's clusters, endpoints, route configuration, routing scopes and runtime entry are
memoized on exactly the inputs they depend on, so a weight change serializes one runtime entry
and nothing else (and, only where a node without the weight layers is served, the model's
route configuration with the weight written in); the runtime layers are byte joins (see `wire`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.desired import ModelKey, ModelRoute
from xds import failover, runtime, spillover
from xds import resources as res
from xds.bundle import Deferred, ModelBundle, Resource
from xds.cache import ResourceCache
from xds.credentials import remote_credentials
from xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, SECRET


class _Memo:
    """The last (input, output) per key; a different input rebuilds."""

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[Any, Any]] = {}

    def get(self, key: Any, inputs: Any, build: Callable[[], Any]) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] != inputs:
            entry = (inputs, build())
            self._entries[key] = entry
        return entry[1]

    def drop(self, key: Any) -> None:
        self._entries.pop(key, None)


class Translator:
    """Turns `ModelRoute`s into bundles and hands the changed ones to the cache."""

    def __init__(self, listener_address: str, listener_port: int, shards: int = runtime.SHARDS):
        def listener(port: int | None) -> Resource:
            body = res.listener(listener_address, port or listener_port)
            return Resource.of(LISTENER, res.LISTENER_NAME, body)

        self.cache = ResourceCache(listener, shards, default_port=listener_port)
        self._routes: dict[ModelKey, ModelRoute] = {}
        self._bundles = _Memo()
        self._memos = {
            part: _Memo()
            for part in ("local", "remote", "endpoints", "routes", "routes_inline", "scopes", "runtime")
        }

    def publish(self, routes: list[ModelRoute]) -> int:
        """Make the cache hold exactly `routes`; returns how many models changed."""
        wanted = {(r.namespace, r.name): r for r in routes}
        changes: dict[ModelKey, ModelRoute | None] = {
            k: r for k, r in wanted.items() if self._routes.get(k) != r
        }
        changes.update(dict.fromkeys(self._routes.keys() - wanted.keys()))
        return self.apply(changes)

    def apply(self, changes: dict[ModelKey, ModelRoute | None]) -> int:
        """Change only the models named (None removes one): O(changes), whatever the number of models."""
        bundles: dict[ModelKey, ModelBundle | None] = {}
        for key, route in changes.items():
            if route is None:
                self._routes.pop(key, None)
                for memo in (self._bundles, *self._memos.values()):
                    memo.drop(key)
                bundles[key] = None
            else:
                self._routes[key] = route
                bundles[key] = self._bundles.get(key, route, lambda r=route: self._bundle(r))
        self.cache.apply(bundles)
        self.cache.commit()
        return len(changes)

    def _bundle(self, r: ModelRoute) -> ModelBundle:
        key, m = (r.namespace, r.name), self._memos
        clusters = [
            m["local"].get(
                key,
                r.local_cluster,
                lambda: Resource.of(CLUSTER, r.local_cluster, res.local_cluster(r)),
            )
        ]
        secrets: tuple[Resource, ...] = ()
        if r.remotes:
            # The remote endpoints carry what spill-over's composite reads: both on both inputs.
            remote, secrets = m["remote"].get(key, (r.remotes, r.spillover), lambda: _remote_parts(r))
            clusters.extend(remote)
        routes = m["routes"].get(
            key,
            (r.domains, r.remotes, r.spillover),
            lambda: Resource.of(ROUTE, r.route_config, res.model_route_configuration(r)),
        )
        return ModelBundle(
            namespace=r.namespace,
            name=r.name,
            labels=r.labels,
            clusters=tuple(clusters),
            endpoints=m["endpoints"].get(
                key,
                r.endpoints,
                lambda: Resource.of(ENDPOINT, r.local_cluster, res.load_assignment(r)),
            ),
            routes=routes,
            # With no remote there is no share to write in: the same bytes, the same object.
            routes_weight_inline=Deferred(
                (lambda: routes)
                if r.remote is None
                else lambda: m["routes_inline"].get(
                    key,
                    (r.domains, r.remotes, r.spillover, r.remote_percent),
                    lambda: Resource.of(ROUTE, r.route_config, res.model_route_configuration(r, True)),
                )
            ),
            scopes=m["scopes"].get(
                key,
                r.hosts,
                lambda: tuple(
                    Resource.of(SCOPED_ROUTE, h, res.scoped_route(h, r.route_config)) for h in r.hosts
                ),
            ),
            runtime_key=r.runtime_key,
            runtime_entry=m["runtime"].get(
                key, r.remote_percent, lambda: runtime.entry(r.runtime_key, r.remote_percent)
            ),
            secrets=secrets,
        )


def _remote_parts(r: ModelRoute) -> tuple[list[Resource], tuple[Resource, ...]]:
    """The remote side's clusters (`failover`, `spillover`), with each remote's credentials:
    their secrets, named after its cluster, and the cluster of its OAuth2 token endpoint (one
    remote with spill-over off only: see `api.crd`)."""
    clusters = [
        Resource.of(CLUSTER, n, body) for n, body in failover.remote_clusters(r) + spillover.clusters(r)
    ]
    secrets: list[Resource] = []
    for cluster, remote in zip(failover.remote_names(r), r.remotes, strict=True):
        creds = remote_credentials(remote, cluster)
        if creds.token_endpoint is not None:
            name = creds.token_endpoint[0]
            clusters.append(Resource.of(CLUSTER, name, res.backend_cluster(*creds.token_endpoint)))
        secrets += [Resource.of(SECRET, name, body) for name, body in creds.secrets]
    return clusters, tuple(secrets)
