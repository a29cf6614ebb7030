"""State of the world: requests name everything wanted; Listener, Cluster and scoped-route
responses carry the whole set (Envoy removes what they leave out).

For the other types (endpoints, routes, runtime layers) a response carries only what
changed or was newly asked for, as the protocol allows, so a weight change is one layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass

from xds import wire
from xds.stream import Stream
from xds.subscription import Subscription
from xds.types import CLUSTER, NAMED
from xds.view import View

# Whole-set bodies per view and version: every node of a view at a version gets the same
# bytes, so they are framed once (the nonce is appended per stream). Gone with the view.
_whole_sets: weakref.WeakKeyDictionary[View, dict[tuple[str, int], bytes]] = weakref.WeakKeyDictionary()


def whole_set_body(view: View, type_url: str, version: int) -> bytes:
    bodies = _whole_sets.setdefault(view, {})
    body = bodies.get((type_url, version))
    if body is None:
        for key in [k for k in bodies if k[0] == type_url]:
            del bodies[key]  # only the current version is worth keeping
        body = bodies[(type_url, version)] = wire.discovery_body(
            str(version), type_url, (r.any for r in view.resources[type_url].values())
        )
    return body


@dataclass
class _Sent:
    """What a whole-set type last sent: (version, route refs generation) seen, (version, lingering) sent."""

    seen: tuple | None = None
    content: tuple | None = None


def _seen(stream: Stream, type_url: str, version: int) -> tuple[int, int]:
    """What a whole-set response follows: the view's version and, for clusters, what the
    node's routes use (a dropped cluster they still use stays in)."""
    return version, stream.refs_generation if type_url == CLUSTER else 0


class StateOfTheWorld:
    name = "sotw"

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def read(self, stream: Stream, req: wire.Request) -> None:
        sub = stream.subscription(req.type_url, wildcard=req.type_url not in NAMED)
        if sub is None:
            return
        # A nonce before any response on this stream is an earlier stream's (a control plane
        # restarted): the request is a first one, as go-control-plane takes it.
        if req.response_nonce and sub.nonce:
            if req.response_nonce != sub.nonce:
                return  # answers a response since superseded
            stream.settle(req.type_url, sub, req.version_info, req.error_detail)
        if req.type_url in NAMED and set(req.resource_names) != sub.names:
            names = frozenset(req.resource_names)
            sub.recheck |= names - sub.names  # newly asked for: sent even if unchanged
            sub.names = stream.intern(names)

    def quiet(self, stream: Stream, type_url: str, sub: Subscription) -> bool:
        view = stream.view
        assert view is not None
        version = view.version_of(stream.view_type(type_url))
        if type_url in NAMED:
            return sub.in_step(version)
        sent = self._sent.get(type_url)
        return sent is not None and sent.seen == _seen(stream, type_url, version)

    def respond(self, stream: Stream, type_url: str, sub: Subscription) -> bytes | None:
        view = stream.view
        assert view is not None
        key = stream.view_type(type_url)  # routes: in the form this node is served
        version = view.version_of(key)
        if type_url in NAMED:
            changes = sub.changes(view, key, stream.route_refs)
            if changes is None or not changes[0]:
                return None
            label = str(version)
            body = wire.discovery_body(label, type_url, (r.any for r in changes[0]))
            names: Collection[str] = [r.name for r in changes[0]]
        else:
            sent = self._sent.setdefault(type_url, _Sent())
            seen = _seen(stream, type_url, version)
            if seen == sent.seen:
                return None
            sent.seen = seen
            extra = stream.lingering_clusters() if type_url == CLUSTER else frozenset()
            if (version, extra) == sent.content:
                return None  # the routes moved but the clusters they need did not
            sent.content = (version, extra)
            names = view.resources[type_url].keys()  # (what lingers belongs to no model of the view)
            if extra:
                label = f"{version}+{len(extra)}"
                chosen = list(view.resources[type_url].values())
                chosen += [r for n in sorted(extra) if (r := view.lookup(type_url, n)) is not None]
                body = wire.discovery_body(label, type_url, (r.any for r in chosen))
            else:
                label, body = str(version), whole_set_body(view, type_url, version)
        nonce = stream.nonce()
        sub.sent(version, label, nonce)
        stream.sent(type_url, names)
        return body + wire.text(5, nonce)
