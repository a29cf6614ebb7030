"""Serialized resources: the unit the cache stores and the streams send."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from api.desired import ModelKey
from xds import wire


@dataclass(frozen=True)
class Resource:
    """One named resource, serialized once: its Any envelope, its Delta envelope, a content version."""

    name: str
    version: str
    any: bytes
    delta: bytes

    @classmethod
    def of(cls, type_url: str, name: str, body: bytes) -> Resource:
        version = hashlib.blake2b(body, digest_size=8).hexdigest()
        any_body = wire.any_bytes(type_url, body)
        return cls(name, version, any_body, wire.delta_resource(name, version, any_body))


@dataclass(frozen=True)
class ModelBundle:
    """One model's serialized resources: the unit a change replaces in every view."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    clusters: tuple[Resource, ...]
    endpoints: Resource
    routes: Resource  # its route configuration
    scopes: tuple[Resource, ...]  # one per Host name without port, each naming `routes`
    runtime_key: str
    runtime_entry: bytes

    @property
    def key(self) -> ModelKey:
        return (self.namespace, self.name)
