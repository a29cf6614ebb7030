"""A simulated Envoy on the xDS wire: a thousand real Envoys would not fit on one machine.

Like Envoy a node subscribes to clusters and listeners (wildcard), to the endpoints of the EDS
clusters it holds, to the routing scopes of a listener with scoped routes (wildcard), to the
route configurations its listeners and scopes name, and to the runtime layers it is given, and
ACKs every response. Each node has its own TCP connection, as each Envoy has.

It reads responses as raw bytes with a small protobuf scanner (`xds.wire.fields_of`) and parses
each distinct resource once per process, since every node receives the same bytes. Decoding
with envoy-data-plane costs about 25 us per `Any` and 0.2 ms per Cluster (seconds per node at
10,000 models), so only a node made with `decode=True` holds envoy-data-plane messages.

For protocol tests a node can NACK (`reject` a whole response, or the resources `invalid` finds
fault with while applying the valid ones, as Envoy does), be slow (`ack_delay`, `pause`/`resume`),
change its subscriptions (`subscribe`) and reconnect holding what an earlier node held
(`reconnect_from`, which sends Delta's `initial_resource_versions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration, ScopedRouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpConnectionManager
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from envoy_data_plane.envoy.service.runtime.v3 import Runtime
from envoy_data_plane.google.protobuf import Struct
from envoy_data_plane.google.rpc import Status

from xds import runtime, wire
from xds.resources import listener
from xds.types import CLUSTER, ENDPOINT, LISTENER, NAMED, PUSH_ORDER, ROUTE, RUNTIME, SCOPED_ROUTE

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
MESSAGES = {
    CLUSTER: Cluster,
    ENDPOINT: ClusterLoadAssignment,
    LISTENER: Listener,
    SCOPED_ROUTE: ScopedRouteConfiguration,
    ROUTE: RouteConfiguration,
    RUNTIME: Runtime,
}
EDS_TYPE = 3  # Cluster.DiscoveryType.EDS
INVALID_ARGUMENT = 3  # the status code of Envoy's NACKs
# Each node its own TCP connection, as each Envoy has; grpc shares one between channels otherwise.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 512 << 20)]

scan = wire.fields_of


# --- resources, parsed once per process ---------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """What a node takes from one resource: its name, whether it is an EDS cluster, the route
    configurations a listener or scope names, whether a listener has scoped routes, a runtime
    layer's values (key -> percent)."""

    name: str
    eds: bool = False
    routes: frozenset[str] = frozenset()
    scoped: bool = False
    values: dict[str, float] = field(default_factory=dict)


_parsed: dict[tuple[str, bytes], Info] = {}  # per process: every node receives the same resource bytes
_names: dict[tuple[type, tuple[str, ...]], bytes] = {}
# (layer held, layer received) -> (that pair, keys gone, keys changed): nodes in step take the same
# steps, so each is worked out once per process, not once per node (a layer has N/64 keys).
_steps: dict[tuple[int, int], tuple[tuple[Info | None, Info | None], tuple[str, ...], dict[str, float]]] = {}


def forget() -> None:
    """Drop what this process parsed, so the next node pays for parsing as a new Envoy does."""
    _parsed.clear()
    _names.clear()
    _steps.clear()


def _step(before: Info | None, after: Info | None) -> tuple[tuple[str, ...], dict[str, float]]:
    """What taking layer `after` over `before` changes: keys gone, and keys with a new value. The
    entry holds both Infos, so their ids stay theirs while it lives."""
    found = _steps.get((id(before), id(after)))
    if found is None:
        old = before.values if before is not None else {}
        new = after.values if after is not None else {}
        gone = tuple(k for k in old if k not in new)
        changed = {k: v for k, v in new.items() if old.get(k) != v}
        found = _steps[(id(before), id(after))] = ((before, after), gone, changed)
    return found[1], found[2]


def warm_up() -> None:
    """Load envoy-data-plane's listener classes once (pydantic builds them on first use, ~0.3 s),
    so that the first timed node is not charged for it."""
    _routes_of(listener("0.0.0.0", 10000))


