"""Malformed xDS requests, tried systematically: the hand-written request reader either reads a
request or raises `MalformedRequest`, and on a real gRPC server a malformed request closes its
own stream (INVALID_ARGUMENT, one `event=request_refused` log line, a count on /metrics) while
the server and the other streams carry on taking updates.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

import grpc
import pytest
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.service.discovery.v3 import DeltaDiscoveryRequest, DiscoveryRequest
from envoy_data_plane.google.protobuf import Struct
from envoy_data_plane.google.rpc import Status
from hypothesis import given, settings
from hypothesis import strategies as st
from test_xds_protocol import ADS_DELTA, ADS_SOTW, BASE, LIMIT, PROTOCOLS
from test_xds_protocol import plane as plane  # noqa: F401  (the fixture: a real server on loopback)

from metrics.instruments import Instruments
from overspill.sim.envoy import encode
from xds.cache import ResourceCache
from xds.delta import Delta
from xds.server import Callbacks
from xds.snapshot import Translator
from xds.sotw import StateOfTheWorld
from xds.stream import Stream
from xds.types import CLUSTER, PUSH_ORDER
from xds.wire import MalformedRequest, parse_delta_request, parse_sotw_request

TYPES = st.sampled_from([*PUSH_ORDER, ""]) | st.text(max_size=30)
names = st.lists(st.text(max_size=20) | st.sampled_from(["*", "overspill/inference/llm/local"]), max_size=6)
nodes = st.none() | st.builds(
    Node,
    id=st.text(max_size=10),
    cluster=st.text(max_size=10),
    metadata=st.none()
    | st.dictionaries(
        st.sampled_from(["overspill", "x"]),
        st.dictionaries(
            st.sampled_from(["namespaces", "matchLabels", "listenerPort"]),
            st.text(max_size=5) | st.floats(allow_nan=False) | st.lists(st.text(max_size=5), max_size=2),
            max_size=3,
        )
        | st.text(max_size=5),
        max_size=2,
    ).map(Struct.from_dict),
)
errors = st.none() | st.builds(Status, code=st.integers(0, 16), message=st.text(max_size=30))
sotw_requests = st.builds(
    DiscoveryRequest,
    version_info=st.text(max_size=5),
    node=nodes,
    resource_names=names,
    type_url=TYPES,
    response_nonce=st.text(max_size=5),
    error_detail=errors,
)
delta_requests = st.builds(
    DeltaDiscoveryRequest,
    node=nodes,
    type_url=TYPES,
    resource_names_subscribe=names,
    resource_names_unsubscribe=names,
    initial_resource_versions=st.dictionaries(st.text(max_size=10), st.text(max_size=5), max_size=3),
    response_nonce=st.text(max_size=5),
    error_detail=errors,
)


@st.composite
def damaged(draw, requests) -> bytes:
    """A well-formed request's bytes cut short, with bytes flipped, or spliced with random bytes."""
    data = bytearray(bytes(draw(requests)))
    how = draw(st.sampled_from(["cut", "flip", "splice"]))
    if how == "cut" and data:
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip" and data:
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at]) + draw(st.binary(max_size=20)) + bytes(data[at:])


READERS = [(parse_sotw_request, sotw_requests), (parse_delta_request, delta_requests)]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([0, 1]), st.data())
def test_any_bytes_are_a_request_or_malformed(which, data):
    parse, requests = READERS[which]
    raw = data.draw(st.one_of(st.binary(max_size=200), damaged(requests), requests.map(bytes)))
    try:
        req = parse(raw)
    except MalformedRequest as exc:
        assert str(exc)
    else:
        assert isinstance(req.type_url, str) and isinstance(req.response_nonce, str)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0, 1]), st.data())
def test_a_well_formed_request_reads_back_as_written(which, data):
    parse, requests = READERS[which]
    msg = data.draw(requests)
    req = parse(bytes(msg))
    assert req.type_url == msg.type_url and req.response_nonce == msg.response_nonce
    if which == 0:
        assert req.resource_names == frozenset(msg.resource_names) and req.version_info == msg.version_info
    else:
        assert req.resource_names_subscribe == msg.resource_names_subscribe
        assert req.initial_resource_versions == msg.initial_resource_versions


def test_an_overlong_varint_is_refused_at_once():
    """4 MB of continuation bytes (gRPC's default message limit) would otherwise be read as one
    ever-growing integer, holding the event loop."""
    with pytest.raises(MalformedRequest, match="longer than 10 bytes"):
        parse_sotw_request(b"\x80" * (4 << 20))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([False, True]), st.data())
