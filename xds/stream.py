"""One xDS stream: what the node asked for, what it holds, and what to send it next.

The same logic serves state-of-the-world and Delta, ADS and single-type streams. It keeps
at most one response in flight per type and always builds the next one from the latest
view, so a slow node costs nothing but its own stream (latest state wins). Three rules
make updates safe:

* Ordering: clusters, endpoints and weights go before the routes that use them; a route
  update waits until the node has answered the clusters, endpoints and weights it needs
  (bounded by `HOLD_LIMIT`, after which it goes anyway and says so in the log).
* Make-before-break: a cluster the node's routes still use stays in its CDS until the node
  has answered routes that no longer use it.
* NACK hold: a rejected version is never sent again to that node; it keeps its last good
  config until something different comes. As Envoy applies the valid resources of a
  rejected response, the node counts as holding all it was sent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from xds import wire
from xds.cache import ResourceCache, Scope, View
from xds.types import CLUSTER, ENDPOINT, NAMED, PUSH_ORDER, ROUTE, RUNTIME, SHORT

log = logging.getLogger("overspill.xds")
HOLD_LIMIT = 5.0  # seconds a route update may wait for the node to take its clusters


@dataclass
class Nack:
    """A rejected response, as `overspill status` and the models' status show it."""

    type_url: str
    version: str
    message: str
    models: tuple[str, ...]
    at: float


@dataclass
class TypeState:
    """One type on one stream. Nothing here grows with the number of models, except the
    subscribed names, and identical subscriptions are shared through the view."""

    wildcard: bool
    names: frozenset[str] = frozenset()
    nonce: str = ""
    pending: bool = False
    sent_key: tuple | None = None  # SotW clusters and listeners: (version, route refs generation) last seen
    sent_content: tuple | None = None  # SotW clusters and listeners: (version, lingering) last sent
    sent_version: int = 0  # view version of the last response
    sent_label: str = ""  # version_info (Delta: system_version_info) of the last response
    settled_version: int = 0  # view version of the last response the node answered
    acked: str = ""
    nack: Nack | None = None
    synced: int = 0  # the node holds the view's content as of this version (for what it wants)
    recheck: set[str] = field(default_factory=set)  # newly wanted names: sent whatever the log says
    lingering: set[str] = field(default_factory=set)  # dropped names the node's routes still use
    gone: set[str] = field(default_factory=set)  # Delta reconnect: names the node has that may be gone
    held_since: float | None = None
    route_refs: frozenset[str] = frozenset()  # ROUTE: clusters the last response's routes use


