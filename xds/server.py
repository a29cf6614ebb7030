"""The gRPC ADS server (state of the world) on `grpc.aio`.

Per stream and type it tracks what was sent (version, nonce, names) and what the client
ACKed. It pushes a type only when its cache version or the client's subscription differs
from what was last sent, so a NACKed version is never resent: the client keeps its last
good config until the next different version comes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest

from metrics.instruments import Instruments
from xds import wire
from xds.cache import ResourceCache
from xds.types import NAMED, PUSH_ORDER, SHORT

log = logging.getLogger("overspill.xds")
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass
class TypeState:
    """One type on one stream: the subscription and where the last response stands."""

    names: frozenset[str] = frozenset()
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""
    acked_version: str = ""
    nack: str = ""
    nack_version: str = ""


@dataclass
class StreamInfo:
    """What `overspill status` shows about a connected client."""

    node_id: str = ""
    cluster: str = ""
    peer: str = ""
    types: dict[str, TypeState] = field(default_factory=dict)


class AdsServer:
    def __init__(self, cache: ResourceCache, instruments: Instruments):
        self.cache = cache
        self.instruments = instruments
        self.streams: dict[int, StreamInfo] = {}
        self._ids = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=DiscoveryRequest.FromString,
                    response_serializer=lambda b: b,
                ),  # responses are framed bytes already
            },
        )

    async def stream(self, requests: AsyncIterator[DiscoveryRequest], context) -> AsyncIterator[bytes]:
        sid = next(self._ids)
        info = StreamInfo(peer=context.peer())
        self.streams[sid] = info
        self.instruments.xds_streams.inc()
        nonces = itertools.count(1)
        wake = asyncio.Event()
        reader = asyncio.create_task(self._read(requests, info, wake))
        try:
            while True:
                changed = self.cache.changed_event()
                for type_url in PUSH_ORDER:
                    response = (
                        self._response(info, type_url, f"{sid}-{next(nonces)}") if self.cache.ready else None
                    )
                    if response is not None:
                        yield response
                if reader.done():
                    reader.result()  # re-raise a read error; a clean end closes the stream
                    return
                waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(wake.wait())]
                await asyncio.wait([*waiters, reader], return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                wake.clear()
        finally:
            reader.cancel()
            self.streams.pop(sid, None)
            self.instruments.xds_streams.dec()
            log.info("event=stream_closed node=%s peer=%s", info.node_id, info.peer)

    def _response(self, info: StreamInfo, type_url: str, nonce: str) -> bytes | None:
        state = info.types.get(type_url)
        if state is None:
            return None  # the client has not asked for this type yet
        version = self.cache.version(type_url)
        if state.sent_version == version and state.sent_names == state.names:
            return None
        available = self.cache.resources(type_url)
        if type_url in NAMED:
            chosen = [available[n] for n in sorted(state.names) if n in available]
        else:
            chosen = list(available.values())
        state.sent_version, state.sent_names, state.nonce = version, state.names, nonce
        self.instruments.xds_pushes.labels(SHORT[type_url]).inc()
        log.debug(
            "event=push node=%s type=%s version=%s resources=%d",
            info.node_id,
            SHORT[type_url],
            version,
            len(chosen),
        )
        return wire.discovery_response(version, type_url, nonce, (r.any for r in chosen))

    async def _read(
        self, requests: AsyncIterator[DiscoveryRequest], info: StreamInfo, wake: asyncio.Event
    ) -> None:
        async for req in requests:
            if req.node is not None and req.node.id and not info.node_id:
                info.node_id, info.cluster = req.node.id, req.node.cluster
                log.info(
                    "event=stream_opened node=%s cluster=%s peer=%s", info.node_id, info.cluster, info.peer
                )
            type_url = req.type_url
            if type_url not in SHORT:
                log.warning("event=unknown_type node=%s type=%s", info.node_id, type_url)
                continue
            state = info.types.setdefault(type_url, TypeState())
            if req.response_nonce and req.response_nonce != state.nonce:
                continue  # answers a response that has since been superseded
            short = SHORT[type_url]
            if req.response_nonce:
                if req.error_detail is not None and (req.error_detail.code or req.error_detail.message):
                    state.nack, state.nack_version = req.error_detail.message, state.sent_version or ""
                    self.instruments.xds_nacks.labels(short).inc()
                    log.error(
                        "event=nack node=%s type=%s version=%s error=%r",
                        info.node_id,
                        short,
                        state.nack_version,
                        req.error_detail.message,
                    )
                else:
                    state.acked_version, state.nack = req.version_info, ""
                    self.instruments.xds_acks.labels(short).inc()
            state.names = frozenset(req.resource_names)
            wake.set()


async def start_server(ads: AdsServer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([ads.handler()])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
