"""The versioned resource cache: what every stream serves, serialized once per content.

Like go-control-plane's snapshot cache, but a type's version moves only when one of its
resources' bytes change, and streams are woken by one event instead of being pushed to.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from xds import wire
from xds.types import PUSH_ORDER


@dataclass(frozen=True)
class Resource:
    """One named resource: its message bytes, its Any envelope and a content version."""

    name: str
    any: bytes
    version: str

    @classmethod
    def of(cls, type_url: str, name: str, body: bytes) -> Resource:
        return cls(name, wire.any_bytes(type_url, body), hashlib.blake2b(body, digest_size=8).hexdigest())


class ResourceCache:
    def __init__(self) -> None:
        self._resources: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        self._versions: dict[str, int] = dict.fromkeys(PUSH_ORDER, 0)
        self._changed = asyncio.Event()
        self.ready = False  # set once the first complete state is in: no stream is served before

    def set(self, type_url: str, resources: dict[str, Resource]) -> bool:
        old = self._resources[type_url]
        if old.keys() == resources.keys() and all(old[k].version == r.version for k, r in resources.items()):
            return False
        self._resources[type_url] = resources
        self._versions[type_url] += 1
        return True

    def commit(self) -> None:
        """Wake every stream once after a batch of `set` calls, so they see a consistent state."""
        self.ready = True
        self._changed.set()
        self._changed = asyncio.Event()

    def changed_event(self) -> asyncio.Event:
        return self._changed

    def version(self, type_url: str) -> str:
        return str(self._versions[type_url])

    def resources(self, type_url: str) -> dict[str, Resource]:
        return self._resources[type_url]
