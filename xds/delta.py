"""Delta (incremental) xDS: requests subscribe and unsubscribe names; responses carry changes only.

On reconnect a node lists what it holds (`initial_resource_versions`), so only what
differs is sent again and anything gone is in `removed_resources`.
"""

from __future__ import annotations

from xds import wire
from xds.stream import Stream
from xds.subscription import Subscription
from xds.types import ROUTE


class Delta:
    name = "delta"

    def read(self, stream: Stream, req: wire.Request) -> None:
        first = req.type_url not in stream.types
        sub = stream.subscription(req.type_url, wildcard=False)
        if sub is None:
            return
        view = stream.view
        assert view is not None
        subscribe, unsubscribe = set(req.resource_names_subscribe), set(req.resource_names_unsubscribe)
        current: set[str] = set()  # named by the node as held, at the version the view has
        if first:
            sub.wildcard = not subscribe or "*" in subscribe
            current = self._reconnect(stream, req.type_url, sub, dict(req.initial_resource_versions))
        elif "*" in subscribe:
            sub.wildcard = True
            sub.recheck |= set(view.resources[stream.view_type(req.type_url)])
        if "*" in unsubscribe:
            sub.wildcard = False
        subscribe.discard("*")
        unsubscribe.discard("*")
        if subscribe - sub.names or unsubscribe & sub.names:
            sub.names = stream.intern((sub.names | subscribe) - unsubscribe)
        sub.recheck |= subscribe - current
        if req.response_nonce and req.response_nonce == sub.nonce:
            stream.settle(req.type_url, sub, str(sub.sent_version), req.error_detail)

    @staticmethod
    def _reconnect(stream: Stream, type_url: str, sub: Subscription, versions: dict[str, str]) -> set[str]:
        """A node says what it already holds: only what differs is sent again.
        Returns the names it holds at their current version."""
        view = stream.view
        assert view is not None
        key = stream.view_type(type_url)  # routes: in the form this node is served
        if not versions:
            sub.synced = 0  # holds nothing: everything it wants is new to it
            return set()
        sub.synced = view.version_of(key)
        current = set()
        for name, version in versions.items():
            resource = view.resources[key].get(name)
            if resource is None:
                sub.gone.add(name)
            elif resource.version != version:
                sub.recheck.add(name)
            else:
                current.add(name)
        if sub.wildcard:  # and what it lacks of the whole set
            sub.recheck |= set(view.resources[key]) - current
        return current

    def quiet(self, stream: Stream, type_url: str, sub: Subscription) -> bool:
        assert stream.view is not None
        return sub.in_step(stream.view.version_of(stream.view_type(type_url)))

    def respond(self, stream: Stream, type_url: str, sub: Subscription) -> bytes | None:
        view = stream.view
        assert view is not None
        key = stream.view_type(type_url)  # routes: in the form this node is served
        first = sub.wildcard and not sub.nonce and sub.synced == 0  # holding nothing, never answered
        changes = sub.changes(view, key, stream.route_refs)
        if changes is None:
            if not first:
                return None
            # A wildcard's first answer even when there is nothing (no model yet): Envoy's
            # initialization waits for one, else for its 15 s initial fetch timeout. (A node
            # that reconnects holding everything current is sent nothing.)
            changes = ([], [])
        send, removed = changes
        if type_url == ROUTE and removed:
            # Envoy ignores (and logs an error for) a route configuration removed over Delta: it
            # drops one when no scope names it, and unsubscribes then.
            removed = []
            if not send:
                sub.settled_version = sub.synced
                return None
        nonce = stream.nonce()
        version = view.version_of(key)
        sub.sent(version, str(version), nonce)
        stream.sent(type_url, [r.name for r in send], removed)
        return wire.delta_response(str(version), type_url, nonce, (r.delta for r in send), removed)