def test_any_sequence_of_well_formed_requests_is_taken_by_a_stream(delta, data):
    """Whatever a node asks, in whatever order (unknown types, nonces from nowhere, NACKs of
    nothing, odd metadata), the stream takes it and answers from the view without an error."""
    translator = Translator("127.0.0.1", 10000)
    translator.publish(BASE)
    cache: ResourceCache = translator.cache
    stream = Stream(1, cache, Delta() if delta else StateOfTheWorld(), PUSH_ORDER, "test")
    parse = parse_delta_request if delta else parse_sotw_request
    for msg in data.draw(st.lists(delta_requests if delta else sotw_requests, min_size=1, max_size=6)):
        stream.on_request(parse(bytes(msg)))
        for _type_url, payload in stream.next_responses(0.0):
            assert isinstance(payload, bytes)
    stream.close()


# --- on a real gRPC server, beside a live node ---


async def send_raw(target: str, method: str, *payloads: bytes) -> grpc.aio.AioRpcError:
    """Send these bytes as requests on one stream; the status the server ended it with."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(method, request_serializer=bytes, response_deserializer=bytes)

        async def requests():
            for p in payloads:
                yield p
            await asyncio.sleep(LIMIT)  # hold the stream open: only the server may end it

        try:
            async with asyncio.timeout(5):
                async for _ in call(requests()):
                    pass
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("the server did not end the stream")


def junk(rng: random.Random, good: bytes) -> bytes:
    """Random bytes, or a good request damaged (cut, bytes flipped), or crafted traps."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:
        return good[: rng.randrange(1, len(good))]
    if kind == 2:
        b = bytearray(good)
        for _ in range(3):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    return rng.choice(
        [b"\x80" * 100_000, b"\x22\x02\xff\xfe", b"\x0b\x0c", b"\x12\x7f" + b"x" * 5, b"\x0a\x03\x0a\x01"]
    )


@pytest.mark.parametrize("delta", PROTOCOLS)
async def test_malformed_requests_close_their_stream_while_another_node_keeps_taking_updates(
    plane,  # noqa: F811
    delta,
    caplog,
):
    caplog.set_level(logging.INFO, logger="overspill.xds")
    instruments = Instruments()

    class Count(Callbacks):
        def request_refused(self, stream, error):
            instruments.xds_refused.inc()

    plane.xds.callbacks = Count()
    live = await plane.client("live", delta)
    llm = BASE[0]
    await live.wait(lambda c: c.runtime_values.get(llm.runtime_key) == 30, LIMIT)
    sid = plane.stream("live").sid
    method = ADS_DELTA if delta else ADS_SOTW
    hello = encode(
        DeltaDiscoveryRequest(node=Node(id="bad"), type_url=CLUSTER, resource_names_subscribe=["*"])
        if delta
        else DiscoveryRequest(node=Node(id="bad"), type_url=CLUSTER)
    )
    rng = random.Random(20261128)
    refused = 0
    for i in range(25):
        payload = junk(rng, hello)
        try:
            (parse_delta_request if delta else parse_sotw_request)(payload)
            continue  # damage that left a readable request is no malformed input
        except MalformedRequest:
            pass
        # Half the bad streams first say hello: the log then names the node.
        exc = await send_raw(plane.target, method, *((hello, payload) if i % 2 else (payload,)))
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        assert exc.details().startswith("malformed request: ")
        refused += 1
        percent = 31 + i
        plane.apply(replace(llm, remote_percent=float(percent)))
        await live.wait(lambda c, p=percent: c.runtime_values.get(llm.runtime_key) == p, LIMIT)
    assert refused >= 15
    assert plane.stream("live").sid == sid and not live.ended  # never reconnected
    assert [s.node_id for s in plane.xds.streams.values()] == ["live"]
    lines = [r.message for r in caplog.records if "event=request_refused" in r.message]
    assert len(lines) == refused
    assert any("node=bad " in line for line in lines) and any("node=- " in line for line in lines)
    assert all("code=INVALID_ARGUMENT error=" in line for line in lines)
    assert instruments.registry.get_sample_value("overspill_xds_refused_requests_total") == refused
    # and the node still takes structural changes, not only weights
    plane.apply(remove=(BASE[1],))
    await live.wait(lambda c: BASE[1].local_cluster not in c.held[CLUSTER], LIMIT)
