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

Weights reach nodes without the weight layers too. Envoy asks for its runtime layers before
anything else at start (its runtime must be ready before it asks for clusters) and for route
configurations only once it has its listener and scopes, so at a stream's first route request
it is judged: a node subscribed (on this stream) to every weight layer gets its routes with the
weights in those layers; any other node gets them with the current weights written in as the
runtime keys' defaults (`View` keeps both forms), a route update per weight change, and no wait
for RTDS. A later change of its RTDS subscription judges it again (a node that subscribes late
gets routes without inline weights only once it has taken the layers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from typing import Protocol

from api.desired import model_of, models_named_in, route_config_name
from xds import wire
from xds.cache import ResourceCache
from xds.identity import Identity
from xds.scope import Scope
from xds.subscription import Ack, Interner, Nack, Subscription
from xds.types import CLUSTER, ENDPOINT, PUSH_ORDER, ROUTE, ROUTE_WEIGHT_INLINE, RUNTIME, SHORT
from xds.view import View

log = logging.getLogger("overspill.xds")
HOLD_LIMIT = 5.0  # seconds a route update may wait for the node to take its clusters


def weight_layers_fix(layers: list[str]) -> str:
    """What to change in a bootstrap whose node does not take the weight layers."""
    return f"use `overspill bootstrap`, or declare layered_runtime rtds layers {layers[0]} to {layers[-1]}"


class XdsProtocol(Protocol):
    name: str

    def read(self, stream: Stream, req: wire.Request) -> None: ...

    def respond(self, stream: Stream, type_url: str, sub: Subscription) -> bytes | None: ...

    def quiet(self, stream: Stream, type_url: str, sub: Subscription) -> bool:
        """Whether `respond` would surely find nothing to send, told cheaply: each wake looks at
        every type, and most have nothing new."""
        ...


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
        identity: Identity | None = None,
    ):
        self.sid = sid
        self.cache = cache
        self.protocol = protocol
        self.allowed = allowed
        self.peer = peer
        self.intern = interner or Interner()
        self.node_id = ""
        self.cluster = ""
        self.identity = identity  # from the client certificate (mTLS): bounds the scope
        self.asked = Scope()  # the scope its metadata asks for
        self.scope = Scope()  # what it receives
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
        # Whether the node takes every weight layer (None until its first route request), and the
        # form of route configurations it is served (ROUTE, or ROUTE_WEIGHT_INLINE without them).
        self.weight_layers: bool | None = None
        self.route_form = ROUTE
        self.warned_weight_layers = False  # the log says so once per stream
        self._layers_needed = 0  # RTDS version to be taken before routes without weights (a late subscriber)
        self.nacks: list[Nack] = []  # new NACKs, for the server to report
        self.acks: list[Ack] = []  # responses newly ACKed, for the server to report
        self._sent_at: dict[str, float] = {}  # type -> when its response in flight was sent

    @property
    def delta(self) -> bool:
        return self.protocol.name == "delta"

    # --- requests ---

    def on_request(self, req: wire.Request) -> None:
        self._hello(req.node)
        if req.type_url == ROUTE and self.weight_layers is None:
            self._judge_weights()  # before reading it: Delta compares what the node holds with its form
        routes, layers = self.types.get(ROUTE), self.types.get(RUNTIME)
        before = routes.names if routes is not None else frozenset()
        held = (layers.names, layers.wildcard) if layers is not None else None
        self.protocol.read(self, req)
        layers = self.types.get(RUNTIME)
        if req.type_url == RUNTIME and self.weight_layers is not None and layers is not None:
            if held is None or layers.names is not held[0] or layers.wildcard != held[1]:
                self._judge_weights()  # its layers changed (an ACK, the same names, changes nothing)
        routes = self.types.get(ROUTE)
        if routes is not None and routes.names is not before:
            # Envoy asks no more for a route configuration once no scope names it: it is gone.
            self._routes_unsure &= routes.names
            self.refs_generation += 1

    def _hello(self, node) -> None:
        """The first request names the node (Envoy sends it only then): its scope picks the view.
        What its metadata asks for is bounded by what its certificate allows."""
        if self.view is not None:
            return
        if node is not None:
            self.node_id, self.cluster = node.id, node.cluster
            self.asked = Scope.from_metadata(node.metadata)
        self.scope = self.asked.within(self.identity.namespaces) if self.identity else self.asked
        self.view = self.cache.acquire(self.scope)

    def _judge_weights(self) -> None:
        """Whether the node takes every weight layer, from its RTDS subscription on this stream."""
        view = self.view
        assert view is not None
        rtds = self.types.get(RUNTIME)
        held = rtds is not None and (rtds.wildcard or rtds.names.issuperset(view.layer_names))
        if held == self.weight_layers:
            return
        self.weight_layers = held
        if not held:
            self.cache.keep_weight_inline(view)
        if ROUTE not in self.types:  # its first route request: the routes start in the right form
            self.route_form = ROUTE if held else ROUTE_WEIGHT_INLINE

    def layers_subscribed(self) -> int:
        """How many of the weight layers the node subscribes to (for the log and status)."""
        rtds = self.types.get(RUNTIME)
        if rtds is None or self.view is None:
            return 0
        return len(self.view.layer_names) if rtds.wildcard else len(rtds.names & set(self.view.layer_names))

    def weight_layers_warning(self) -> str:
        layers = self.view.layer_names if self.view is not None else []
        return (
            f"does not take the weight layers ({self.layers_subscribed()}/{len(layers)} subscribed): weights"
            f" are written into its routes instead; {weight_layers_fix(layers) if layers else ''}"
        )

    def view_type(self, type_url: str) -> str:
        """Where the view keeps what this node is sent of `type_url` (routes: in the node's form)."""
        return self.route_form if type_url == ROUTE else type_url

    @property
    def denied(self) -> bool:
        """Whether its certificate denied it namespaces it asked for by name, or every namespace."""
        if self.identity is None or self.scope.namespaces is None:
            return False
        return not self.scope.namespaces or self.asked.namespaces not in (None, self.scope.namespaces)

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
        now = time.monotonic()
        sent_at = self._sent_at.pop(type_url, now)
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
        taken = (
            self.view.weights_taken(self.view_type(type_url), before, sub.settled_version)
            if self.view
            else ()
        )
        self.acks.append(Ack(type_url, now - sent_at, tuple((now - at, n) for at, n in taken)))

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
        changed = self.view.changed_since(self.view_type(type_url), since) or frozenset()
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
            if type_url == ROUTE:
                self._take_route_form(sub)
                if not self._route_may_go(sub, now):
                    continue
            if self.protocol.quiet(self, type_url, sub):
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

    def _take_route_form(self, sub: Subscription) -> None:
        """Serve the node the form of routes its weight layers call for, once it has answered the
        routes in flight: every route configuration it asks for goes again, in the new form."""
        view = self.view
        assert view is not None
        wanted = ROUTE if self.weight_layers is not False else ROUTE_WEIGHT_INLINE
        if wanted == self.route_form:
            return
        self.route_form = wanted
        sub.synced = sub.settled_version = 0
        # Until it takes them again it may hold either form: clusters stay while either uses them.
        self._routes_unsure |= sub.names
        self._routes_since, self._routes_taken = 0, 0
        self.refs_generation += 1
        if wanted == ROUTE:  # routes without weights only once the node has the weights as they are now
            self._layers_needed = view.version_of(RUNTIME)

    def _route_may_go(self, sub: Subscription, now: float) -> bool:
        view = self.view
        assert view is not None
        form = self.route_form
        if view.version_of(form) <= sub.synced and not sub.recheck:  # nothing new to send
            self._held_since = None
            return True
        needs = view.route_needs[form]
        waiting = []
        cds, rtds, eds = self.types.get(CLUSTER), self.types.get(RUNTIME), self.types.get(ENDPOINT)
        if cds is not None and cds.settled_version < needs.cluster_version:
            waiting.append("CDS")
        layers = max(needs.runtime_version, self._layers_needed) if form == ROUTE else 0
        if rtds is not None and rtds.settled_version < layers:
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
        names = view.changed_since(self.route_form, sub.synced) if sub.synced else None
        if names is None:
            names = frozenset(view.resources[self.route_form])
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
        dropped, key = view.dropped(cluster, self.route_form), model_of(cluster)
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
        self._sent_at[type_url] = time.monotonic()
        if type_url == ROUTE and self._routes_since is None:
            assert self.view is not None
            self._routes_since = self.view.version_of(self.route_form)
            self.refs_generation += 1

    def describe(self) -> dict:
        view = self.view
        return {
            "id": self.node_id,
            "cluster": self.cluster,
            "peer": self.peer,
            "identity": self.identity.name if self.identity else None,
            "protocol": self.protocol.name,
            "scope": str(self.scope),
            # False: routes carry the weights inline (the node does not take the weight layers)
            "weightLayers": self.weight_layers,
            "weightLayersSubscribed": self.layers_subscribed(),
            "warnings": [self.weight_layers_warning()] if self.weight_layers is False else [],
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