def _info(type_url: str, body: bytes) -> Info:
    key = (type_url, body)
    found = _parsed.get(key)
    if found is None:
        found = _parsed[key] = _parse(type_url, body)
    return found


def _parse(type_url: str, body: bytes) -> Info:
    if type_url == CLUSTER:
        fields = dict(scan(body))
        return Info(fields.get(1, b"").decode(), eds=fields.get(2) == EDS_TYPE)
    if type_url == RUNTIME:
        name, layer = _text(body, 1), _field(body, 2)
        return Info(name, values={_text(e, 1): _percent(_field(e, 2)) for _, e in scan(layer)})
    if type_url == LISTENER:
        routes, scoped = _routes_of(body)
        return Info(_text(body, 1), routes=frozenset(routes), scoped=scoped)
    if type_url == SCOPED_ROUTE:  # name=1, route_configuration_name=2
        return Info(_text(body, 1), routes=frozenset((_text(body, 2),)))
    return Info(_text(body, 1))  # RouteConfiguration: name; ClusterLoadAssignment: cluster_name


def _routes_of(listener: bytes) -> tuple[set[str], bool]:
    """The route configurations a listener names, and whether it takes scoped routes over SRDS
    (one small resource: decoded with envoy-data-plane)."""
    routes, scoped = set(), False
    for chain in Listener.FromString(listener).filter_chains:
        for f in chain.filters:
            hcm = f.typed_config.unpack()
            if not isinstance(hcm, HttpConnectionManager):
                continue
            if hcm.rds is not None:
                routes.add(hcm.rds.route_config_name)
            scoped |= hcm.scoped_routes is not None and hcm.scoped_routes.scoped_rds is not None
    return routes, scoped


def _text(buf: bytes, number: int) -> str:
    return next((v.decode() for n, v in scan(buf) if n == number), "")


def _field(buf: bytes, number: int) -> bytes:
    return next((v for n, v in scan(buf) if n == number), b"")


def _percent(value: bytes) -> float:
    """A runtime `Value` as the percent Envoy reads: a number, or a FractionalPercent struct."""
    fields = dict(scan(value))
    if 2 in fields:  # number_value
        return struct.unpack("<d", fields[2])[0]
    entries = {_text(e, 1): dict(scan(_field(e, 2))) for _, e in scan(fields.get(5, b""))}
    numerator = struct.unpack("<d", entries.get("numerator", {}).get(2, bytes(8)))[0]
    denominator = entries.get("denominator", {}).get(3, b"HUNDRED").decode()
    return numerator / {"HUNDRED": 1, "TEN_THOUSAND": 100, "MILLION": 10_000}[denominator]


# --- the wire -----------------------------------------------------------------------------------


class Response(NamedTuple):
    """A response's resources as parallel lists: no object per resource (thousands per response)."""

    type_url: str
    version: str  # SotW `version_info`, Delta `system_version_info`
    nonce: str
    names: list[str]
    versions: list[str]  # Delta's per-resource versions ("" in SotW)
    infos: list[Info]
    bodies: list[bytes]  # the serialized resources (`Any.value`)
    removed: list[str]


def read_response(raw: bytes, delta: bool) -> Response:
    """`DiscoveryResponse{version_info=1, resources=2 (Any), type_url=4, nonce=5}` or
    `DeltaDiscoveryResponse{system_version_info=1, resources=2, type_url=4, nonce=5,
    removed_resources=6}` whose resources are `Resource{version=1, resource=2 (Any), name=3}`."""
    version, type_url, nonce, wrapped, removed = "", "", "", [], []
    for n, v in scan(raw):
        if n == 1:
            version = v.decode()
        elif n == 2:
            wrapped.append(v)
        elif n == 4:
            type_url = v.decode()
        elif n == 5:
            nonce = v.decode()
        elif n == 6 and delta:
            removed.append(v.decode())
    names, versions, infos, bodies = [], [], [], []
    for w in wrapped:  # after the loop: the type URL may come after the resources
        if delta:
            fields = dict(scan(w))
            body = _field(fields.get(2, b""), 2)
            names.append(fields.get(3, b"").decode())
            versions.append(fields.get(1, b"").decode())
        else:
            body = _field(w, 2)
        bodies.append(body)
        infos.append(_info(type_url, body))
    if not delta:  # SotW names a resource only inside it
        names = [i.name for i in infos]
        versions = [""] * len(names)
    return Response(type_url, version, nonce, names, versions, infos, bodies, removed)