class Stream:
    def __init__(self, sid: int, cache: ResourceCache, delta: bool, allowed: tuple[str, ...], peer: str = ""):
        self.sid = sid
        self.cache = cache
        self.delta = delta
        self.allowed = allowed
        self.peer = peer
        self.node_id = ""
        self.cluster = ""
        self.scope = Scope()
        self.view: View | None = None
        self.types: dict[str, TypeState] = {}
        self.route_refs: frozenset[str] = frozenset()  # clusters the node's routes use (held or in flight)
        self._route_refs_held: frozenset[str] = frozenset()
        self._refs_gen = 0  # bumps whenever route_refs changes
        self._nonces = 0
        self.nacks: list[Nack] = []  # new NACKs for the server to count and log
        self.acks = 0

    # --- requests ---

    def _hello(self, node) -> None:
        """The first request names the node (Envoy sends it only then): its scope picks the view."""
        if self.view is not None:
            return
        if node is not None:
            self.node_id, self.cluster = node.id, node.cluster
            self.scope = Scope.from_metadata(node.metadata.to_dict() if node.metadata is not None else {})
        self.view = self.cache.view(self.scope)

    def on_sotw(self, req: wire.Request) -> None:
        self._hello(req.node)
        st = self._state(req.type_url, wildcard=req.type_url not in NAMED)
        if st is None:
            return
        if req.response_nonce:
            if req.response_nonce != st.nonce:
                return  # answers a response since superseded
            self._settle(req.type_url, st, req.version_info, req.error_detail)
        if req.type_url in NAMED and set(req.resource_names) != st.names:
            names = frozenset(req.resource_names)
            st.recheck |= names - st.names  # newly asked for: sent even if unchanged
            st.names = self.view.intern(names)

    def on_delta(self, req: wire.Request) -> None:
        self._hello(req.node)
        first = req.type_url not in self.types
        st = self._state(req.type_url, wildcard=False)
        if st is None:
            return
        subscribe, unsubscribe = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
        current: set[str] = set()  # named by the node as held, at the version the view has
        if first:
            st.wildcard = not subscribe or "*" in subscribe
            current = self._reconnect(req.type_url, st, dict(req.initial_resource_versions))
        elif "*" in subscribe:
            st.wildcard = True
            st.recheck |= set(self.view.resources[req.type_url])
        if "*" in unsubscribe:
            st.wildcard = False
        subscribe.discard("*")
        unsubscribe.discard("*")
        if subscribe - st.names or unsubscribe & st.names:
            st.names = self.view.intern((st.names | subscribe) - unsubscribe)
        st.recheck |= subscribe - current
        if req.response_nonce and req.response_nonce == st.nonce:
            self._settle(req.type_url, st, str(st.sent_version), req.error_detail)

    def _reconnect(self, type_url: str, st: TypeState, versions: dict[str, str]) -> set[str]:
        """A Delta node says what it already holds: only what differs is sent again.
        Returns the names it holds at their current version."""
        view = self.view
        if not versions:
            st.synced = 0  # holds nothing: everything it wants is new to it
            return set()
        st.synced = view.version[type_url]
        current = set()
        for name, version in versions.items():
            resource = view.resources[type_url].get(name)
            if resource is None:
                st.gone.add(name)
            elif resource.version != version:
                st.recheck.add(name)
            else:
                current.add(name)
        if st.wildcard:  # and what it lacks of the whole set
            st.recheck |= set(view.resources[type_url]) - current
        return current

    def _state(self, type_url: str, wildcard: bool) -> TypeState | None:
        if type_url not in self.allowed:
            log.warning("event=unknown_type node=%s type=%s", self.node_id, type_url)
            return None
        return self.types.setdefault(type_url, TypeState(wildcard=wildcard))

    def _settle(self, type_url: str, st: TypeState, version: str, error) -> None:
        before, st.pending, st.settled_version = st.settled_version, False, st.sent_version
        if error is not None and (error.code or error.message):
            models = self._models_in(type_url, error.message, before)
            # A SotW NACK carries the node's last good version; the rejected one is what was sent.
            st.nack = Nack(type_url, st.sent_label, error.message, models, time.time())
            self.nacks.append(st.nack)
            return
        st.acked, st.nack = version, None
        self.acks += 1
        if type_url == ROUTE:
            self._route_refs_held = self.route_refs = st.route_refs
            self._refs_gen += 1

    def _models_in(self, type_url: str, message: str, since: int) -> tuple[str, ...]:
        """The ModelDeployments a NACK is about: named in the error, else those whose resources changed."""
        keys = {f"{ns}/{n}" for ns, n in self.view.bundles} if self.view else set()
        named = sorted(k for k in keys if f"{k}/" in message or f"'{k}'" in message)
        if named or self.view is None:
            return tuple(named)
        changed = self.view.changed_since(type_url, since) or frozenset()
        return tuple(
            sorted({"/".join(n.split("/")[1:3]) for n in changed if n.startswith("overspill/")} & keys)
        )

    # --- responses ---

    def next_responses(self, now: float) -> list[tuple[str, bytes]]:
        """Every (type, response) due now, in push order; empty when the node is up to date or busy."""
        out: list[tuple[str, bytes]] = []
        if self.view is None or not self.cache.ready:
            return out
        for type_url in PUSH_ORDER:
            st = self.types.get(type_url)
            if st is None or st.pending:
                continue
            if type_url == ROUTE and not self._route_may_go(st, now):
                continue
            payload = self._delta_response(type_url, st) if self.delta else self._sotw_response(type_url, st)
            if payload is not None:
                out.append((type_url, payload))
        return out

    def held_route(self) -> bool:
        st = self.types.get(ROUTE)
        return st is not None and st.held_since is not None

    def _route_may_go(self, st: TypeState, now: float) -> bool:
        view = self.view
        assert view is not None
        if self._route_in_sync(st):
            st.held_since = None
            return True
        deps = view.route_deps
        waiting = []
        cds, rtds, eds = self.types.get(CLUSTER), self.types.get(RUNTIME), self.types.get(ENDPOINT)
        if cds is not None and cds.settled_version < deps.cluster_version:
            waiting.append("CDS")
        if rtds is not None and rtds.settled_version < deps.runtime_version:
            waiting.append("RTDS")
        if eds is not None and (
            eds.pending
            or eds.recheck
            or eds.settled_version < deps.endpoint_version
            or not deps.eds_names <= eds.names
        ):
            waiting.append("EDS")
        if not waiting:
            st.held_since = None
            return True
        if st.held_since is None:
            st.held_since = now
            return False
        if now - st.held_since < HOLD_LIMIT:
            return False
        log.warning(
            "event=route_hold_timeout node=%s waited_for=%s seconds=%.1f",
            self.node_id,
            ",".join(waiting),
            now - st.held_since,
        )
        st.held_since = None
        return True

    def _route_in_sync(self, st: TypeState) -> bool:
        return self.view.version[ROUTE] <= st.synced and not st.recheck

    def _nonce(self) -> str:
        self._nonces += 1
        return f"{self.sid}-{self._nonces}"

    def _lingering(self) -> frozenset[str]:
        """Clusters gone from the view that the node's routes still use."""
        return frozenset(n for n in self.route_refs if n not in self.view.resources[CLUSTER])

    def _sotw_response(self, type_url: str, st: TypeState) -> bytes | None:
        """Clusters and listeners: the whole set, as SotW requires. Other types: like Delta, only
        what changed or was newly asked for (the protocol allows it; a weight change is one layer)."""
        view = self.view
        version = view.version[type_url]
        extra: frozenset[str] = frozenset()
        if type_url in NAMED:
            changes = self._changes(type_url, st)
            if changes is None or not changes[0]:
                return None
            label = str(version)
            body = wire.discovery_body(label, type_url, (r.any for r in changes[0]))
        else:
            key = (version, self._refs_gen if type_url == CLUSTER else 0)
            if key == st.sent_key:
                return None
            st.sent_key = key
            extra = self._lingering() if type_url == CLUSTER else frozenset()
            if (version, extra) == st.sent_content:
                return None  # the routes moved but the clusters they need did not
            st.sent_content = (version, extra)
            label = f"{version}+{len(extra)}" if extra else str(version)
            body = view.encoded.get((type_url, version)) if not extra else None
            if body is None:
                chosen = list(view.resources[type_url].values())
                chosen += [r for n in sorted(extra) if (r := view.lookup(type_url, n)) is not None]
                body = wire.discovery_body(label, type_url, (r.any for r in chosen))
                if not extra:  # every node of this view at this version gets these same bytes
                    view.remember(type_url, version, body)
        nonce = self._nonce()
        st.sent_version, st.sent_label, st.nonce, st.pending = version, label, nonce, True
        self._sent(type_url)
        return body + wire.text(5, nonce)

    def _delta_response(self, type_url: str, st: TypeState) -> bytes | None:
        changes = self._changes(type_url, st)
        if changes is None:
            return None
        send, removed = changes
        nonce = self._nonce()
        st.sent_version, st.nonce, st.pending = self.view.version[type_url], nonce, True
        st.sent_label = str(st.sent_version)
        self._sent(type_url)
        return wire.delta_response(str(st.sent_version), type_url, nonce, (r.delta for r in send), removed)

    def _changes(self, type_url: str, st: TypeState) -> tuple[list, list[str]] | None:
        """What the node lacks of this type: (resources to send, names to remove), or None.

        The node holds the view as of `synced`, so only names the view's log shows changed
        since then, and names in `recheck`, need a look: the work follows the change, not the
        state. A cluster (or its endpoints) that the node's routes still use is neither
        resent nor removed until they no longer do.
        """
        view = self.view
        current = view.resources[type_url]
        if st.synced == 0:  # holds nothing yet
            changed = frozenset(current)
        else:
            changed = view.changed_since(type_url, st.synced)
            if changed is None:  # too far behind for the log: everything, and whatever was dropped
                changed = frozenset(current) | frozenset(view.retired.get(type_url, ()))
        names = changed | st.recheck | st.gone | st.lingering
        send, removed, lingering = [], [], set()
        lingering_types = (CLUSTER, ENDPOINT)
        for name in sorted(names):
            resource = current.get(name)
            if resource is None and type_url in lingering_types and name in self.route_refs:
                lingering.add(name)  # gone from the view, still routed to by this node
                continue
            wanted = st.wildcard or name in st.names
            if resource is not None and wanted:
                send.append(resource)
            elif resource is None and (wanted or name in st.gone):
                removed.append(name)
        st.synced, st.recheck, st.gone, st.lingering = view.version[type_url], set(), set(), lingering
        if not send and not removed:
            st.settled_version = st.synced  # nothing new for this node: it is as good as answered
            return None
        return send, removed

    def _sent(self, type_url: str) -> None:
        if type_url == ROUTE:
            refs = self.types[ROUTE].route_refs = self.view.route_deps.clusters
            self.route_refs = self._route_refs_held | refs  # old and new routes both count until answered
            self._refs_gen += 1

    def describe(self) -> dict:
        return {
            "id": self.node_id,
            "cluster": self.cluster,
            "peer": self.peer,
            "protocol": "delta" if self.delta else "sotw",
            "scope": str(self.scope),
            "types": {
                SHORT[t]: {
                    "acked": st.acked or None,
                    "pending": st.pending,
                    "resources": len(self.view.resources[t]) if st.wildcard else len(st.names),
                    "nack": st.nack.message if st.nack else None,
                    "nackVersion": st.nack.version if st.nack else None,
                    "nackModels": list(st.nack.models) if st.nack else [],
                    "routeHeldSeconds": None
                    if st.held_since is None
                    else round(time.monotonic() - st.held_since, 1),
                }
                for t, st in self.types.items()
            },
        }
