"""A simulated Envoy cheap enough to run a thousand of beside the control plane on two cores.

`overspill.demo.xds_client.SimEnvoy(decode=False)` still parses every response with
envoy-data-plane (about 25 us per resource: 0.5 s for one SotW CDS response at 10,000 models),
never follows clusters to their endpoints or listeners to their routes, and never reports
runtime values. `FleetEnvoy` subscribes and ACKs as SimEnvoy does (envoy-data-plane request
messages) but reads responses as raw bytes with a small protobuf scanner, parses each
distinct resource once per process (every node receives the same bytes), and reports the
runtime values it takes, as Envoy applies them.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpConnectionManager
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest

from xds import runtime, wire
from xds.resources import listener
from xds.types import CLUSTER, ENDPOINT, LISTENER, NAMED, PUSH_ORDER, ROUTE, RUNTIME

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"

EDS_TYPE = 3  # Cluster.DiscoveryType.EDS
# Each node its own TCP connection, as each Envoy has; grpc shares one between channels otherwise.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 512 << 20)]


scan = wire.fields_of


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


@dataclass(frozen=True)
class Info:
    """What a node takes from one resource: its name, whether it is an EDS cluster, runtime values."""

    name: str
    eds: bool = False
    routes: frozenset[str] = frozenset()
    values: dict[str, float] = field(default_factory=dict)


_infos: dict[tuple[str, bytes], Info] = {}  # per process: every node receives the same resource bytes
_names: dict[tuple[type, tuple[str, ...]], bytes] = {}


def forget() -> None:
    """Drop what this process parsed, so the next node pays for parsing as a new Envoy does."""
    _infos.clear()
    _names.clear()


def warm_up() -> None:
    """Load envoy-data-plane's listener classes once (pydantic builds them on first use, ~0.3 s),
    so that the first timed node is not charged for it."""
    _routes_of(bytes(listener("0.0.0.0", 10000)))


def _info(type_url: str, body: bytes) -> Info:
    """Parse a serialized resource once per process."""
    key = (type_url, body)
    found = _infos.get(key)
    if found is None:
        found = _infos[key] = _parse(type_url, body)
    return found


def _parse(type_url: str, body: bytes) -> Info:
    if type_url == CLUSTER:
        fields = dict(scan(body))
        return Info(fields.get(1, b"").decode(), eds=fields.get(2) == EDS_TYPE)
    if type_url == RUNTIME:
        name, layer = _text(body, 1), _field(body, 2)
        return Info(name, values={_text(e, 1): _percent(_field(e, 2)) for _, e in scan(layer)})
    if type_url == LISTENER:
        return Info(_text(body, 1), routes=_routes_of(body))
    return Info(_text(body, 1))  # Listener, RouteConfiguration: name; ClusterLoadAssignment: cluster_name


def _routes_of(listener: bytes) -> set[str]:
    """The route configurations a listener names (one small resource: decoded with envoy-data-plane)."""
    routes = set()
    for chain in Listener.FromString(listener).filter_chains:
        for f in chain.filters:
            hcm = f.typed_config.unpack()
            if isinstance(hcm, HttpConnectionManager) and hcm.rds is not None:
                routes.add(hcm.rds.route_config_name)
    return routes


def encode(req: DiscoveryRequest | DeltaDiscoveryRequest) -> bytes:
    """Serialize a request; a long name list (SotW EDS names every cluster) is serialized once per
    process and appended, since protobuf merges concatenated messages."""
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


@dataclass
class FleetEnvoy:
    """One simulated node: `held[type]` maps the names it holds to their `Info`, `runtime_values`
    the runtime keys to percents; `on_runtime(key, percent, monotonic time)` fires on a change."""

    target: str
    node_id: str = "fleet"
    delta: bool = False
    layers: tuple[str, ...] = tuple(runtime.layer_names())
    on_runtime: Callable[[str, float, float], None] | None = None
    held: dict[str, dict[str, Info]] = field(default_factory=lambda: {t: {} for t in PUSH_ORDER})
    runtime_values: dict[str, float] = field(default_factory=dict)
    received_bytes: int = 0  # to cross-check the server's counter
    ended: str = ""  # why the stream ended, once it has
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _subscribed: dict[str, set[str]] = field(default_factory=dict)
    _versions: dict[str, str] = field(default_factory=dict)
    _nonces: dict[str, str] = field(default_factory=dict)
    _channel: grpc.aio.Channel | None = None
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        method = "DeltaAggregatedResources" if self.delta else "StreamAggregatedResources"
        self._call = self._channel.stream_stream(ADS + method, request_serializer=encode)(self._requests())
        self._subscribe(CLUSTER, set(), node=Node(id=self.node_id, cluster="sim"))
        self._subscribe(LISTENER, set())
        self._subscribe(RUNTIME, set(self.layers))
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel:
            await self._channel.close()

    async def wait(self, predicate: Callable[[FleetEnvoy], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if self.ended:  # fail now rather than at the timeout
                raise ConnectionError(f"{self.node_id}: {self.ended}")
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(deadline - time.monotonic(), 0.001))

    def holds(self, models: int) -> bool:
        """The whole state of `models` models with a remote each: clusters, endpoints, routes, weights."""
        held = self.held
        return (
            len(held[CLUSTER]) == 2 * models
            and len(held[ENDPOINT]) == models
            and len(held[ROUTE]) == 1
            and len(held[RUNTIME]) == len(self.layers)
            and len(self.runtime_values) == models
        )

    async def _requests(self) -> AsyncIterator[DiscoveryRequest | DeltaDiscoveryRequest]:
        while (req := await self._queue.get()) is not None:
            yield req

    def _subscribe(self, type_url: str, names: set[str], node: Node | None = None) -> None:
        """As SimEnvoy: SotW names the whole set with its last version and nonce, Delta the difference."""
        old = self._subscribed.get(type_url)
        self._subscribed[type_url] = names
        if type_url in NAMED:  # what it no longer asks for, it forgets
            self.held[type_url] = {n: i for n, i in self.held[type_url].items() if n in names}
        if self.delta:
            req = DeltaDiscoveryRequest(
                type_url=type_url,
                resource_names_subscribe=sorted(names - (old or set())),
                resource_names_unsubscribe=sorted((old or set()) - names),
            )
            if old is not None and not req.resource_names_subscribe and not req.resource_names_unsubscribe:
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
        self._queue.put_nowait(req)

    async def _read(self) -> None:
        # `read()`, not `async for`: grpc's response iterator keeps the last message alive while it
        # waits for the next, megabytes per idle node at 10,000 models.
        try:
            while (raw := await self._call.read()) is not grpc.aio.EOF:
                now = time.monotonic()
                self.received_bytes += len(raw)
                (self._on_delta if self.delta else self._on_sotw)(raw, now)
                self.changed.set()
                del raw
            self.ended = "the server ended the stream"
        except grpc.aio.AioRpcError as e:
            self.ended = f"{e.code().name}: {e.details()}"
        finally:
            self.ended = self.ended or "stopped"
            self.changed.set()

    def _on_sotw(self, raw: bytes, now: float) -> None:
        version, type_url, nonce, bodies = "", "", "", []
        for n, v in scan(raw):
            if n == 1:
                version = v.decode()
            elif n == 2:
                bodies.append(_field(v, 2))  # Any.value
            elif n == 4:
                type_url = v.decode()
            elif n == 5:
                nonce = v.decode()
        taken = {(info := _info(type_url, body)).name: info for body in bodies}
        old = self.held[type_url]
        if type_url in NAMED:  # these carry what changed; the others are kept (as Envoy does)
            wanted = self._subscribed.get(type_url, set())
            taken = {n: i for n, i in {**old, **taken}.items() if n in wanted}
        self.held[type_url] = taken
        self._versions[type_url], self._nonces[type_url] = version, nonce
        self._applied(type_url, old, now)
        names = sorted(self._subscribed.get(type_url, ()))
        self._queue.put_nowait(
            DiscoveryRequest(
                type_url=type_url, response_nonce=nonce, version_info=version, resource_names=names
            )
        )
        self._follow(type_url)

    def _on_delta(self, raw: bytes, now: float) -> None:
        type_url, nonce, bodies, removed = "", "", [], []
        for n, v in scan(raw):
            if n == 2:
                bodies.append(v)  # discovery.v3.Resource
            elif n == 4:
                type_url = v.decode()
            elif n == 5:
                nonce = v.decode()
            elif n == 6:
                removed.append(v.decode())
        old = self.held[type_url]
        held = self.held[type_url] = dict(old)
        for body in bodies:
            fields = dict(scan(body))
            held[fields[3].decode()] = _info(type_url, _field(fields[2], 2))
        for name in removed:
            held.pop(name, None)
        self._applied(type_url, old, now)
        self._queue.put_nowait(DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce))
        self._follow(type_url)

    def _applied(self, type_url: str, old: dict[str, Info], now: float) -> None:
        """Report the runtime keys whose value changed, looking only at layers that changed."""
        if type_url != RUNTIME:
            return
        for name, info in self.held[RUNTIME].items():
            before = old.get(name)
            if before is info:
                continue
            previous = before.values if before is not None else {}
            for key, value in info.values.items():
                if previous.get(key) != value:
                    self.runtime_values[key] = value
                    if self.on_runtime:
                        self.on_runtime(key, value, now)

    def _follow(self, type_url: str) -> None:
        """As Envoy: subscribe to the endpoints of the EDS clusters and the routes the listeners name."""
        if type_url == CLUSTER:
            self._subscribe(ENDPOINT, {n for n, i in self.held[CLUSTER].items() if i.eds})
        elif type_url == LISTENER:
            self._subscribe(ROUTE, set().union(*(i.routes for i in self.held[LISTENER].values())))
