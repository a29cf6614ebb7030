"""The versioned resource cache: per-model bundles in, per-scope views out.

Like go-control-plane's snapshot cache behind its `ConfigWatcher`, but incremental: a
change replaces one model's bundle, and each view (see `view.View`) updates only the
resources that bundle touches. Streams hold a view while they serve a node of its scope
(`acquire`/`release`); the last one to leave drops it, so nodes with ever-new metadata do
not grow memory or per-change work. A commit wakes every subscribed stream once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from api.desired import ModelKey
from xds import runtime
from xds.bundle import ModelBundle, Resource
from xds.scope import Scope
from xds.view import View


class ResourceCache:
    """Every model's bundle, and one view per scope of connected nodes."""

    def __init__(self, listener: Callable[[int | None], Resource], shards: int = runtime.SHARDS):
        self.listener = listener  # the listener for a port (None: the default port)
        self.shards = shards
        self.bundles: dict[ModelKey, ModelBundle] = {}
        self.views: dict[Scope, View] = {}
        self._holders: dict[Scope, int] = {}
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
        """The view of `scope`, built on first use and kept up to date while it is held."""
        view = self.views.get(scope)
        if view is None:
            view = View(scope, self.listener(scope.listener_port), self.shards)
            view.apply(dict(self.bundles))
            self.views[scope] = view
        return view

    def acquire(self, scope: Scope) -> View:
        self._holders[scope] = self._holders.get(scope, 0) + 1
        return self.view(scope)

    def release(self, view: View) -> None:
        """A node of this scope left; the last one out drops the view."""
        held = self._holders.get(view.scope, 0) - 1
        if held > 0:
            self._holders[view.scope] = held
            return
        self._holders.pop(view.scope, None)
        if self.views.get(view.scope) is view:
            del self.views[view.scope]

    def commit(self) -> None:
        """Wake every stream once after a batch of changes, so they see a consistent state."""
        self.ready = True
        for event in self._subscribers:
            event.set()

    def subscribe(self, event: asyncio.Event) -> None:
        self._subscribers.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)
