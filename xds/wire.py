"""Protobuf framing by hand for the few envelopes the server sends many times.

Each resource is serialized once per content (see `encode`) and the envelopes around it
(Any, DiscoveryResponse, the RouteConfiguration's list of virtual hosts) are byte joins.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Callable, Iterable, Iterator


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


_TAGS = [_varint(n << 3 | 2) for n in range(1 << 11)]  # length-delimited tags of fields 0..2047


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes and embedded messages. The
    per-model resources at 10,000 models are a million of these, so the lookups are inline."""
    n = len(payload)
    tag = _TAGS[number] if number < 2048 else _varint(number << 3 | 2)
    return tag + (_SMALL[n] if n < 16384 else _varint(n)) + payload


def text(number: int, value: str) -> bytes:
    return field(number, value.encode()) if value else b""


def length_delimited(number: int) -> Callable[[bytes], bytes]:
    """`field` for one field number, its tag computed once: the encoder `fields.Fields` hands out."""
    tag = _TAGS[number] if number < 2048 else _varint(number << 3 | 2)
    small = _SMALL

    def encode(payload: bytes) -> bytes:
        n = len(payload)
        return tag + (small[n] if n < 16384 else _varint(n)) + payload

    return encode


def any_bytes(type_url: str, body: bytes) -> bytes:
    """`google.protobuf.Any{type_url, value}` around an already serialized message."""
    return text(1, type_url) + field(2, body)


class _Bodies:
    """Response bodies (without their nonce) by version, type and the exact resource objects.

    Nodes that were in step before a push are sent the same resources, so the body is framed
    once per push rather than once per node. Resources are keyed by identity (cheap, and the
    cache keeps one object per content) and each entry holds them, so no id is reused while
    its entry lives. Entries live while they are used: there are two generations, and the older
    is dropped after `AGE` seconds (an entry used meanwhile moves to the newer), so the bodies of
    past pushes, and the resources they hold, do not stay until the byte limit is reached.
    """

    LIMIT = 32 << 20  # bytes of bodies kept; past it the memo starts again
    AGE = 5.0  # seconds a generation of bodies is kept unused: a push is done well within it

    def __init__(self) -> None:
        self._bodies: dict[tuple, tuple[tuple[bytes, ...], bytes]] = {}
        self._older: dict[tuple, tuple[tuple[bytes, ...], bytes]] = {}
        self._size = self._older_size = 0
        self._since = time.monotonic()

    def get(self, head: tuple, parts: tuple[bytes, ...], build: Callable[[], bytes]) -> bytes:
        key = (*head, tuple(map(id, parts)))
        found = self._bodies.get(key)
        if found is not None:
            return found[1]
        now = time.monotonic()
        if now - self._since > self.AGE:
            self._older, self._bodies, self._since = self._bodies, {}, now
            self._older_size, self._size = self._size, 0
        found = self._older.pop(key, None)
        if found is not None:
            self._older_size -= len(found[1])
        else:
            found = (parts, build())
        if self._size + self._older_size + len(found[1]) > self.LIMIT:
            self._bodies.clear()
            self._older.clear()
            self._size = self._older_size = 0
        self._bodies[key] = found
        self._size += len(found[1])
        return found[1]


_bodies = _Bodies()


def discovery_body(version: str, type_url: str, resources: Iterable[bytes]) -> bytes:
    """`DiscoveryResponse{version_info=1, resources=2 (Any), type_url=4}` without its nonce, so the
    same bytes serve every stream; append `text(5, nonce)` per stream (field order is free)."""
    parts = tuple(resources)
    return _bodies.get(
        ("sotw", version, type_url),
        parts,
        lambda: b"".join((text(1, version), *(field(2, r) for r in parts), text(4, type_url))),
    )


def discovery_response(version: str, type_url: str, nonce: str, resources: Iterable[bytes]) -> bytes:
    return discovery_body(version, type_url, resources) + text(5, nonce)


def fixed64_double(number: int, value: float) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<d", value)


def entry(key: str, value: bytes) -> bytes:
    """A map entry with a string key and a message (or bytes) value, without its field tag."""
    return text(1, key) + field(2, value)