def encode(req: DiscoveryRequest | DeltaDiscoveryRequest | bytes) -> bytes:
    """Serialize a request (an ACK comes framed already, see `_ack`); a long name list (SotW EDS names
    every cluster) is serialized once per process and appended, since protobuf merges concatenated
    messages."""
    if isinstance(req, bytes):
        return req
    attr = "resource_names" if isinstance(req, DiscoveryRequest) else "resource_names_subscribe"
    names = tuple(getattr(req, attr))
    if len(names) < 8:
        return bytes(req)
    key = (type(req), names)
    tail = _names.get(key)
    if tail is None:
        tail = _names[key] = bytes(type(req)(**{attr: list(names)}))
    setattr(req, attr, [])
    return bytes(req) + tail


def _merged(old: dict, keep: Iterable[str] | None, new: dict, gone: Iterable[str]) -> dict:
    """`old` (or only its `keep` names), updated with `new`, without `gone`: a new dict."""
    out = dict(old) if keep is None else {n: old[n] for n in keep if n in old}
    out.update(new)
    for name in gone:
        out.pop(name, None)
    return out


# --- the node -----------------------------------------------------------------------------------


@dataclass
class Received:
    """One response as the node took it."""

    type_url: str
    version: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    at: float
    nacked: bool
    size: int


