"""Which models a node receives, from what its bootstrap says in `node.metadata.overspill`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from xds.bundle import ModelBundle


@dataclass(frozen=True)
class Scope:
    """Which models a node receives, from its bootstrap `node.metadata.overspill`.

    `namespaces` (a list) and `matchLabels` (ModelDeployment labels) narrow the set; a node
    without them receives every model (an edge gateway). `listenerPort` gives the node its
    own listener port, as a sidecar beside a gateway on one host needs.
    """

    namespaces: frozenset[str] | None = None
    match_labels: tuple[tuple[str, str], ...] = ()
    listener_port: int | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> Scope:
        conf = (metadata or {}).get("overspill") or {}
        if not isinstance(conf, dict):
            return cls()
        namespaces = conf.get("namespaces")
        if isinstance(namespaces, str):
            namespaces = [n.strip() for n in namespaces.split(",") if n.strip()]
        labels = conf.get("matchLabels") or {}
        port = conf.get("listenerPort")
        return cls(
            frozenset(str(n) for n in namespaces) if namespaces else None,
            tuple(sorted((str(k), str(v)) for k, v in labels.items())) if isinstance(labels, dict) else (),
            _port(port),
        )

    def within(self, allowed: frozenset[str] | None) -> Scope:
        """This scope bounded by the namespaces a node's certificate allows (None: no bound). A
        scope naming no namespaces asks for all, so it gets exactly the allowed ones."""
        if allowed is None:
            return self
        return replace(self, namespaces=allowed if self.namespaces is None else self.namespaces & allowed)

    def admits(self, bundle: ModelBundle) -> bool:
        if self.namespaces is not None and bundle.namespace not in self.namespaces:
            return False
        labels = dict(bundle.labels)
        return all(labels.get(k) == v for k, v in self.match_labels)

    def __str__(self) -> str:
        parts = []
        if self.namespaces is not None:
            parts.append("namespaces=" + (",".join(sorted(self.namespaces)) or "-"))
        if self.match_labels:
            parts.append("labels=" + ",".join(f"{k}={v}" for k, v in self.match_labels))
        if self.listener_port:
            parts.append(f"listenerPort={self.listener_port}")
        return " ".join(parts) or "all"


def _port(value: Any) -> int | None:
    """A port from node metadata, where protobuf Struct turns every number into a float."""
    try:
        port = int(float(value))
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None
