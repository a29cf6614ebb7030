"""Protobuf fields by name: the served resources as byte joins, numbered by envoy-data-plane.

Constructing an envoy-data-plane message validates it with pydantic, so building a model's
clusters as typed messages costs about half a millisecond: ten seconds at 10,000 models. And
importing those message types costs half a second of every start. So `Fields("...Cluster").name("x")`
is the encoded field `name` of a `Cluster`, its number and wire type read from `xds.schema`: a
table generated from envoy-data-plane's own metadata (`python -m xds.fields` writes it again; a
test fails when it is stale). A misspelled field fails the first time it is built, and every
builder runs in the tests, which decode what it built with envoy-data-plane.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from xds import schema, wire

_VARINTS = ("enum", "bool", "int32", "uint32", "uint64", "int64")

# The messages built here, by full name (nested types as protobuf names them).
MESSAGES = (
    "envoy.config.accesslog.v3.AccessLogFilter",
    "envoy.config.accesslog.v3.ResponseFlagFilter",
    "envoy.config.cluster.v3.CircuitBreakers",
    "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.cluster.v3.Cluster.CustomClusterType",
    "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
    "envoy.config.cluster.v3.OutlierDetection",
    "envoy.config.common.mutation_rules.v3.HeaderMutation",
    "envoy.config.core.v3.Address",
    "envoy.config.core.v3.AggregatedConfigSource",
    "envoy.config.core.v3.ConfigSource",
    "envoy.config.core.v3.DataSource",
    "envoy.config.core.v3.HeaderValue",
    "envoy.config.core.v3.HeaderValueOption",
    "envoy.config.core.v3.HttpUri",
    "envoy.config.core.v3.Metadata",
    "envoy.config.core.v3.Node",
    "envoy.config.core.v3.RuntimeFractionalPercent",
    "envoy.config.core.v3.SocketAddress",
    "envoy.config.core.v3.TransportSocket",
    "envoy.config.core.v3.TypedExtensionConfig",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.config.endpoint.v3.Endpoint",
    "envoy.config.endpoint.v3.LbEndpoint",
    "envoy.config.endpoint.v3.LocalityLbEndpoints",
    "envoy.config.listener.v3.Filter",
    "envoy.config.listener.v3.FilterChain",
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.DirectResponseAction",
    "envoy.config.route.v3.RetryPolicy",
    "envoy.config.route.v3.RetryPolicy.RetryBackOff",
    "envoy.config.route.v3.RetryPolicy.RetryPriority",
    "envoy.config.route.v3.Route",
    "envoy.config.route.v3.RouteAction",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.config.route.v3.RouteMatch",
    "envoy.config.route.v3.ScopedRouteConfiguration",
    "envoy.config.route.v3.ScopedRouteConfiguration.Key",
    "envoy.config.route.v3.ScopedRouteConfiguration.Key.Fragment",
    "envoy.config.route.v3.VirtualHost",
    "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
    "envoy.extensions.clusters.composite.v3.ClusterConfig",
    "envoy.extensions.clusters.composite.v3.ClusterConfig.ClusterEntry",
    "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "envoy.extensions.filters.http.header_mutation.v3.Mutations",
    "envoy.extensions.filters.http.lua.v3.Lua",
    "envoy.extensions.filters.http.router.v3.Router",
    "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
    "envoy.extensions.filters.network.http_connection_manager.v3.LocalReplyConfig",
    "envoy.extensions.filters.network.http_connection_manager.v3.ResponseMapper",
    "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRds",
    "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes",
    "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder",
    "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder",
    "envoy.extensions.filters.network.http_connection_manager.v3.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder.HeaderValueExtractor",
    "envoy.extensions.http.injected_credentials.generic.v3.Generic",
    "envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2",
    "envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2.ClientCredentials",
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
    "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
    "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.GenericSecret",
    "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
    "envoy.extensions.transport_sockets.tls.v3.Secret",
    "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
    "envoy.service.load_stats.v3.LoadStatsResponse",
    "envoy.type.matcher.v3.StringMatcher",
    "envoy.type.v3.FractionalPercent",
    "google.protobuf.BoolValue",
    "google.protobuf.Duration",
    "google.protobuf.UInt32Value",
    "google.protobuf.UInt64Value",
)


class Fields:
    """Encoders for the fields of one message type: `Fields(name).field_name(value) -> bytes`.

    Strings and numbers at their proto3 default are left out, as any encoder does, except
    where the field is in a oneof or optional (its presence is the value). Enums take their
    value's name. Message fields take the already encoded body and are always written (an
    empty message is a value). Repeated numbers take a list (packed); other repeated fields
    are written once per call.
    """

    def __init__(self, message: str):
        self._type = message
        self._meta = schema.MESSAGES[message]
        self._url = "type.googleapis.com/" + message

    def pack(self, body: bytes) -> bytes:
        """A `google.protobuf.Any` holding `body`, an encoded message of this type."""
        return wire.any_bytes(self._url, body)

    def __getattr__(self, name: str) -> Callable[[Any], bytes]:
        meta = self._meta.get(name)
        if meta is None:
            raise AttributeError(f"{self._type} has no field {name!r}")
        values = schema.ENUMS.get(f"{self._type}.{name}")
        encoder = _encoder(*meta, values)
        setattr(self, name, encoder)  # built once per field
        return encoder


def _encoder(
    number: int, proto_type: str, present: bool, repeated: bool, values: dict[str, int] | None
) -> Callable[[Any], bytes]:
    if proto_type == "string":
        encode = wire.length_delimited(number)
        if present or repeated:
            return lambda value: encode(value.encode())
        return lambda value: encode(value.encode()) if value else b""
    if proto_type in ("message", "bytes", "map"):  # a map takes one encoded entry (`wire.entry`)
        return wire.length_delimited(number)
    if proto_type in _VARINTS:
        if repeated:
            packed = wire.length_delimited(number)
            return lambda items: packed(b"".join(wire.varint(int(v)) for v in items))
        tag = wire.varint(number << 3)
        if values is not None:
            return lambda value: tag + wire.varint(values[value]) if values[value] or present else b""
        return lambda value: tag + wire.varint(int(value)) if value or present else b""
    raise TypeError(f"field type {proto_type} has no encoder here")


_DURATION = Fields("google.protobuf.Duration")
_UINT32, _BOOL = Fields("google.protobuf.UInt32Value"), Fields("google.protobuf.BoolValue")


def uint32(value: int) -> bytes:
    """A `google.protobuf.UInt32Value` body."""
    return _UINT32.value(value)


def boolean(value: bool) -> bytes:
    """A `google.protobuf.BoolValue` body."""
    return _BOOL.value(value)


def duration(value: datetime.timedelta) -> bytes:
    """A `google.protobuf.Duration` body."""
    micros = value // datetime.timedelta(microseconds=1)
    seconds, micros = divmod(micros, 1_000_000)
    return _DURATION.seconds(seconds) + _DURATION.nanos(micros * 1000)


# --- generating `xds.schema` ---------------------------------------------------------------------


def generate(messages: Iterable[str] = MESSAGES) -> str:
    """The text of `xds/schema.py`: each message's fields as (number, type, present, repeated),
    and the values of its enum fields by name, from envoy-data-plane's metadata."""
    import dataclasses
    import enum
    import importlib
    import typing
    from importlib.metadata import version

    from envoy_data_plane.message_pool import default_message_pool

    fields: dict[str, dict[str, tuple]] = {}
    enums: dict[str, dict[str, int]] = {}
    for name in messages:
        cls = _message_class(name, importlib, default_message_pool)
        hints = typing.get_type_hints(cls)
        fields[name] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("betterproto")
            if meta is None:
                continue
            present = bool(meta.optional or meta.group is not None)
            fields[name][f.name] = (meta.number, meta.proto_type, present, bool(meta.repeated))
            if meta.proto_type == "enum":
                kind = next(
                    t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if isinstance(t, type)
                )
                assert issubclass(kind, enum.IntEnum), (name, f.name)
                enums[f"{name}.{f.name}"] = {v.name: int(v) for v in kind}
    lines = [
        f'"""Field numbers and types of the messages `xds.fields` builds, from envoy-data-plane '
        f"{version('envoy-data-plane')}.",
        "",
        'Generated by `python -m xds.fields`: do not edit."""',
        "",
        "# ruff: noqa: E501",
        "# fmt: off",
        "MESSAGES: dict[str, dict[str, tuple[int, str, bool, bool]]] = {",
    ]
    for name, table in fields.items():
        lines.append(f"    {name!r}: {{")
        lines += [f"        {field!r}: {meta!r}," for field, meta in table.items()]
        lines.append("    },")
    lines += ["}", "ENUMS: dict[str, dict[str, int]] = {"]
    lines += [f"    {key!r}: {values!r}," for key, values in enums.items()]
    lines += ["}", ""]
    return "\n".join(lines)


def _message_class(name: str, importlib, pool) -> type:
    """The envoy-data-plane class of a full message name (its package is the longest importable prefix)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            importlib.import_module("envoy_data_plane." + ".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        return pool.url_to_type["type.googleapis.com/" + name]
    raise LookupError(f"no envoy-data-plane module holds {name}")


SCHEMA_PATH = Path(__file__).with_name("schema.py")

if __name__ == "__main__":
    SCHEMA_PATH.write_text(generate())
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