@dataclass(eq=False)
class SimEnvoy:
    """One simulated node.

    `held[type][name]` is what it has applied: an `Info`, or with `decode` the envoy-data-plane
    message. `runtime_values` are its runtime layers merged (key -> percent; a model at 0 % has
    no key); `on_runtime(key, percent, monotonic time)` fires on each change, with 0 when a key
    goes. `reject` and `invalid` see resources as `held` does.
    """

    target: str
    node_id: str = "sim"
    delta: bool = False
    metadata: dict | None = None  # the node's metadata (the server scopes nodes by it)
    credentials: grpc.ChannelCredentials | None = None  # TLS, with a client certificate for mTLS
    layers: tuple[str, ...] = tuple(runtime.layer_names())
    decode: bool = False  # hold envoy-data-plane messages, for callers that look inside resources
    reject: Callable[[str, dict], str | None] | None = None  # (type, resources) -> NACK message or None
    # (type, name, resource) -> error or None: as Envoy (and gRPC, A46) validate resources one by one,
    # a response with invalid ones is NACKed with their errors while its valid ones are applied.
    invalid: Callable[[str, str, object], str | None] | None = None
    ack_delay: float = 0.0  # seconds between taking a response and answering it (ACK/NACK, subscriptions)
    # Keep `received` and Delta's `resource_versions` (what tests and `reconnect_from` read): megabytes
    # per node at 10,000 models, which a thousand benchmark nodes do without.
    record: bool = True
    on_runtime: Callable[[str, float, float], None] | None = None
    runtime_values: dict[str, float] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    # Delta: type -> name -> version of what it holds (sent as `initial_resource_versions` on reconnect)
    resource_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    received_bytes: int = 0  # to cross-check the server's counter
    ended: str = ""  # why the stream ended, once it has
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _infos: dict[str, dict[str, Info]] = field(default_factory=lambda: {t: {} for t in PUSH_ORDER})
    _messages: dict[str, dict[str, object]] = field(default_factory=lambda: {t: {} for t in PUSH_ORDER})
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (send no earlier than, request)
    _running: asyncio.Event = field(default_factory=asyncio.Event)  # clear while paused
    _resumed: dict[str, set[str]] = field(default_factory=dict)  # subscriptions taken over
    _scope_routes: dict[str, int] = field(default_factory=dict)  # route configuration -> scopes naming it
    _subscribed: dict[str, set[str]] = field(default_factory=dict)
    _versions: dict[str, str] = field(default_factory=dict)  # SotW: last version ACKed, per type
    _nonces: dict[str, str] = field(default_factory=dict)
    _framed_names: dict[str, tuple[set[str], bytes]] = field(default_factory=dict)  # for `_ack`, per type
    _channel: grpc.aio.Channel | None = None
    _task: asyncio.Task | None = None

    @property
    def held(self) -> dict[str, dict]:
        return self._messages if self.decode else self._infos

    async def start(self) -> None:
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(self.target, self.credentials, options=CHANNEL_OPTIONS)
        method = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        self._call = self._channel.stream_stream(ADS + method, request_serializer=encode)(self._requests())
        node = Node(id=self.node_id, cluster="sim")
        if self.metadata:
            node.metadata = Struct.from_dict(self.metadata)
        self._running.set()
        initial = {CLUSTER: set(), LISTENER: set(), RUNTIME: set(self.layers), **self._resumed}
        for type_url, names in initial.items():
            if type_url == RUNTIME and not names:
                continue
            self._subscribe(type_url, names, node=node)
            node = None  # the first request only
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self._queue.put_nowait(None)  # ends the request stream (gRPC's task waiting on it too)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel:
            await self._channel.close()

    def pause(self) -> None:
        """Stop reading responses and sending requests, as a stuck node does, until `resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def subscribe(self, type_url: str, names: set[str]) -> None:
        """Subscribe to exactly `names` of a named type (Delta sends the difference)."""
        self._subscribe(type_url, set(names))

    def reconnect_from(self, previous: SimEnvoy) -> None:
        """Before `start`: come back as `previous` (a stopped node) would after a reconnect,
        holding what it held (in the same form), subscribing at once to what it subscribed to,
        and telling the server what it has (Delta: `initial_resource_versions`; SotW:
        `version_info`)."""
        self.decode = previous.decode
        self._infos = {t: dict(r) for t, r in previous._infos.items()}
        self._scope_routes = dict(previous._scope_routes)
        self._messages = {t: dict(r) for t, r in previous._messages.items()}
        self.resource_versions = {t: dict(v) for t, v in previous.resource_versions.items()}
        self.runtime_values = dict(previous.runtime_values)
        self._versions = dict(previous._versions)
        self._resumed = {t: set(n) for t, n in previous._subscribed.items()}

    async def wait(self, predicate: Callable[[SimEnvoy], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.ended:  # fail now rather than at the timeout
                raise ConnectionError(f"{self.node_id}: {self.ended}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.node_id}: condition not met within {timeout}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    # --- requests ---

    async def _requests(self) -> AsyncIterator[DiscoveryRequest | DeltaDiscoveryRequest]:
        while (item := await self._queue.get()) is not None:
            due, req = item
            await self._running.wait()
            if (left := due - time.monotonic()) > 0:
                await asyncio.sleep(left)
            yield req

    def _send(self, req: DiscoveryRequest | DeltaDiscoveryRequest | bytes, delay: float = 0.0) -> None:
        self._queue.put_nowait((time.monotonic() + delay, req))

    def _subscribe(
        self, type_url: str, names: set[str], node: Node | None = None, delay: float = 0.0
    ) -> None:
        """SotW names the whole set with its last version and nonce; Delta the difference, and the
        first time the versions it holds."""
        old = self._subscribed.get(type_url)
        self._subscribed[type_url] = names
        if type_url in NAMED:  # as Envoy: what it no longer asks for, it forgets
            if gone := self._infos[type_url].keys() - names:
                self._hold(type_url, {}, {}, gone=gone, now=time.monotonic())
        if self.delta:
            if old is None:
                req = DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=sorted(names),
                    initial_resource_versions=dict(self.resource_versions.get(type_url, {})),
                )
            else:
                req = DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=sorted(names - old),
                    resource_names_unsubscribe=sorted(old - names),
                )
                if not req.resource_names_subscribe and not req.resource_names_unsubscribe:
                    return
        else:
            if old == names:
                return
            req = DiscoveryRequest(
                type_url=type_url,
                resource_names=sorted(names),
                version_info=self._versions.get(type_url, ""),
                response_nonce=self._nonces.get(type_url, ""),
            )
        if node is not None:
            req.node = node
        self._send(req, delay)

    # --- responses ---

    async def _read(self) -> None:
        # `read()`, not `async for`: grpc's response iterator keeps the last message alive while it
        # waits for the next, megabytes per idle node at 10,000 models.
        try:
            while (raw := await self._call.read()) is not grpc.aio.EOF:
                await self._running.wait()
                now = time.monotonic()
                self.received_bytes += len(raw)
                self._on_response(raw, now)
                self.changed.set()
                del raw
            self.ended = "the server ended the stream"
        except grpc.aio.AioRpcError as e:
            self.ended = f"{e.code().name}: {e.details()}"
        finally:
            self.ended = self.ended or "stopped"
            self.changed.set()

    def _on_response(self, raw: bytes, now: float) -> None:
        resp = read_response(raw, self.delta)
        type_url = resp.type_url
        infos = dict(zip(resp.names, resp.infos, strict=True))
        if self.decode:
            message = MESSAGES[type_url].FromString
            resources = {n: message(body) for n, body in zip(resp.names, resp.bodies, strict=True)}
        else:
            resources = infos
        vetoed = self.reject(type_url, resources) if self.reject else None
        bad = {}
        if self.invalid is not None:
            bad = {n: e for n, m in resources.items() if (e := self.invalid(type_url, n, m)) is not None}
        error = vetoed or "; ".join(bad.values()) or None
        if self.record:
            received = Received(
                type_url, resp.version, tuple(infos), tuple(resp.removed), now, error is not None, len(raw)
            )
            self.received.append(received)
        if vetoed is None:
            good = {n: i for n, i in infos.items() if n not in bad} if bad else infos
            if self.delta:  # what changed, and what is gone
                versions = dict(zip(resp.names, resp.versions, strict=True))
                self._hold(type_url, good, resources, versions, gone=resp.removed, now=now)
            elif type_url in NAMED:  # what changed; absent ones are kept (as Envoy does)
                wanted = self._subscribed.get(type_url, set())
                if not good.keys() <= wanted:
                    good = {n: i for n, i in good.items() if n in wanted}
                self._hold(type_url, good, resources, now=now)
            else:  # clusters and listeners: the whole state; an invalid one stays as it was
                self._hold(type_url, good, resources, keep=bad, now=now)
        if not self.delta:
            self._nonces[type_url] = resp.nonce
            if error is None:
                self._versions[type_url] = resp.version
        if error is None:
            self._send(self._ack(type_url, resp.nonce), self.ack_delay)
        elif self.delta:
            req = DeltaDiscoveryRequest(type_url=type_url, response_nonce=resp.nonce)
            req.error_detail = Status(code=INVALID_ARGUMENT, message=error)
            self._send(req, self.ack_delay)
        else:
            req = DiscoveryRequest(
                type_url=type_url,
                response_nonce=resp.nonce,
                version_info=self._versions.get(type_url, ""),
                resource_names=sorted(self._subscribed.get(type_url, ())),
                error_detail=Status(code=INVALID_ARGUMENT, message=error),
            )
            self._send(req, self.ack_delay)
        self._follow(type_url)

    def _ack(self, type_url: str, nonce: str) -> bytes:
        """An ACK framed by hand, fields in number order as Envoy writes them: building it with
        envoy-data-plane (pydantic) costs more than the rest of taking a response."""
        if self.delta:  # DeltaDiscoveryRequest{type_url=2, response_nonce=6}
            return wire.text(2, type_url) + wire.text(6, nonce)
        names = self._subscribed.get(type_url, set())
        framed = self._framed_names.get(type_url)
        if framed is None or framed[0] is not names:
            framed = self._framed_names[type_url] = (
                names,
                b"".join(wire.field(3, n.encode()) for n in sorted(names)),
            )
        # DiscoveryRequest{version_info=1, resource_names=3, type_url=4, response_nonce=5}
        return (
            wire.text(1, self._versions.get(type_url, ""))
            + framed[1]
            + wire.text(4, type_url)
            + wire.text(5, nonce)
        )

    def _hold(
        self,
        type_url: str,
        infos: dict[str, Info],
        messages: dict[str, object],
        versions: dict[str, str] | None = None,
        gone: Iterable[str] = (),
        keep: Iterable[str] | None = None,
        now: float = 0.0,
    ) -> None:
        """Take `infos` (with `decode`, their `messages`; in Delta, their `versions`) over what is
        held (or only its `keep` names) and forget `gone`; then apply the runtime layers that changed.
        New dicts rather than updates in place: the runtime layers are compared with the old ones."""
        old = self._infos[type_url]
        self._infos[type_url] = _merged(old, keep, infos, gone)
        if self.decode:
            taken = {n: messages[n] for n in infos}
            self._messages[type_url] = _merged(self._messages[type_url], keep, taken, gone)
        if self.delta and self.record:
            taken = {n: versions[n] for n in infos} if versions else {}
            self.resource_versions[type_url] = _merged(
                self.resource_versions.get(type_url, {}), keep, taken, gone
            )
        if type_url == RUNTIME:
            touched = (
                old.keys() | self._infos[type_url].keys() if keep is not None else infos.keys() | set(gone)
            )
            self._apply_runtime(old, touched, now)
        elif type_url == SCOPED_ROUTE:
            changed = set(infos).union(gone)
            if keep is not None:
                changed |= old.keys() - self._infos[type_url].keys()
            self._count_scope_routes(old, changed)

    def _count_scope_routes(self, old: dict[str, Info], changed: Iterable[str]) -> None:
        """Keep count of the scopes naming each route configuration, for the scopes that changed
        (not all forty thousand again for each new model)."""
        new, counts = self._infos[SCOPED_ROUTE], self._scope_routes
        for name in changed:
            before, after = old.get(name), new.get(name)
            if before is after:
                continue
            for route in after.routes if after is not None else ():
                counts[route] = counts.get(route, 0) + 1
            for route in before.routes if before is not None else ():
                counts[route] -= 1
                if not counts[route]:
                    del counts[route]

    def _apply_runtime(self, old: dict[str, Info], touched: Iterable[str], now: float) -> None:
        """Take the values of the layers that changed (among `touched`). `xds.runtime` puts each key in
        one layer, so a key a layer drops is gone: it reads as its route's default, 0 %, as in Envoy."""
        new = self._infos[RUNTIME]
        for name in touched:
            before, after = old.get(name), new.get(name)
            if before is after:
                continue
            gone, values = _step(before, after)
            for key in gone:
                if self.runtime_values.pop(key, None) is not None and self.on_runtime is not None:
                    self.on_runtime(key, 0.0, now)
            for key, value in values.items():
                if self.runtime_values.get(key) != value:
                    self.runtime_values[key] = value
                    if self.on_runtime is not None:
                        self.on_runtime(key, value, now)

    def _follow(self, type_url: str) -> None:
        """As Envoy: subscribe to the endpoints of the EDS clusters, to the scopes of listeners with
        scoped routes, and to the route configurations the listeners and scopes name."""
        if type_url == CLUSTER:
            eds = {n for n, i in self._infos[CLUSTER].items() if i.eds}
            self._subscribe(ENDPOINT, eds, delay=self.ack_delay)
            return
        if type_url == LISTENER:
            scoped = any(i.scoped for i in self._infos[LISTENER].values())
            if scoped and SCOPED_ROUTE not in self._subscribed:
                self._subscribe(SCOPED_ROUTE, set(), delay=self.ack_delay)  # wildcard
        elif type_url != SCOPED_ROUTE:
            return
        routes = set(self._scope_routes).union(*(i.routes for i in self._infos[LISTENER].values()))
        if routes or ROUTE in self._subscribed:
            self._subscribe(ROUTE, routes, delay=self.ack_delay)
