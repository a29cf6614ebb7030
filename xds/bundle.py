"""Serialized resources: the unit the cache stores and the streams send."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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


class Deferred:
    """A resource built the first time it is asked for, then kept."""

    __slots__ = ("_build", "_value")

    def __init__(self, build: Callable[[], Resource]):
        self._build: Callable[[], Resource] | None = build
        self._value: Resource | None = None

    def __call__(self) -> Resource:
        if self._build is not None:
            self._value, self._build = self._build(), None
        assert self._value is not None
        return self._value


@dataclass(frozen=True)
class ModelBundle:
    """One model's serialized resources: the unit a change replaces in every view."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    clusters: tuple[Resource, ...]
    endpoints: Resource
    routes: Resource  # its route configuration; the remote share comes over RTDS
    # The same with the current remote share written in, for nodes that do not take the weight
    # layers (a hand-written bootstrap). Built on first use: only a view serving such a node
    # asks, so a weight change costs the others nothing more.
    routes_weight_inline: Deferred
    scopes: tuple[Resource, ...]  # one per Host name without port, each naming `routes`
    runtime_key: str
    runtime_entry: bytes
    secrets: tuple[Resource, ...] = ()  # its remotes' credentials (SDS), named after their clusters

    @property
    def key(self) -> ModelKey:
        return (self.namespace, self.name)
