"""Host claims: which model answers which Host name, kept across reconciles.

No domain may be served by two virtual hosts (Envoy rejects the whole route
configuration), so the first model by namespace/name keeps a contested name. A Service's
FQDN names one Service, so of the models routing one Service only the first is served; the
others claim nothing. Claims are a function of what every model wants, so deciding one
model again tells which other models' claims that changed, and only those are decided too.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.crd import ObjectKey


@dataclass(frozen=True)
class Claim:
    domains: tuple[str, ...]  # the names this model keeps
    error: str | None = None  # the Service itself is routed by another model
    warnings: tuple[str, ...] = ()


class HostClaims:
    """What each model wants (its Service's names) and who keeps each name."""

    def __init__(self) -> None:
        self._wants: dict[ObjectKey, tuple[tuple[str, ...], str, str]] = {}  # domains, fqdn, service
        self._by_name: dict[str, set[ObjectKey]] = {}

    def want(self, model: ObjectKey, domains: tuple[str, ...], fqdn: str, service: str) -> set[ObjectKey]:
        """Record the names `model` wants; returns the other models whose claim this changed."""
        if self._wants.get(model) == (domains, fqdn, service):
            return set()
        return self._change(model, (domains, fqdn, service))

    def forget(self, model: ObjectKey) -> set[ObjectKey]:
        """`model` wants nothing (gone, or its Service cannot be resolved)."""
        if model not in self._wants:
            return set()
        return self._change(model, None)

    def claim(self, model: ObjectKey) -> Claim:
        domains, fqdn, service = self._wants[model]
        owner = self._fqdn_owner(fqdn)
        if owner != model:
            return Claim(
                (),
                f"{model}: spec.serviceRef: Service {service} is already routed by ModelDeployment {owner}",
            )
        kept, warnings = [], []
        for d in domains:
            holder = model if len(self._by_name[d]) == 1 else self._owner(d)  # uncontested: the usual case
            if holder == model:
                kept.append(d)
            else:
                warnings.append(f"Host {d!r} also names Service of {holder}, which keeps it")
        return Claim(tuple(kept), None, tuple(warnings))

    def _change(self, model: ObjectKey, want: tuple[tuple[str, ...], str, str] | None) -> set[ObjectKey]:
        old = self._wants.get(model)
        names = set(old[0]) | {old[1]} if old else set()
        if want is not None:
            names |= set(want[0]) | {want[1]}
        neighbours = {k for n in names for k in self._by_name.get(n, ())} - {model}
        before = {k: self.claim(k) for k in neighbours}
        if old is not None:
            for n in (*old[0], old[1]):
                holders = self._by_name.get(n)
                if holders is not None:
                    holders.discard(model)
                    if not holders:
                        del self._by_name[n]
            del self._wants[model]
        if want is not None:
            self._wants[model] = want
            for n in (*want[0], want[1]):
                self._by_name.setdefault(n, set()).add(model)
        return {k for k in neighbours if self.claim(k) != before[k]}

    def _fqdn_owner(self, fqdn: str) -> ObjectKey:
        holders = self._by_name[fqdn]
        if len(holders) == 1:
            return next(iter(holders))
        return min(k for k in holders if self._wants[k][1] == fqdn)

    def _owner(self, name: str) -> ObjectKey | None:
        """The first model by namespace/name wanting `name` among those serving their Service."""
        serving = [k for k in self._by_name.get(name, ()) if self._fqdn_owner(self._wants[k][1]) == k]
        return min(serving, default=None)
