"""Which remotes a model's Policies allow: seed 001's location and flavor rules, enforced.

`allowed_remotes` is pure: given the remotes and the resolved Policies it returns those that
may have traffic and, for each other, the Policy and rule it does not meet. Within one Policy
the rules of one kind are alternatives (any listed location will do) and every kind it lists
must be met; every attached Policy must be met. A remote that declares no location (flavor)
meets no location (flavor) rule. Codes and names compare case-insensitively. A Policy that
cannot be read (not found, never valid) allows no remote: offloading is held off rather than
sent where the Policy might forbid.

`remotePolicy` references are not enforced here: the remote platform keeps them, and their
names travel to it in the `x-overspill-remote-policies` header of every offloaded request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from api.crd import ModelDeployment, ObjectKey, Policy, PolicyRule, RemoteBackend
from api.status import PolicyRefusal
from reconciler.store import ObjectStore

REMOTE_POLICIES_HEADER = "x-overspill-remote-policies"
VIOLATION, NOT_FOUND, INVALID = "PolicyViolation", "PolicyNotFound", "PolicyInvalid"


@dataclass(frozen=True)
class Unresolved:
    """A local Policy a model names that the store cannot give: why, in a user's words."""

    policy: str  # namespace/name
    reason: str  # NOT_FOUND or INVALID
    message: str


@dataclass(frozen=True)
class Resolved:
    """A model's Policies as the store holds them now: what the filter and the status need."""

    policies: tuple[Policy, ...] = ()
    unresolved: tuple[Unresolved, ...] = ()
    remote_names: tuple[str, ...] = ()  # remotePolicy names, in the user's order

    @property
    def local_names(self) -> list[str]:
        return [str(p.key) for p in self.policies] + [u.policy for u in self.unresolved]


@dataclass(frozen=True)
class Verdict:
    """The remotes that may have traffic, in the order given, and why each other may not."""

    allowed: tuple[RemoteBackend, ...]
    refused: tuple[PolicyRefusal, ...]


NO_POLICIES = Resolved()


def policy_keys(model: ModelDeployment) -> tuple[ObjectKey, ...]:
    """The Policies a model's `localPolicy` references name (the store keys its decision depends on)."""
    names = dict.fromkeys(ref.name for ref in model.policies if ref.local)
    return tuple(ObjectKey("Policy", model.meta.namespace, name) for name in names)


def resolve(store: ObjectStore, model: ModelDeployment) -> Resolved:
    """A model's local Policies from the store (same namespace), and its remote policy names."""
    if not model.policies:
        return NO_POLICIES
    found, unresolved = [], []
    for key in policy_keys(model):
        policy = store.get(key)
        if policy is not None:
            found.append(policy)
            continue
        rejected = store.rejected_for(key)
        if rejected:
            why = "; ".join(str(r) for r in rejected)
            unresolved.append(Unresolved(str(key), INVALID, f"Policy {key} is invalid: {why}"))
        else:
            unresolved.append(Unresolved(str(key), NOT_FOUND, f"Policy {key} not found"))
    remote = tuple(dict.fromkeys(ref.name for ref in model.policies if not ref.local))
    return Resolved(tuple(found), tuple(unresolved), remote)


def allowed_remotes(remotes: Sequence[RemoteBackend], resolved: Resolved) -> Verdict:
    """Split `remotes` into those every Policy allows and, for the others, a refusal per Policy."""
    if not resolved.policies and not resolved.unresolved:
        return Verdict(tuple(remotes), ())  # the common case: every model's reconcile asks
    allowed, refused = [], []
    for remote in remotes:
        mine = [
            PolicyRefusal(
                remote.url, u.policy, u.reason, f"{u.message}: offloading held off until {_until(u)}"
            )
            for u in resolved.unresolved
        ]
        for policy in resolved.policies:
            unmet = unmet_rule(remote, policy)
            if unmet is not None:
                mine.append(PolicyRefusal(remote.url, str(policy.key), VIOLATION, unmet))
        if mine:
            refused.extend(mine)
        else:
            allowed.append(remote)
    return Verdict(tuple(allowed), tuple(refused))


def _until(unresolved: Unresolved) -> str:
    return "it exists" if unresolved.reason == NOT_FOUND else "it is valid"


def unmet_rule(remote: RemoteBackend, policy: Policy) -> str | None:
    """None when `remote` meets `policy`; else what it lacks, naming the Policy and the rule."""
    problems = []
    if policy.locations and not any(_location_matches(remote, r) for r in policy.locations):
        options = " or ".join(f"{r.type}={r.name}" for r in policy.locations)
        problems.append(f"location {options} required, remote is at {_where(remote)}")
    if policy.flavors and not any(_flavor_matches(remote, r) for r in policy.flavors):
        options = " or ".join(f"{r.type}/{r.name}" for r in policy.flavors)
        have = f"{remote.flavor.type}/{remote.flavor.name}" if remote.flavor else "no declared flavor"
        problems.append(f"flavor {options} required, remote runs {have}")
    if not problems:
        return None
    return f"remote {remote.url} does not satisfy Policy {policy.key}: {'; '.join(problems)}"


def _location_matches(remote: RemoteBackend, rule: PolicyRule) -> bool:
    if remote.location is None:
        return False
    have = {"country": remote.location.country, "continent": remote.location.continent}.get(
        rule.type, remote.location.name
    )
    return bool(have) and have.casefold() == rule.name.casefold()


def _flavor_matches(remote: RemoteBackend, rule: PolicyRule) -> bool:
    flavor = remote.flavor
    return (
        flavor is not None
        and flavor.type.casefold() == rule.type.casefold()
        and flavor.name.casefold() == rule.name.casefold()
    )


def _where(remote: RemoteBackend) -> str:
    loc = remote.location
    if loc is None:
        return "no declared location"
    parts = [
        f"{k}={v}"
        for k, v in (("country", loc.country), ("continent", loc.continent), ("location", loc.name))
        if v
    ]
    return ", ".join(parts)


def with_remote_policies(remote: RemoteBackend, names: Sequence[str]) -> RemoteBackend:
    """`remote` whose offloaded requests carry the remote policy names (comma-separated), so the
    remote platform can enforce them; unchanged without any."""
    if not names:
        return remote
    header = (REMOTE_POLICIES_HEADER, ",".join(names))
    return dataclasses.replace(remote, headers_to_add=(*remote.headers_to_add, header))
