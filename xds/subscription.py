"""One type on one stream: what the node wants, what it holds, and what it was last sent.

State of the world and Delta share this state and the diff below; they differ only in
how requests fill it (`sotw`, `delta`) and how responses are framed. Nothing here grows
with the number of models, except the subscribed names, which identical subscriptions
share through an `Interner`.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection
from dataclasses import dataclass, field

from xds.bundle import Resource
from xds.types import CLUSTER, ENDPOINT
from xds.view import View

# Types whose dropped resources stay with a node while its routes still use them.
LINGERING_TYPES = (CLUSTER, ENDPOINT)


@dataclass
class Nack:
    """A rejected response, as `overspill status` and the models' status show it."""

    type_url: str
    version: str
    message: str
    models: tuple[tuple[str, str], ...]
    at: float


@dataclass(frozen=True)
class Ack:
    """An accepted response, with the timings the control plane's histograms show: how long the
    node took to answer it, and how long ago the weights it carried were decided."""

    type_url: str
    seconds: float  # from the response being sent to its ACK
    # (seconds since a weight decision this response carried, how many models that decision
    # changed): one entry per distinct decision time, usually one per push
    weights: tuple[tuple[float, int], ...] = ()


@dataclass
class Subscription:
    wildcard: bool
    names: frozenset[str] = frozenset()
    # What the node holds: the view's content as of `synced`, for what it wants, except for
    # names in `recheck` (newly wanted: sent whatever the log says), `gone` (Delta reconnect:
    # held names that may no longer exist) and `lingering` (dropped, but still routed to).
    synced: int = 0
    recheck: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    lingering: set[str] = field(default_factory=set)
    # The response in flight, and the last the node answered.
    nonce: str = ""
    pending: bool = False
    sent_version: int = 0  # view version of the last response
    sent_label: str = ""  # version_info (Delta: system_version_info) of the last response
    settled_version: int = 0  # view version of the last response the node answered
    acked: str = ""
    nack: Nack | None = None

    def sent(self, version: int, label: str, nonce: str) -> None:
        self.sent_version, self.sent_label, self.nonce, self.pending = version, label, nonce, True

    @property
    def set_aside(self) -> bool:
        """Names to look at whatever the log says (see the fields above)."""
        return bool(self.recheck or self.gone or self.lingering)

    def in_step(self, version: int) -> bool:
        """The node holds the view's `version` of this type and nothing is set aside: nothing to
        send (and as good as answered). A wake for another type costs no more than this."""
        if self.synced == version and not self.set_aside:
            self.settled_version = version
            return True
        return False

    def changes(
        self, view: View, type_url: str, route_refs: Collection[str]
    ) -> tuple[list[Resource], list[str]] | None:
        """What the node lacks of this type: (resources to send, names to remove), or None.

        Only names the view's log shows changed since `synced`, and the names set aside
        above, need a look: the work follows the change, not the state. A cluster (or its
        endpoints) that the node's routes still use is neither resent nor removed until
        they no longer do.
        """
        version = view.version_of(type_url)
        if self.in_step(version):
            return None
        if not self.set_aside and type_url not in LINGERING_TYPES:
            # Nodes that were in step before a push, wanting the same names, lack the same: worked out
            # once per push for them all (the lists are shared: read, never changed).
            step = _steps(view, type_url, version)
            key = (self.synced, self.wildcard, self.names)
            found = step.get(key)
            if found is None:
                found = step[key] = self._diff(view, type_url, route_refs)
            send, removed, lingering = found[0], found[1], set()
        else:
            send, removed, lingering = self._diff(view, type_url, route_refs)
        self.synced, self.recheck, self.gone, self.lingering = version, set(), set(), lingering
        if not send and not removed:
            self.settled_version = self.synced  # nothing new for this node: it is as good as answered
            return None
        return send, removed

    def _diff(
        self, view: View, type_url: str, route_refs: Collection[str]
    ) -> tuple[list[Resource], list[str], set[str]]:
        current = view.resources[type_url]
        if self.synced == 0:  # holds nothing yet
            changed = frozenset(current)
        else:
            changed = view.changed_since(type_url, self.synced)
            if changed is None:  # too far behind for the log: everything, and whatever was dropped
                changed = frozenset(current) | frozenset(view.retired_names(type_url))
        names = changed | self.recheck | self.gone | self.lingering
        send, removed, lingering = [], [], set()
        for name in sorted(names):
            resource = current.get(name)
            if resource is None and type_url in LINGERING_TYPES and name in route_refs:
                lingering.add(name)  # gone from the view, still routed to by this node
                continue
            wanted = self.wildcard or name in self.names
            if resource is not None and wanted:
                send.append(resource)
            elif resource is None and (wanted or name in self.gone):
                removed.append(name)
        return send, removed, lingering


# Per view and type: the view version they were worked out at, and (synced, wildcard, names) ->
# (send, removed). Only the current version's are kept; gone with the view.
_shared: weakref.WeakKeyDictionary[View, dict[str, tuple[int, dict]]] = weakref.WeakKeyDictionary()


def _steps(view: View, type_url: str, version: int) -> dict:
    per_type = _shared.setdefault(view, {})
    entry = per_type.get(type_url)
    if entry is None or entry[0] != version:
        entry = per_type[type_url] = (version, {})
    return entry[1]


class Interner:
    """One shared copy of a subscription: a thousand nodes asking for the same ten thousand
    endpoint sets hold one set between them, not a thousand."""

    LIMIT = 256

    def __init__(self) -> None:
        self._sets: dict[frozenset[str], frozenset[str]] = {}

    def __call__(self, names: frozenset[str]) -> frozenset[str]:
        if len(self._sets) > self.LIMIT:
            self._sets.clear()  # old subscriptions: sharing resumes with the next ones
        return self._sets.setdefault(names, names)
