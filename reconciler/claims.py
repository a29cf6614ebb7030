"""Host claims: which model answers which Host name, decided once per reconcile.

No domain may be served by two virtual hosts (Envoy rejects the whole route
configuration), so the first model by namespace/name keeps a contested name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from api.crd import ObjectKey


@dataclass(frozen=True)
class Claim:
    domains: tuple[str, ...]  # the names this model keeps
    error: str | None = None  # the Service itself is routed by another model
    warnings: tuple[str, ...] = ()


@dataclass
class HostClaims:
    """Claims made so far in this reconcile; one instance per reconcile."""

    owners: dict[str, ObjectKey] = field(default_factory=dict)

    def claim(self, model: ObjectKey, domains: tuple[str, ...], fqdn: str, service: str) -> Claim:
        """`fqdn` identifies the Service (one Service, one model); bare names are shared across
        namespaces, so those already taken are dropped with a warning."""
        if fqdn in self.owners:
            return Claim(
                (),
                f"{model}: spec.serviceRef: Service {service} is already routed by "
                f"ModelDeployment {self.owners[fqdn]}",
            )
        warnings = tuple(
            f"Host {d!r} also names Service of {self.owners[d]}, which keeps it"
            for d in domains
            if d in self.owners
        )
        kept = tuple(d for d in domains if d not in self.owners)
        self.owners.update(dict.fromkeys(kept, model))
        return Claim(kept, None, warnings)
