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
from xds.identity import Identity, IdentityRules
from xds.sotw import StateOfTheWorld
from xds.stream import Stream, weight_layers_fix
from xds.subscription import Ack, Interner, Nack
from xds.tls import ServerTls
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

    def stream_scoped(self, stream: Stream) -> None:
        """The stream's first request came: its node (if it named one), scope and protocol are known."""

    def acked(self, stream: Stream, ack: Ack) -> None:
        """A response was accepted; `ack` has how long that took, and the weight decisions it carried."""

    def nacked(self, stream: Stream, nack: Nack) -> None: ...

    def scope_denied(self, stream: Stream) -> None:
        """Its certificate denied the node namespaces it asked for (see `Stream.denied`)."""

    def weight_layers(self, stream: Stream) -> None:
        """The node was judged (again) on whether it takes the weight layers (`stream.weight_layers`)."""

    def request_refused(self, stream: Stream, error: str) -> None:
        """A request could not be read or taken; the stream is being closed."""


class RequestRefused(Exception):
    """Ends one stream with a gRPC status: a malformed request (INVALID_ARGUMENT), or one this
    server failed on (INTERNAL). The server and every other stream carry on."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class XdsServer:
    def __init__(
        self,
        cache: ResourceCache,
        callbacks: Callbacks | None = None,
        budget_bytes: int = 64 << 20,
        identities: IdentityRules | None = None,
    ):
        self.cache = cache
        self.callbacks = callbacks or Callbacks()
        self.identities = identities or IdentityRules()  # client certificates (mTLS) -> namespaces
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
            identity = self.identities.identify(context.auth_context())
            try:
                await self.serve(requests, delta, types, context.write, context.peer(), identity)
            except RequestRefused as exc:
                await context.abort(exc.code, exc.details)

        return handle

    async def serve(
        self,
        requests: AsyncIterator,
        delta: bool,
        types: tuple[str, ...],
        send: Callable[[bytes], Awaitable[None]],
        peer: str = "",
        identity: Identity | None = None,
    ) -> None:
        protocol = Delta() if delta else StateOfTheWorld()
        stream = Stream(next(self._ids), self.cache, protocol, types, peer, self._interner, identity)
        self.streams[stream.sid] = stream
        self.callbacks.stream_opened(stream)
        wake = asyncio.Event()  # set by a cache commit, a request, or the reader ending
        self.cache.subscribe(wake)
        reader = asyncio.create_task(self._read(stream, requests, wake))
        reader.add_done_callback(lambda _: wake.set())
        try:
            while True:
                wake.clear()
                for type_url in stream.due(time.monotonic()):
                    # A first sync's share is taken before its response is built: a thousand
                    # Envoys reconnecting at once must not each hold the whole state while they
                    # wait for room. Shares are held until the Envoy answers (see `_read`).
                    owner, first = (stream.sid, type_url), stream.first_size(type_url)
                    if first >= LARGE:
                        await self.budget.acquire(owner, first)
                    payload = stream.respond(type_url)
                    if payload is None:
                        self.budget.release(owner)
                        continue
                    self.callbacks.response_sent(stream, type_url, len(payload))
                    if first < LARGE <= len(payload):
                        await self.budget.acquire(owner, len(payload))
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
        """Take the stream's requests until it ends; a request that cannot be read or taken ends
        this stream alone (`RequestRefused`), with a log line and a count."""
        try:
            async for req in requests:
                try:
                    self._on_request(stream, req, wake)
                except Exception as exc:  # a bug met by one node's request: its stream, not the server
                    raise self._refuse(stream, grpc.StatusCode.INTERNAL, exc) from exc
        except wire.MalformedRequest as exc:  # raised by the deserializer, as the iterator reads
            raise self._refuse(stream, grpc.StatusCode.INVALID_ARGUMENT, exc) from None

    def _refuse(self, stream: Stream, code: grpc.StatusCode, exc: Exception) -> RequestRefused:
        error = str(exc) if isinstance(exc, wire.MalformedRequest) else f"{type(exc).__name__}: {exc}"
        log.error(
            "event=request_refused node=%s peer=%s protocol=%s code=%s error=%r",
            stream.node_id or "-",
            stream.peer,
            stream.protocol.name,
            code.name,
            error,
        )
        self.callbacks.request_refused(stream, error)
        what = "malformed request" if code == grpc.StatusCode.INVALID_ARGUMENT else "request failed"
        return RequestRefused(code, f"{what}: {error}")

    def _on_request(self, stream: Stream, req: wire.Request, wake: asyncio.Event) -> None:
        known, judged, scoped = bool(stream.node_id), stream.weight_layers, stream.view is not None
        sub = stream.types.get(req.type_url)
        before = (sub.pending, sub.names, sub.wildcard) if sub is not None else None
        stream.on_request(req)
        if not known and stream.node_id:
            log.info(
                "event=stream_opened node=%s cluster=%s peer=%s identity=%s protocol=%s scope=%s",
                stream.node_id,
                stream.cluster,
                stream.peer,
                stream.identity.name if stream.identity else "-",
                stream.protocol.name,
                stream.scope,
            )
            if stream.denied:
                _log_denied(stream)
                self.callbacks.scope_denied(stream)
        if not scoped and stream.view is not None:
            self.callbacks.stream_scoped(stream)
        if stream.weight_layers is not judged:
            self._report_weight_layers(stream, judged)
        for ack in stream.acks:
            self.callbacks.acked(stream, ack)
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

    def _report_weight_layers(self, stream: Stream, before: bool | None) -> None:
        layers = stream.view.layer_names if stream.view else []
        if stream.weight_layers is False and not stream.warned_weight_layers and layers:
            stream.warned_weight_layers = True  # once per stream
            log.warning(
                "event=no_weight_layers node=%s cluster=%s peer=%s protocol=%s layers_subscribed=%d/%d"
                " served=weights_in_routes fix=%r",
                stream.node_id,
                stream.cluster,
                stream.peer,
                stream.protocol.name,
                stream.layers_subscribed(),
                len(layers),
                weight_layers_fix(layers),
            )
        elif stream.weight_layers and before is False:
            log.info(
                "event=weight_layers_subscribed node=%s cluster=%s peer=%s",
                stream.node_id,
                stream.cluster,
                stream.peer,
            )
        self.callbacks.weight_layers(stream)


def _log_denied(stream: Stream) -> None:
    def names(namespaces: frozenset[str] | None) -> str:
        return "*" if namespaces is None else ",".join(sorted(namespaces)) or "-"

    assert stream.identity is not None
    log.warning(
        "event=scope_denied node=%s identity=%s asked=%s granted=%s peer=%s",
        stream.node_id,
        stream.identity.name,
        names(stream.asked.namespaces),
        names(stream.scope.namespaces),
        stream.peer,
    )


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


async def start_server(
    xds: XdsServer, host: str, port: int, tls: ServerTls | None = None
) -> tuple[grpc.aio.Server, int]:
    """Serve xDS on host:port: plain, TLS, or mTLS (`tls` with a client CA); raises
    `xds.tls.TlsFileError` if the TLS files cannot be used."""
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
    server.add_generic_rpc_handlers(xds.handlers())
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    await server.start()
    return server, bound
