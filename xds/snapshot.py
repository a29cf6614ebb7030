"""From desired state to cached resources, re-serializing only what changed.

Each model's cluster, endpoints and virtual host are memoized on exactly the inputs they
depend on, so a weight change re-serializes one virtual host; the route configuration
is a byte join of the virtual hosts' bytes (see `wire`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xds import resources as res
from xds import wire
from xds.cache import Resource, ResourceCache
from xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


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

    def keep_only(self, keys: set) -> None:
        for key in self._entries.keys() - keys:
            del self._entries[key]


class Translator:
    """Publishes the resources for a list of `ModelRoute` into a `ResourceCache`."""

    def __init__(self, cache: ResourceCache, listener_address: str, listener_port: int):
        self.cache = cache
        self.listener_address = listener_address
        self.listener_port = listener_port
        self._local = _Memo()
        self._remote = _Memo()
        self._endpoints = _Memo()
        self._vhosts = _Memo()
        self._fallback = bytes(res.fallback_virtual_host())
        self._listener = Resource.of(
            LISTENER, res.LISTENER_NAME, bytes(res.listener(listener_address, listener_port))
        )

    def publish(self, routes: list[res.ModelRoute]) -> bool:
        """Put the state for `routes` into the cache; True when any type changed."""
        clusters: dict[str, Resource] = {}
        endpoints: dict[str, Resource] = {}
        vhosts: list[bytes] = []
        for r in routes:
            key = (r.namespace, r.name)
            clusters[r.local_cluster] = self._local.get(
                key,
                r.local_cluster,
                lambda r=r: Resource.of(CLUSTER, r.local_cluster, bytes(res.local_cluster(r))),
            )
            if r.remote is not None:
                clusters[r.remote_cluster] = self._remote.get(
                    key,
                    r.remote,
                    lambda r=r: Resource.of(CLUSTER, r.remote_cluster, bytes(res.remote_cluster(r))),
                )
            endpoints[r.local_cluster] = self._endpoints.get(
                key,
                r.endpoints,
                lambda r=r: Resource.of(ENDPOINT, r.local_cluster, bytes(res.load_assignment(r))),
            )
            vhosts.append(
                self._vhosts.get(
                    key, (r.domains, r.remote, r.remote_percent), lambda r=r: bytes(res.virtual_host(r))
                )
            )
        keys = {(r.namespace, r.name) for r in routes}
        for memo in (self._local, self._remote, self._endpoints, self._vhosts):
            memo.keep_only(keys)
        route_config = (
            wire.text(1, res.ROUTE_CONFIG_NAME)
            + b"".join(wire.field(2, v) for v in vhosts)
            + wire.field(2, self._fallback)
        )
        changed = [
            self.cache.set(CLUSTER, clusters),
            self.cache.set(ENDPOINT, endpoints),
            self.cache.set(LISTENER, {res.LISTENER_NAME: self._listener}),
            self.cache.set(
                ROUTE, {res.ROUTE_CONFIG_NAME: Resource.of(ROUTE, res.ROUTE_CONFIG_NAME, route_config)}
            ),
        ]
        self.cache.commit()
        return any(changed)
