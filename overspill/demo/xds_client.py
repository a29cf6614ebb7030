"""A simulated Envoy on the xDS wire: grpcio, envoy-data-plane messages, ACKs as Envoy sends them.

Used by the protocol tests and the benchmark where a thousand real Envoys would not fit on
one machine. Like Envoy it subscribes to clusters and listeners (wildcard), to the
endpoints of the EDS clusters it holds, to the route configurations its listeners name and
to the runtime layers it is given; it ACKs every response, or NACKs those `reject` picks (the
whole response) or that hold resources `invalid` finds fault with (applying the valid ones).

For protocol tests it can also be a slow node (`ack_delay`, `pause`/`resume`), change its
subscriptions (`subscribe`) and reconnect holding what an earlier client held
(`reconnect_from`, which sends Delta's `initial_resource_versions`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Imported for their message types: `Any.unpack` finds only the types that were imported.
import envoy_data_plane.envoy.config.endpoint.v3  # noqa: F401
import envoy_data_plane.envoy.config.route.v3  # noqa: F401
import envoy_data_plane.envoy.service.runtime.v3  # noqa: F401
import grpc
from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpConnectionManager
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from envoy_data_plane.google.protobuf import Struct
from envoy_data_plane.google.rpc import Status

from xds import runtime
from xds.types import CLUSTER, ENDPOINT, LISTENER, NAMED, ROUTE, RUNTIME

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


@dataclass
class Received:
    """One response as the client took it."""

    type_url: str
    version: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    at: float
    nacked: bool
    size: int


@dataclass
class SimEnvoy:
    """One simulated node. `held[type][name]` is what it has applied; `runtime` its merged layers."""

    target: str
    node_id: str = "sim"
    delta: bool = False
    metadata: dict | None = None
    layers: tuple[str, ...] = tuple(runtime.layer_names())
    reject: Callable[[str, dict], str | None] | None = None  # (type, resources) -> NACK message or None
    # (type, name, resource) -> error or None: as Envoy (and gRPC, A46) validate resources one by one,
    # a response with invalid ones is NACKed with their errors while its valid ones are applied.
    invalid: Callable[[str, str, object], str | None] | None = None
    decode: bool = True  # False: count bytes only (benchmark clients at scale)
    held: dict[str, dict] = field(
        default_factory=lambda: {t: {} for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE, RUNTIME)}
    )
    runtime_values: dict[str, object] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    on_runtime: Callable[[str, object, float], None] | None = None
    ack_delay: float = 0.0  # seconds between taking a response and answering it (ACK/NACK, subscriptions)
    # Delta: type -> name -> version of what it holds (sent as `initial_resource_versions` on reconnect)
    resource_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (send no earlier than, request)
    _running: asyncio.Event = field(default_factory=asyncio.Event)  # clear while paused
    _resumed: dict[str, set[str]] = field(default_factory=dict)  # subscriptions taken over
    _versions: dict[str, str] = field(default_factory=dict)
    _subscribed: dict[str, set[str]] = field(default_factory=dict)
    _last_nonce: dict[str, str] = field(default_factory=dict)
    _channel: grpc.aio.Channel | None = None
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target)
        if self.delta:
            call = self._channel.stream_stream(
                ADS + "DeltaAggregatedResources",
                request_serializer=bytes,
                response_deserializer=DeltaDiscoveryResponse.FromString,
            )
        else:
            call = self._channel.stream_stream(
                ADS + "StreamAggregatedResources",
                request_serializer=bytes,
                response_deserializer=DiscoveryResponse.FromString,
            )
        self._call = call(self._requests())
        node = Node(id=self.node_id, cluster="sim")
        if self.metadata:
            node.metadata = Struct.from_dict(self.metadata)
        self._node = node
        self._running.set()
        initial = {CLUSTER: set(), LISTENER: set(), RUNTIME: set(self.layers)}
        initial.update(self._resumed)
        first = True
        for type_url, names in initial.items():
            if type_url == RUNTIME and not names:
                continue
            self._subscribe(type_url, names, with_node=first)
            first = False
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
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
        """Before `start`: come back as `previous` (a stopped client) would after a reconnect,
        holding what it held, subscribing at once to what it subscribed to, and telling the
        server what it has (Delta: `initial_resource_versions`; SotW: `version_info`)."""
        self.held = {t: dict(r) for t, r in previous.held.items()}
        self.resource_versions = {t: dict(v) for t, v in previous.resource_versions.items()}
        self.runtime_values = dict(previous.runtime_values)
        self._versions = dict(previous._versions)
        self._resumed = {t: set(n) for t, n in previous._subscribed.items()}

    async def _requests(self):
        while True:
            item = await self._queue.get()
            if item is None:
                return
            due, req = item
            await self._running.wait()
            if (left := due - time.monotonic()) > 0:
                await asyncio.sleep(left)
            yield req

    def _send(self, req, delay: float = 0.0) -> None:
        self._queue.put_nowait((time.monotonic() + delay, req))

    def _subscribe(self, type_url: str, names: set[str], with_node: bool = False, delay: float = 0.0) -> None:
        old = self._subscribed.get(type_url)
        self._subscribed[type_url] = set(names)
        if type_url in NAMED and self.decode:  # as Envoy: what it no longer asks for, it forgets
            for name in set(self.held[type_url]) - names:
                del self.held[type_url][name]
                self.resource_versions.get(type_url, {}).pop(name, None)
            self._apply(type_url, time.monotonic())
        if self.delta:
            req = DeltaDiscoveryRequest(type_url=type_url)
            if old is None:
                req.resource_names_subscribe = sorted(names)
                req.initial_resource_versions = dict(self.resource_versions.get(type_url, {}))
            else:
                req.resource_names_subscribe = sorted(names - old)
                req.resource_names_unsubscribe = sorted(old - names)
                if not req.resource_names_subscribe and not req.resource_names_unsubscribe:
                    return
        else:
            if old is not None and old == names:
                return
            req = DiscoveryRequest(
                type_url=type_url,
                resource_names=sorted(names),
                version_info=self._versions.get(type_url, ""),
                response_nonce=self._last_nonce.get(type_url, ""),
            )
        if with_node:
            req.node = self._node
        self._send(req, delay)

    async def _read(self) -> None:
        async for resp in self._call:
            await self._running.wait()
            now = time.monotonic()
            if self.delta:
                self._on_delta(resp, now)
            else:
                self._on_sotw(resp, now)
            self.changed.set()

    def _on_sotw(self, resp: DiscoveryResponse, now: float) -> None:
        type_url = resp.type_url
        if self.decode:
            resources = {_name(type_url, m): m for m in (a.unpack() for a in resp.resources)}
        else:  # at scale only the count matters, and Any carries no name
            resources = {str(i): None for i in range(len(resp.resources))}
        vetoed = self.reject(type_url, resources) if self.reject else None
        bad = self._invalid(type_url, resources)
        error = vetoed or ("; ".join(bad.values()) if bad else None)
        self._last_nonce[type_url] = resp.nonce
        self.received.append(
            Received(
                type_url,
                resp.version_info,
                tuple(resources),
                (),
                now,
                error is not None,
                len(bytes(resp)) if self.decode else 0,
            )
        )
        req = DiscoveryRequest(
            type_url=type_url,
            response_nonce=resp.nonce,
            resource_names=sorted(self._subscribed.get(type_url, ())),
        )
        if vetoed is None:
            held = self.held[type_url]
            good = {n: m for n, m in resources.items() if n not in bad}
            # Clusters and listeners come as the whole state of the world; an invalid one stays as it was.
            if type_url in (CLUSTER, LISTENER):
                self.held[type_url] = {**good, **{n: held[n] for n in bad if n in held}}
            else:  # other types carry what changed; absent ones are kept (as Envoy does)
                wanted = self._subscribed.get(type_url, set())
                self.held[type_url] = {
                    n: m for n, m in {**held, **good}.items() if n in wanted or not self.decode
                }
            self._apply(type_url, now)
        if error is None:
            self._versions[type_url] = resp.version_info
            req.version_info = resp.version_info
        else:
            req.version_info = self._versions.get(type_url, "")
            req.error_detail = Status(code=3, message=error)
        self._send(req, self.ack_delay)
        self._follow(type_url)

    def _on_delta(self, resp: DeltaDiscoveryResponse, now: float) -> None:
        type_url = resp.type_url
        resources = {r.name: (r.resource.unpack() if self.decode else None) for r in resp.resources}
        vetoed = self.reject(type_url, resources) if self.reject else None
        bad = self._invalid(type_url, resources)
        error = vetoed or ("; ".join(bad.values()) if bad else None)
        self.received.append(
            Received(
                type_url,
                resp.system_version_info,
                tuple(resources),
                tuple(resp.removed_resources),
                now,
                error is not None,
                0,
            )
        )
        req = DeltaDiscoveryRequest(type_url=type_url, response_nonce=resp.nonce)
        if vetoed is None:
            self.held[type_url].update((n, m) for n, m in resources.items() if n not in bad)
            versions = self.resource_versions.setdefault(type_url, {})
            versions.update((r.name, r.version) for r in resp.resources if r.name not in bad)
            for name in resp.removed_resources:
                self.held[type_url].pop(name, None)
                versions.pop(name, None)
            self._apply(type_url, now)
        if error is not None:
            req.error_detail = Status(code=3, message=error)
        self._send(req, self.ack_delay)
        self._follow(type_url)

    def _invalid(self, type_url: str, resources: dict) -> dict[str, str]:
        if self.invalid is None:
            return {}
        return {n: e for n, m in resources.items() if (e := self.invalid(type_url, n, m)) is not None}

    def _apply(self, type_url: str, now: float) -> None:
        if type_url != RUNTIME or not self.decode:
            return
        merged: dict[str, object] = {}
        for layer in self.held[RUNTIME].values():
            merged.update(layer.layer.to_dict() if layer.layer else {})
        for key, value in merged.items():
            if self.runtime_values.get(key) != value and self.on_runtime:
                self.on_runtime(key, value, now)
        self.runtime_values = merged

    def _follow(self, type_url: str) -> None:
        """Subscribe, as Envoy does, to what the resources just taken point at."""
        if not self.decode:
            return
        if type_url == CLUSTER:
            eds = {n for n, c in self.held[CLUSTER].items() if c.type == ClusterDiscoveryType.EDS}
            self._subscribe(ENDPOINT, eds, delay=self.ack_delay)
        elif type_url == LISTENER:
            routes = set()
            for listener in self.held[LISTENER].values():
                for chain in listener.filter_chains:
                    for f in chain.filters:
                        hcm = f.typed_config.unpack()
                        if isinstance(hcm, HttpConnectionManager) and hcm.rds is not None:
                            routes.add(hcm.rds.route_config_name)
            self._subscribe(ROUTE, routes, delay=self.ack_delay)

    async def wait(self, predicate: Callable[[SimEnvoy], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.node_id}: condition not met within {timeout}s")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


def _name(type_url: str, message) -> str:
    if type_url == ENDPOINT:
        return message.cluster_name
    return message.name
