"""The versioned resource cache: per-model bundles in, per-scope views out.

Like go-control-plane's snapshot cache behind its `ConfigWatcher`, but incremental: a
change replaces one model's bundle, and each view (see `view.View`) updates only the
resources that bundle touches. Streams hold a view while they serve a node of its scope
(`acquire`/`release`); the last one to leave drops it, so nodes with ever-new metadata do
not grow memory or per-change work. The edge gateways' view (every model) is the exception:
`overspill serve` builds it with the first state and keeps it (`keep`).

Changes that come close together go out as one push: `commit` does not touch the views at
once but schedules a flush, which applies everything committed since the last one to the
views and then wakes every subscribed stream once (see `flush_delay` for when). Streams
woken for any other reason (an ACK) see the views as of the last flush, so a change never
leaks out early and the NACK hold, ordering and make-before-break rules see whole flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import replace

from api.desired import ModelKey
from xds import runtime
from xds.bundle import ModelBundle, Resource
from xds.scope import Scope
from xds.view import View

# A change after a quiet spell waits this long for company, and that is all it adds to its
# latency: the changes one reconcile or a run of watch events commits one by one go together.
SETTLE = 0.002
# During a burst, flushes are at least an interval apart, and the interval grows with the streams
# a flush wakes. A push and its ACK cost this process 0.2 to 0.3 ms per stream (mostly grpc.aio:
# a write and a read, each completing through its poller thread), so 0.5 ms per stream bounds a
# storm's fan-out to about 2,000 pushes a second (half a core or a little more) whatever the
# number of Envoys: 2 flushes a second at 1,000 streams. The floor keeps a burst coalesced for a
# few Envoys; the ceiling keeps any change from waiting more than half a second.
PER_STREAM = 0.0005
MIN_INTERVAL = 0.05
MAX_INTERVAL = 0.5


def flush_delay(since_flush: float, streams: int, settle: float = SETTLE) -> float:
    """Seconds from a commit to its flush, `since_flush` seconds after the last flush: `settle`
    after a quiet spell, else whatever is left of the interval (a burst is pushed in steps)."""
    interval = min(MAX_INTERVAL, max(MIN_INTERVAL, streams * PER_STREAM))
    return max(settle, interval - since_flush)


class ResourceCache:
    """Every model's bundle, and one view per scope of connected nodes."""

    def __init__(
        self,
        listener: Callable[[int | None], Resource],
        shards: int = runtime.SHARDS,
        default_port: int | None = None,
    ):
        self.listener = listener  # the listener for a port (None: the default port)
        self.shards = shards
        self.default_port = default_port  # a node asking for this port is served as one asking none
        self.bundles: dict[ModelKey, ModelBundle] = {}
        self.views: dict[Scope, View] = {}
        self._holders: dict[Scope, int] = {}
        self._subscribers: set[asyncio.Event] = set()
        self._pending: dict[ModelKey, ModelBundle | None] = {}  # committed, not yet in the views
        # When each pending weight change was handed in (the controller publishes as it decides):
        # the start of the decision -> Envoy ACK time (`View.weights_taken`).
        self._decided: dict[ModelKey, float] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flushed_at = -math.inf  # loop time of the last flush
        self.ready = False  # set by the first flush: no stream is answered before a complete state

    def apply(self, changes: dict[ModelKey, ModelBundle | None]) -> None:
        """Take `changes` (None removes a model); the views get them at the next flush. A view built
        meanwhile starts from `bundles`, which has them already."""
        now = time.monotonic()
        for key, bundle in changes.items():
            if bundle is None:
                self.bundles.pop(key, None)
            else:
                old = self.bundles.get(key)
                if old is not None and old.runtime_entry != bundle.runtime_entry:
                    self._decided[key] = now  # the latest decision is the one Envoy will get
                self.bundles[key] = bundle
        self._pending.update(changes)  # a later change of the same model replaces the earlier

    def view(self, scope: Scope) -> View:
        """The view of `scope` with every change applied, built on first use and kept up to date
        while it is held."""
        if self._pending:
            self.flush()
        return self._view(scope)

    def _view(self, scope: Scope) -> View:
        if scope.listener_port is not None and scope.listener_port == self.default_port:
            scope = replace(scope, listener_port=None)  # the same resources: one view, not two
        view = self.views.get(scope)
        if view is None:
            view = View(scope, self.listener(scope.listener_port), self.shards)
            view.apply(dict(self.bundles))
            self.views[scope] = view
        return view

    def keep_weight_inline(self, view: View) -> None:
        """A node of this view does not take the weight layers: keep its routes' inline form."""
        view.keep_weight_inline()

    def acquire(self, scope: Scope) -> View:
        view = self._view(scope)
        self._holders[view.scope] = self._holders.get(view.scope, 0) + 1
        return view

    def keep(self, scope: Scope) -> View:
        """Build the view of `scope` now and hold it for good: the edge gateways' (every model),
        which the first of them would otherwise wait for (0.25 s at 10,000 models) and which would
        be built again after the last one left."""
        return self.acquire(scope)

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
        """Schedule the changes applied so far to reach the views and the streams (see above)."""
        if not self._pending and self.ready:
            return  # nothing changed: nobody needs waking
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop, so no stream to wake: the views are current at once
            self.flush()
            return
        if self._flush is None or self._flush_loop is not loop:  # (a closed loop's timer never fires)
            delay = flush_delay(loop.time() - self._flushed_at, len(self._subscribers))
            self._flush, self._flush_loop = loop.call_later(delay, self.flush), loop

    def flush(self) -> None:
        """Apply every pending change to the views, then wake every stream once, so they see a
        consistent state."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        pending, self._pending = self._pending, {}
        decided, self._decided = self._decided, {}
        if pending:
            for view in self.views.values():
                view.apply(pending, decided)
        with contextlib.suppress(RuntimeError):
            self._flushed_at = asyncio.get_running_loop().time()
        self.ready = True
        for event in self._subscribers:
            event.set()

    def subscribe(self, event: asyncio.Event) -> None:
        self._subscribers.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)
