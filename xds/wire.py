"""Protobuf framing by hand for the few envelopes the server sends many times.

Serializing an envoy-data-plane message re-validates it with pydantic (about 2 ms for a
small Cluster), so each resource is serialized once per content and the envelopes around
it (Any, DiscoveryResponse, the RouteConfiguration's list of virtual hosts) are byte joins.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Any

import betterproto2


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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


def _no_revalidation(message: betterproto2.Message) -> None:
    """betterproto2 re-validates every message with pydantic on each `bytes(message)`, building
    a new `SchemaValidator` for every nested message: most of the 2 ms a Cluster costs. Messages
    are already validated when constructed (pydantic dataclasses), which is where ours are made."""


def _cached_field_default(message: betterproto2.Message, field_name: str) -> Any:
    """betterproto2 computes a field's default inside `warnings.catch_warnings()` for every field
    of every message serialized: half of all serialization time. Defaults never change, so
    immutable ones are kept and empty lists and maps are made afresh without the ceremony."""
    key = (type(message), field_name)
    kind = _DEFAULTS.get(key, _MISSING)
    if kind is _MISSING:
        value = _ORIGINAL_DEFAULT(message, field_name)
        if value is None or isinstance(value, (int, float, str, bytes, enum.Enum)):
            _DEFAULTS[key] = (value,)
        elif value == [] or value == {}:
            _DEFAULTS[key] = type(value)
        else:
            _DEFAULTS[key] = None  # anything else: always ask betterproto2
        return value
    if kind is None:
        return _ORIGINAL_DEFAULT(message, field_name)
    return kind[0] if isinstance(kind, tuple) else kind()


_MISSING = object()
_DEFAULTS: dict[tuple[type, str], Any] = {}
_ORIGINAL_DEFAULT = betterproto2.Message._get_field_default
betterproto2.Message._validate = _no_revalidation  # type: ignore[method-assign]
betterproto2.Message._get_field_default = _cached_field_default  # type: ignore[method-assign]
