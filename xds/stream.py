"""One xDS stream: the node, its view, its subscriptions, and the rules that make updates safe.

The protocol (`sotw.StateOfTheWorld` or `delta.Delta`) reads requests into the shared
subscription state and frames responses; everything else is here and the same for both.
A stream keeps at most one response in flight per type and always builds the next one
from the latest view, so a slow node costs nothing but its own stream (latest state wins).
Three rules make updates safe:

* Ordering: clusters, endpoints and weights go before the routes that use them; a route
  update waits until the node has answered the clusters, endpoints and weights it needs
  (bounded by `HOLD_LIMIT`, after which it goes anyway and says so in the log).
* Make-before-break: a cluster the node's routes still use stays in its CDS until the node
  has answered routes that no longer use it. Each model has its own route configuration;
  the node holds one while a routing scope names it, and drops it (asking no more for it)
  once it has taken the scopes without it.
* NACK hold: a rejected version is never sent again to that node; it keeps its last good
  config until something different comes. As Envoy applies the valid resources of a
  rejected response, the node counts as holding all it was sent. A later response that
  carries none of the rejected models' resources does not end the rejection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from typing import Protocol

from api.desired import model_of, models_named_in, route_config_name
from xds import wire
from xds.cache import ResourceCache
from xds.scope import Scope
from xds.subscription import Interner, Nack, Subscription
from xds.types import CLUSTER, ENDPOINT, PUSH_ORDER, ROUTE, RUNTIME, SHORT
from xds.view import View

log = logging.getLogger("overspill.xds")
HOLD_LIMIT = 5.0  # seconds a route update may wait for the node to take its clusters


class XdsProtocol(Protocol):
    name: str

    def read(self, stream: Stream, req: wire.Request) -> None: ...

    def respond(self, stream: Stream, type_url: str, sub: Subscription) -> bytes | None: ...


class _RouteRefs(Collection[str]):
    """The clusters (and their endpoint sets) gone from the view that a node's routes still
    use, looked up one name at a time: a weight change never computes them."""

    def __init__(self, stream: Stream):
        self._stream = stream

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._stream.routes_use(name)

    def __iter__(self):
        return iter(self._stream.lingering_clusters())

    def __len__(self) -> int:
        return len(self._stream.lingering_clusters())


class Stream:
    def __init__(
        self,
        sid: int,
        cache: ResourceCache,
        protocol: XdsProtocol,
        allowed: tuple[str, ...],
        peer: str = "",
        interner: Interner | None = None,
    ):
        self.sid = sid
        self.cache = cache
        self.protocol = protocol
        self.allowed = allowed
        self.peer = peer
        self.intern = interner or Interner()
        self.node_id = ""
        self.cluster = ""
        self.scope = Scope()
        self.view: View | None = None
        self.types: dict[str, Subscription] = {}
        # What the node's route configurations are, as versions of the view (nothing per model,
        # so a thousand nodes of ten thousand models cost no more than before): it holds those
        # it asks for, as of the last route response it took, except those of a rejected
        # response (old or new: both count) until a later response carries them again.
        self._routes_since: int | None = None  # view route version of the first routes sent
        self._routes_taken = 0  # view route version of the last route response ACKed
        self._routes_unsure: set[str] = set()
        self._in_flight: dict[str, Collection[str]] = {}  # type -> names in the response in flight
        self.refs_generation = 0  # bumps whenever what the node's routes use may have changed
        self._lingering: tuple[tuple[int, int], frozenset[str]] = ((-1, -1), frozenset())
        self.route_refs = _RouteRefs(self)  # what `Subscription.changes` keeps from going
        self._nonces = 0
        self._held_since: float | None = None  # a route update waiting for its clusters, since
        self.nacks: list[Nack] = []  # new NACKs, for the server to report
        self.acks: list[str] = []  # types newly ACKed, for the server to report

    @property
    def delta(self) -> bool:
        return self.protocol.name == "delta"

    # --- requests ---

    def on_request(self, req: wire.Request) -> None:
        self._hello(req.node)
        routes = self.types.get(ROUTE)
        before = routes.names if routes is not None else frozenset()
        self.protocol.read(self, req)
        routes = self.types.get(ROUTE)
        if routes is not None and routes.names is not before:
            # Envoy asks no more for a route configuration once no scope names it: it is gone.
            self._routes_unsure &= routes.names
            self.refs_generation += 1

    def _hello(self, node) -> None:
        """The first request names the node (Envoy sends it only then): its scope picks the view."""
        if self.view is not None:
            return
        if node is not None:
            self.node_id, self.cluster = node.id, node.cluster
            self.scope = Scope.from_metadata(node.metadata.to_dict() if node.metadata is not None else {})
        self.view = self.cache.acquire(self.scope)

    def close(self) -> None:
        if self.view is not None:
            self.cache.release(self.view)
            self.view = None

    def subscription(self, type_url: str, wildcard: bool) -> Subscription | None:
        if type_url not in self.allowed:
            log.warning("event=unknown_type node=%s type=%s", self.node_id, type_url)
            return None
        return self.types.setdefault(type_url, Subscription(wildcard=wildcard))

    def settle(self, type_url: str, sub: Subscription, version: str, error) -> None:
        """The node answered the response in flight: an ACK of `version`, or a NACK."""
        before, sub.pending, sub.settled_version = sub.settled_version, False, sub.sent_version
        in_flight = self._in_flight.pop(type_url, ())
        if error is not None and (error.code or error.message):
            if type_url == ROUTE:  # it may hold the old or the new version of each
                self._routes_unsure.update(in_flight)
                self.refs_generation += 1
            models = self._models_in(type_url, error.message, before)
            # A SotW NACK carries the node's last good version; the rejected one is what was sent.
            sub.nack = Nack(type_url, sub.sent_label, error.message, models, time.time())
            self.nacks.append(sub.nack)
            return
        sub.acked = version
        if type_url == ROUTE:
            self._routes_taken = sub.settled_version
            self._routes_unsure.difference_update(in_flight)
            self.refs_generation += 1
        if sub.nack is not None and self._still_rejected(type_url, sub.nack, in_flight):
            return  # it took other resources; the rejected ones stay rejected (not reported as accepted)
        sub.nack = None
        self.acks.append(type_url)

    def _still_rejected(self, type_url: str, nack: Nack, answered: Collection[str]) -> bool:
        """Whether a model of a NACK, still in the view, had none of its resources in the
        response just ACKed (Delta, and named types: a response carries what changed)."""
        assert self.view is not None
        covered = {self.view.owner(type_url, name) for name in answered}
        models = self.view.models()
        return any(m not in covered and m in models for m in nack.models)

    def _models_in(self, type_url: str, message: str, since: int) -> tuple[tuple[str, str], ...]:
        """The ModelDeployments a NACK is about: named in the error, else those whose resources changed."""
        if self.view is None:
            return ()
        keys = set(self.view.models())
        named = models_named_in(message, keys)
        if named:
            return tuple(named)
        changed = self.view.changed_since(type_url, since) or frozenset()
        return tuple(sorted({m for n in changed if (m := self.view.owner(type_url, n)) is not None} & keys))

    # --- responses ---

    def due(self, now: float) -> Iterator[str]:
        """The types with a response due now, in push order, one at a time: the caller builds
        each (`respond`) just before sending it, so a stream never holds more than one."""
        if self.view is None or not self.cache.ready:
            return
        for type_url in PUSH_ORDER:
            sub = self.types.get(type_url)
            if sub is None or sub.pending:
                continue
            if type_url == ROUTE and not self._route_may_go(sub, now):
                continue
            yield type_url

    def respond(self, type_url: str) -> bytes | None:
        """The response of a type due now (see `due`), or None when the node needs nothing."""
        return self.protocol.respond(self, type_url, self.types[type_url])

    def first_size(self, type_url: str) -> int:
        """Before anything of a type was sent on this stream: about what its first response weighs
        (the whole of the type), so a first sync can wait for room before it is built; else 0."""
        if self.view is None or self.types[type_url].sent_version:
            return 0
        return self.view.size_of(type_url)

    def held_route(self) -> bool:
        return self._held_since is not None

    def _route_may_go(self, sub: Subscription, now: float) -> bool:
        view = self.view
        assert view is not None
        if view.version_of(ROUTE) <= sub.synced and not sub.recheck:  # nothing new to send
            self._held_since = None
            return True
        needs = view.route_needs
        waiting = []
        cds, rtds, eds = self.types.get(CLUSTER), self.types.get(RUNTIME), self.types.get(ENDPOINT)
        if cds is not None and cds.settled_version < needs.cluster_version:
            waiting.append("CDS")
        if rtds is not None and rtds.settled_version < needs.runtime_version:
            waiting.append("RTDS")
        if eds is not None and (
            eds.pending
            or eds.recheck
            or eds.settled_version < needs.endpoint_version
            or not self._route_endpoints(sub) <= eds.names
        ):
            waiting.append("EDS")
        if not waiting:
            self._held_since = None
            return True
        if self._held_since is None:
            self._held_since = now
            return False
        if now - self._held_since < HOLD_LIMIT:
            return False
        log.warning(
            "event=route_hold_timeout node=%s waited_for=%s seconds=%.1f",
            self.node_id,
            ",".join(waiting),
            now - self._held_since,
        )
        self._held_since = None
        return True

    def _route_endpoints(self, sub: Subscription) -> frozenset[str]:
        """The endpoint sets used by the route configurations the node is about to be sent."""
        view = self.view
        assert view is not None
        names = view.changed_since(ROUTE, sub.synced) if sub.synced else None
        if names is None:
            names = frozenset(view.resources[ROUTE])
        names = names | sub.recheck
        if not sub.wildcard:
            names = names & sub.names
        return frozenset().union(*(view.route_uses(n)[1] for n in names))

    def nonce(self) -> str:
        self._nonces += 1
        return f"{self.sid}-{self._nonces}"

    def routes_use(self, cluster: str) -> bool:
        """Whether the node's routes may still use a cluster gone from the view: its model's
        route configuration is one the node holds, in a version from before the cluster left it
        (or the model went, and the node has not yet dropped its routes)."""
        view = self.view
        assert view is not None
        dropped, key = view.dropped(cluster), model_of(cluster)
        routes = self.types.get(ROUTE)
        if dropped is None or key is None or routes is None or self._routes_since is None:
            return False
        since, model_went = dropped
        name = route_config_name(*key)
        if since <= self._routes_since or not (routes.wildcard or name in routes.names):
            return False  # never sent routes that used it, or no longer holds them
        return model_went or name in self._routes_unsure or self._routes_taken < since

    def lingering_clusters(self) -> frozenset[str]:
        """Clusters gone from the view that the node's routes still use."""
        view = self.view
        assert view is not None
        key = (self.refs_generation, view.applied)
        if self._lingering[0] != key:
            lingering = frozenset(c for c in view.retired_names(CLUSTER) if self.routes_use(c))
            self._lingering = (key, lingering)
        return self._lingering[1]

    def sent(self, type_url: str, names: Collection[str], removed: Collection[str] = ()) -> None:
        """A response of `type_url` carrying `names` (and removing `removed`) is on its way."""
        self._in_flight[type_url] = (*names, *removed) if removed else names
        if type_url == ROUTE and self._routes_since is None:
            assert self.view is not None
            self._routes_since = self.view.version_of(ROUTE)
            self.refs_generation += 1

    def describe(self) -> dict:
        view = self.view
        return {
            "id": self.node_id,
            "cluster": self.cluster,
            "peer": self.peer,
            "protocol": self.protocol.name,
            "scope": str(self.scope),
            "types": {
                SHORT[t]: {
                    "acked": sub.acked or None,
                    "pending": sub.pending,
                    "resources": (len(view.resources[t]) if view else 0) if sub.wildcard else len(sub.names),
                    "nack": sub.nack.message if sub.nack else None,
                    "nackVersion": sub.nack.version if sub.nack else None,
                    "nackModels": [f"{ns}/{n}" for ns, n in sub.nack.models] if sub.nack else [],
                    "routeHeldSeconds": None
                    if t != ROUTE or self._held_since is None
                    else round(time.monotonic() - self._held_since, 1),
                }
                for t, sub in self.types.items()
            },
        }
