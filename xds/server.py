"""The gRPC xDS server on `grpc.aio`: ADS and the single-type services, state of the world and Delta.

Each stream is one task reading requests and one loop answering them from the latest view
(see `stream.Stream`); a stream never waits for another, so a stuck node delays nobody.
What happens on the streams is reported through `Callbacks` (as go-control-plane's server
does), so the app decides what to count, log and show; the server imports none of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from xds import wire
from xds.cache import ResourceCache
from xds.delta import Delta
from xds.sotw import StateOfTheWorld
from xds.stream import Stream
from xds.subscription import Interner, Nack
from xds.types import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, RUNTIME, SCOPED_ROUTE, SHORT

log = logging.getLogger("overspill.xds")
LARGE = 256 << 10  # responses from this size on are written within the shared byte budget

# gRPC service -> (state-of-the-world method, Delta method, types it serves)
SERVICES = {
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (
        "StreamAggregatedResources", "DeltaAggregatedResources", PUSH_ORDER),
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("StreamClusters", "DeltaClusters", (CLUSTER,)),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("StreamEndpoints", "DeltaEndpoints", (ENDPOINT,)),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("StreamListeners", "DeltaListeners", (LISTENER,)),
    "envoy.service.route.v3.RouteDiscoveryService": ("StreamRoutes", "DeltaRoutes", (ROUTE,)),
    "envoy.service.route.v3.ScopedRoutesDiscoveryService": (
        "StreamScopedRoutes", "DeltaScopedRoutes", (SCOPED_ROUTE,)),
    "envoy.service.runtime.v3.RuntimeDiscoveryService": ("StreamRuntime", "DeltaRuntime", (RUNTIME,)),
}  # fmt: skip


def _raw(b: bytes) -> bytes:
    return b  # responses are framed bytes already


class ByteBudget:
    """Bounds the bytes of large responses that Envoys have not yet answered, across all streams.

    A thousand Envoys connecting together would each be handed the whole state (megabytes at
    ten thousand models) and gRPC would buffer it all until they read it; with a budget they
    take turns and the control plane's memory stays bounded. A share is given back when the
    Envoy answers the response, or after `STALE` seconds, so a stuck Envoy cannot starve the
    others. A response larger than the whole budget goes alone. Waiters are served in turn and
    woken only when their share fits: waking all of them on every release cost O(waiters) each
    time, O(M^2) when M Envoys connect at once.
    """

    STALE = 10.0

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        # (stream, type) -> (bytes, since), oldest first (a share taken again moves to the end)
        self._shares: dict[tuple[int, str], tuple[int, float]] = {}
        self._waiters: collections.deque[tuple[tuple[int, str], int, asyncio.Future]] = collections.deque()

    async def acquire(self, owner: tuple[int, str], size: int) -> None:
        self.release(owner)
        if not self._waiters and self._fits(size):
            self._take(owner, size)
            return
        entry = (owner, size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            while not entry[2].done():  # `_wake` takes its share for it when it fits
                await asyncio.wait({entry[2]}, timeout=1.0)
                if not entry[2].done():  # a second gone by: shares held since long ago may be stale
                    self._expire(time.monotonic())
                    self._wake()
        finally:
            if not entry[2].done():
                entry[2].cancel()  # its stream ended: `_wake` skips it

    def release(self, owner: tuple[int, str]) -> None:
        share = self._shares.pop(owner, None)
        if share is not None:
            self.used -= share[0]
            self._wake()

    def _fits(self, size: int) -> bool:
        return not self.used or self.used + size <= self.limit

    def _take(self, owner: tuple[int, str], size: int) -> None:
        old = self._shares.pop(owner, None)
        self.used += size - (old[0] if old else 0)
        self._shares[owner] = (size, time.monotonic())

    def _expire(self, now: float) -> None:
        while self._shares:
            owner, (size, since) = next(iter(self._shares.items()))
            if now - since <= self.STALE:
                return
            del self._shares[owner]
            self.used -= size

    def _wake(self) -> None:
        """Give the waiters their shares in turn, as long as they fit."""
        while self._waiters:
            owner, size, future = self._waiters[0]
            if future.done():  # gone
                self._waiters.popleft()
            elif self._fits(size):
                self._waiters.popleft()
                self._take(owner, size)
                future.set_result(None)
            else:
                return


class Callbacks:
    """What the server reports about its streams; every method is optional (a no-op here)."""

    def stream_opened(self, stream: Stream) -> None:
        """A stream was opened (the node names itself in its first request, which may come later)."""

    def stream_closed(self, stream: Stream) -> None: ...

    def response_sent(self, stream: Stream, type_url: str, size: int) -> None: ...

    def acked(self, stream: Stream, type_url: str) -> None: ...

    def nacked(self, stream: Stream, nack: Nack) -> None: ...


class XdsServer:
    def __init__(
        self, cache: ResourceCache, callbacks: Callbacks | None = None, budget_bytes: int = 64 << 20
    ):
        self.cache = cache
        self.callbacks = callbacks or Callbacks()
        self.budget = ByteBudget(budget_bytes)
        self.streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._interner = Interner()
        self.services: list[grpc.GenericRpcHandler] = []  # other services on the xDS port (LRS)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        out = []
        for service, (sotw, delta, types) in SERVICES.items():
            out.append(grpc.method_handlers_generic_handler(service, {
                sotw: grpc.stream_stream_rpc_method_handler(
                    self._handler(False, types), wire.parse_sotw_request, _raw),
                delta: grpc.stream_stream_rpc_method_handler(
                    self._handler(True, types), wire.parse_delta_request, _raw),
            }))  # fmt: skip
        return out + self.services

    def _handler(self, delta: bool, types: tuple[str, ...]):
        async def handle(requests: AsyncIterator, context) -> None:
            # `context.write`, not `yield`: grpc.aio keeps a yielded message alive until the next
            # yield, so every idle stream would pin its last (megabytes-large) full-sync response.
            await self.serve(requests, delta, types, context.write, context.peer())

        return handle

    async def serve(
        self,
        requests: AsyncIterator,
        delta: bool,
        types: tuple[str, ...],
        send: Callable[[bytes], Awaitable[None]],
        peer: str = "",
    ) -> None:
        protocol = Delta() if delta else StateOfTheWorld()
        stream = Stream(next(self._ids), self.cache, protocol, types, peer, self._interner)
        self.streams[stream.sid] = stream
        self.callbacks.stream_opened(stream)
        wake = asyncio.Event()  # set by a cache commit, a request, or the reader ending
        self.cache.subscribe(wake)
        reader = asyncio.create_task(self._read(stream, requests, wake))
        reader.add_done_callback(lambda _: wake.set())
        try:
            while True:
                wake.clear()
                for type_url, payload in stream.next_responses(time.monotonic()):
                    self.callbacks.response_sent(stream, type_url, len(payload))
                    if len(payload) >= LARGE:  # held until the Envoy answers it (see `_read`)
                        await self.budget.acquire((stream.sid, type_url), len(payload))
                    await send(payload)
                payload = b""  # an idle stream must not keep its last response (megabytes) alive
                if reader.done():
                    reader.result()  # a read error ends the stream with it; a clean end just ends
                    return
                if stream.held_route():  # retried on a timer too, so its hold limit is honoured
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), 0.5)
                else:
                    await wake.wait()
        finally:
            for type_url in stream.types:
                self.budget.release((stream.sid, type_url))
            self.cache.unsubscribe(wake)
            reader.cancel()
            self.streams.pop(stream.sid, None)
            stream.close()
            self.callbacks.stream_closed(stream)
            log.info("event=stream_closed node=%s peer=%s", stream.node_id, stream.peer)

    async def _read(self, stream: Stream, requests: AsyncIterator, wake: asyncio.Event) -> None:
        async for req in requests:
            known = bool(stream.node_id)
            sub = stream.types.get(req.type_url)
            before = (sub.pending, sub.names, sub.wildcard) if sub is not None else None
            stream.on_request(req)
            if not known and stream.node_id:
                log.info(
                    "event=stream_opened node=%s cluster=%s peer=%s protocol=%s scope=%s",
                    stream.node_id,
                    stream.cluster,
                    stream.peer,
                    stream.protocol.name,
                    stream.scope,
                )
            for type_url in stream.acks:
                self.callbacks.acked(stream, type_url)
            stream.acks.clear()
            for nack in stream.nacks:
                log.error(
                    "event=nack node=%s type=%s version=%s models=%s error=%r",
                    stream.node_id,
                    SHORT[nack.type_url],
                    nack.version,
                    ",".join(f"{ns}/{n}" for ns, n in nack.models) or "-",
                    nack.message,
                )
                self.callbacks.nacked(stream, nack)
            stream.nacks.clear()
            if sub is not None and not sub.pending:
                self.budget.release((stream.sid, req.type_url))
            if not _plain_ack(stream, req, before):
                wake.set()


def _plain_ack(stream: Stream, req: wire.Request, before: tuple | None) -> bool:
    """Whether `req` only ACKed the response in flight, leaving nothing for the stream to send:
    it then need not wake (with a thousand Envoys, half the wakes of a push were for this). The
    same subscription, nothing newer in the view for its type, no NACK, and nothing that other
    types wait for: routes change which clusters must linger, and a held route waits for ACKs."""
    sub = stream.types.get(req.type_url)
    if sub is None or before is None or stream.view is None or req.type_url == ROUTE:
        return False
    pending, names, wildcard = before
    return (
        pending
        and not sub.pending
        and sub.nack is None
        and sub.names is names
        and sub.wildcard == wildcard
        and not (sub.recheck or sub.gone)
        and sub.sent_version == stream.view.version_of(req.type_url)
        and not stream.held_route()
    )


async def start_server(xds: XdsServer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers(xds.handlers())
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
