"""Protobuf framing by hand for the few envelopes the server sends many times.

Each resource is serialized once per content (see `encode`) and the envelopes around it
(Any, DiscoveryResponse, the RouteConfiguration's list of virtual hosts) are byte joins.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Iterator

from envoy_data_plane.envoy.config.core.v3 import Node


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL = [_varint(n) for n in range(1 << 14)]  # tags and most lengths: one lookup


def varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 16384 else _varint(n)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes and embedded messages."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def text(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


def any_bytes(type_url: str, body: bytes) -> bytes:
    """`google.protobuf.Any{type_url, value}` around an already serialized message."""
    return text(1, type_url) + field(2, body)


def discovery_body(version: str, type_url: str, resources: Iterable[bytes]) -> bytes:
    """`DiscoveryResponse{version_info=1, resources=2 (Any), type_url=4}` without its nonce, so the
    same bytes serve every stream; append `text(5, nonce)` per stream (field order is free)."""
    return b"".join((text(1, version), *(field(2, r) for r in resources), text(4, type_url)))


def discovery_response(version: str, type_url: str, nonce: str, resources: Iterable[bytes]) -> bytes:
    return discovery_body(version, type_url, resources) + text(5, nonce)


def fixed64_double(number: int, value: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", value)


def struct_entry(key: str, value: bytes) -> bytes:
    """One `google.protobuf.Struct.fields` map entry; `value` is a serialized `Value`."""
    return field(1, text(1, key) + field(2, value))


def fractional_percent_value(numerator: int, denominator: str = "MILLION") -> bytes:
    """`Value{struct_value: {numerator, denominator}}`: how RTDS spells a FractionalPercent."""
    inner = struct_entry("numerator", fixed64_double(2, float(numerator))) + struct_entry(
        "denominator", text(3, denominator)
    )
    return field(5, inner)


def runtime(name: str, entries: Iterable[bytes]) -> bytes:
    """`Runtime{name=1, layer=2 (Struct)}` from pre-encoded Struct entries."""
    return text(1, name) + field(2, b"".join(entries))


def delta_resource(name: str, version: str, any_body: bytes) -> bytes:
    """`discovery.v3.Resource{version=1, resource=2, name=3}`."""
    return text(1, version) + field(2, any_body) + text(3, name)


def delta_response(
    system_version: str, type_url: str, nonce: str, resources: Iterable[bytes], removed: Iterable[str]
) -> bytes:
    """`DeltaDiscoveryResponse{system_version_info=1, resources=2, type_url=4, nonce=5,
    removed_resources=6}`."""
    return b"".join(
        (
            text(1, system_version),
            *(field(2, r) for r in resources),
            text(4, type_url),
            text(5, nonce),
            *(field(6, n.encode()) for n in removed),
        )
    )


# --- reading requests ---------------------------------------------------------------------------
# Every ACK is parsed, M times per change; envoy-data-plane's parser builds pydantic objects
# (a SotW RTDS ACK lists all 64 layer names). These readers take only the fields the server
# uses and leave the node, sent once per stream, to envoy-data-plane.


@dataclasses.dataclass
class Status:
    """`google.rpc.Status`, the error detail of a NACK."""

    code: int = 0
    message: str = ""


@dataclasses.dataclass
class Request:
    """The fields of a `DiscoveryRequest` or `DeltaDiscoveryRequest` that the server reads."""

    type_url: str = ""
    version_info: str = ""
    response_nonce: str = ""
    node: Node | None = None
    error_detail: Status | None = None
    resource_names: list[str] = dataclasses.field(default_factory=list)
    resource_names_subscribe: list[str] = dataclasses.field(default_factory=list)
    resource_names_unsubscribe: list[str] = dataclasses.field(default_factory=list)
    initial_resource_versions: dict[str, str] = dataclasses.field(default_factory=dict)


def fields_of(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized message's top-level fields: varints as int, the
    rest (length-delimited, fixed 64 and 32 bits) as bytes."""
    i, end = 0, len(data)
    while i < end:
        key, i = _read_varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(data, i)
        elif wire_type == 2:
            length, i = _read_varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire_type == 1:
            value, i = data[i : i + 8], i + 8
        elif wire_type == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield number, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _status(data: bytes) -> Status:
    status = Status()
    for number, value in fields_of(data):
        if number == 1:
            status.code = value  # type: ignore[assignment]
        elif number == 2:
            status.message = value.decode()  # type: ignore[union-attr]
    return status


def parse_sotw_request(data: bytes) -> Request:
    """`DiscoveryRequest{version_info=1, node=2, resource_names=3, type_url=4, response_nonce=5,
    error_detail=6}`."""
    req = Request()
    for number, value in fields_of(data):
        if number == 1:
            req.version_info = value.decode()  # type: ignore[union-attr]
        elif number == 2:
            req.node = Node.FromString(value)
        elif number == 3:
            req.resource_names.append(value.decode())  # type: ignore[union-attr]
        elif number == 4:
            req.type_url = value.decode()  # type: ignore[union-attr]
        elif number == 5:
            req.response_nonce = value.decode()  # type: ignore[union-attr]
        elif number == 6:
            req.error_detail = _status(value)  # type: ignore[arg-type]
    return req


def parse_delta_request(data: bytes) -> Request:
    """`DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
    resource_names_unsubscribe=4, initial_resource_versions=5, response_nonce=6, error_detail=7}`."""
    req = Request()
    for number, value in fields_of(data):
        if number == 1:
            req.node = Node.FromString(value)
        elif number == 2:
            req.type_url = value.decode()  # type: ignore[union-attr]
        elif number == 3:
            req.resource_names_subscribe.append(value.decode())  # type: ignore[union-attr]
        elif number == 4:
            req.resource_names_unsubscribe.append(value.decode())  # type: ignore[union-attr]
        elif number == 5:
            entry = dict(fields_of(value))  # type: ignore[arg-type]
            req.initial_resource_versions[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
        elif number == 6:
            req.response_nonce = value.decode()  # type: ignore[union-attr]
        elif number == 7:
            req.error_detail = _status(value)  # type: ignore[arg-type]
    return req