def struct_entry(key: str, value: bytes) -> bytes:
    """One `google.protobuf.Struct.fields` map entry; `value` is a serialized `Value`."""
    return field(1, entry(key, value))


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
    removed_resources=6}`; the body is shared as in `discovery_body`, the nonce goes last."""
    parts, gone = tuple(resources), tuple(removed)
    body = _bodies.get(
        ("delta", system_version, type_url, gone),
        parts,
        lambda: b"".join(
            (
                text(1, system_version),
                *(field(2, r) for r in parts),
                text(4, type_url),
                *(field(6, n.encode()) for n in gone),
            )
        ),
    )
    return body + text(5, nonce)


# --- reading requests ---------------------------------------------------------------------------
# Every ACK is parsed, M times per change; envoy-data-plane's parser builds pydantic objects
# (a SotW RTDS ACK lists all 64 layer names), and importing it costs half a second of a start.
# These readers take only the fields the server uses.


class MalformedRequest(ValueError):
    """Bytes that are not a well-formed request (truncated, an overlong varint, a group, text that
    is not UTF-8, a node that does not decode): the server closes that stream, and only that one."""


@dataclasses.dataclass(slots=True)
class Status:
    """`google.rpc.Status`, the error detail of a NACK."""

    code: int = 0
    message: str = ""


@dataclasses.dataclass(slots=True)
class Node:
    """`config.core.v3.Node{id=1, cluster=2, metadata=3}`: who the node is, and its bootstrap's
    metadata as JSON values (what selects its models, see `scope`)."""

    id: str = ""
    cluster: str = ""
    metadata: dict = dataclasses.field(default_factory=dict)


def _node(data: bytes) -> Node:
    node = Node()
    for number, value in fields_of(data):
        if number == 1:
            node.id = value.decode()  # type: ignore[union-attr]
        elif number == 2:
            node.cluster = value.decode()  # type: ignore[union-attr]
        elif number == 3:
            node.metadata = _struct(value)  # type: ignore[arg-type]
    return node


def _struct(data: bytes) -> dict:
    """`google.protobuf.Struct{fields=1: map<string, Value>}` as a dict."""
    out = {}
    for number, item in fields_of(data):
        if number == 1:
            parts = dict(fields_of(item))  # type: ignore[arg-type]
            out[parts.get(1, b"").decode()] = _value(parts.get(2, b""))  # type: ignore[union-attr]
    return out


def _value(data: bytes):
    """`google.protobuf.Value`: null=1, number=2, string=3, bool=4, struct=5, list=6 (of values, field 1)."""
    for number, value in fields_of(data):
        if number == 2:
            return struct.unpack("<d", value)[0]  # type: ignore[arg-type]
        if number == 3:
            return value.decode()  # type: ignore[union-attr]
        if number == 4:
            return bool(value)
        if number == 5:
            return _struct(value)  # type: ignore[arg-type]
        if number == 6:
            return [_value(v) for n, v in fields_of(value) if n == 1]  # type: ignore[arg-type]
    return None


@dataclasses.dataclass(slots=True)
class Request:
    """The fields of a `DiscoveryRequest` or `DeltaDiscoveryRequest` that the server reads."""

    type_url: str = ""
    version_info: str = ""
    response_nonce: str = ""
    node: Node | None = None
    error_detail: Status | None = None
    resource_names: frozenset[str] = frozenset()  # a SotW request names a set; shared, see `_NameRuns`
    resource_names_subscribe: list[str] = dataclasses.field(default_factory=list)
    resource_names_unsubscribe: list[str] = dataclasses.field(default_factory=list)
    initial_resource_versions: dict[str, str] = dataclasses.field(default_factory=dict)


class _NameRuns:
    """The names of a SotW request's `resource_names` run, by the run's bytes.

    A SotW ACK repeats every name the node wants (all 64 runtime layers, or every EDS cluster),
    and nodes alike send the same run, ACK after ACK. Decoding it name by name cost most of an
    ACK's parse; a run seen before is one slice and one lookup, and every node gets the same
    frozenset, so the server compares subscriptions by identity first.
    """

    LIMIT = 256  # distinct runs kept: subscriptions in use, not one per node
    TAG = 3 << 3 | 2  # field 3, length-delimited

    def __init__(self) -> None:
        self._runs: dict[bytes, frozenset[str]] = {}

    def read(self, data: bytes, start: int, type_tag: bytes) -> tuple[frozenset[str], int]:
        """The names from `start` (a field 3 tag) to the end of the run, and where it ends."""
        # Envoy writes fields in number order, so the run usually ends at the type_url field (or
        # at the end, when a client appends it). A slice found that way is trusted only if it is a
        # run read in full before: such a slice ends on a field boundary, wherever the search stopped.
        for end in (data.find(type_tag, start), len(data)):
            if end > start and (names := self._runs.get(data[start:end])) is not None:
                return names, end
        names_list, i = [], start
        while i < len(data) and data[i] == self.TAG:
            length, j = _read_varint(data, i + 1)
            if j + length > len(data):
                raise MalformedRequest("field 3 runs past the end of the message")
            names_list.append(data[j : j + length].decode())
            i = j + length
        names = frozenset(names_list)
        if len(self._runs) >= self.LIMIT:
            self._runs.clear()  # old subscriptions: sharing resumes with the next ones
        return self._runs.setdefault(data[start:i], names), i


_name_runs = _NameRuns()
_TYPE_URL_TAG = bytes([4 << 3 | 2])


def fields_of(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized message's top-level fields: varints as int, the
    rest (length-delimited, fixed 64 and 32 bits) as bytes."""
    i, end = 0, len(data)
    while i < end:
        number, value, i = _field_at(data, i)
        yield number, value


def _field_at(data: bytes, i: int) -> tuple[int, int | bytes, int]:
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
        raise MalformedRequest(f"unsupported wire type {wire_type}")
    if i > len(data):
        raise MalformedRequest(f"field {number} runs past the end of the message")
    return number, value, i


_NAMES_TAG = 3 << 3 | 2  # field 3, length-delimited: the resource names of both request kinds


def _fields_and_names(data: bytes, names: list[str]) -> Iterator[tuple[int, int | bytes]]:
    """`fields_of`, except that field 3 (the resource names) goes straight into `names`.

    A SotW request names every endpoint set or route configuration the node wants: ten thousand
    names, in every request and ACK of those types. A short name is read here without the
    generic reader: a quarter of the time."""
    i, end = 0, len(data)
    while i < end:
        if data[i] == _NAMES_TAG and i + 1 < end and data[i + 1] < 0x80:
            j = i + 2 + data[i + 1]
            if j > end:
                raise MalformedRequest("field 3 runs past the end of the message")
            names.append(data[i + 2 : j].decode())
            i = j
            continue
        number, value, i = _field_at(data, i)
        if number == 3:
            names.append(value.decode())  # type: ignore[union-attr]
        else:
            yield number, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data):
            raise MalformedRequest("a varint runs past the end of the message")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7
        if shift >= 70:  # protobuf varints are 10 bytes at most
            raise MalformedRequest("a varint longer than 10 bytes")


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
    error_detail=6}`; raises `MalformedRequest` (only) for bytes that are not one."""
    try:
        return _sotw_request(data)
    except MalformedRequest:
        raise
    except Exception as exc:  # text that is not UTF-8, a node envoy-data-plane cannot decode
        raise MalformedRequest(f"{type(exc).__name__}: {exc}") from None


def _sotw_request(data: bytes) -> Request:
    req = Request()
    i, end = 0, len(data)
    while i < end:
        if data[i] == _NameRuns.TAG:
            names, i = _name_runs.read(data, i, _TYPE_URL_TAG)
            req.resource_names = names if not req.resource_names else req.resource_names | names
            continue
        key, i = _read_varint(data, i)
        number, wire_type = key >> 3, key & 7
        if wire_type != 2:
            i = _skip(data, i, wire_type)
            if i > end:
                raise MalformedRequest(f"field {number} runs past the end of the message")
            continue
        length, i = _read_varint(data, i)
        value, i = data[i : i + length], i + length
        if i > end:
            raise MalformedRequest(f"field {number} runs past the end of the message")
        if number == 1:
            req.version_info = value.decode()
        elif number == 2:
            req.node = _node(value)
        elif number == 4:
            req.type_url = value.decode()
        elif number == 5:
            req.response_nonce = value.decode()
        elif number == 6:
            req.error_detail = _status(value)
    return req


def _skip(data: bytes, i: int, wire_type: int) -> int:
    """Past a field this reader does not use (varint, fixed 64 or fixed 32 bits)."""
    if wire_type == 0:
        return _read_varint(data, i)[1]
    if wire_type == 1:
        return i + 8
    if wire_type == 5:
        return i + 4
    raise MalformedRequest(f"unsupported wire type {wire_type}")


def parse_delta_request(data: bytes) -> Request:
    """`DeltaDiscoveryRequest{node=1, type_url=2, resource_names_subscribe=3,
    resource_names_unsubscribe=4, initial_resource_versions=5, response_nonce=6, error_detail=7}`;
    raises `MalformedRequest` (only) for bytes that are not one."""
    try:
        return _delta_request(data)
    except MalformedRequest:
        raise
    except Exception as exc:  # as in `parse_sotw_request`
        raise MalformedRequest(f"{type(exc).__name__}: {exc}") from None


def _delta_request(data: bytes) -> Request:
    req = Request()
    for number, value in _fields_and_names(data, req.resource_names_subscribe):
        if number == 1:
            req.node = _node(value)
        elif number == 2:
            req.type_url = value.decode()  # type: ignore[union-attr]
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


field_at, read_varint = _field_at, _read_varint  # for the other hand readers (`lrs`)
