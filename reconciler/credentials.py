"""A remote's credentials: the Secret keys its references name, read from the object store.

Secrets are looked up in the model's own namespace only (as a Pod's `secretKeyRef` is), so a
ModelDeployment can never send another namespace's credentials. Errors name the Secret and the
key and the field that refers to them, never a value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from api.crd import ObjectKey, RemoteBackend
from reconciler.kube import Secret
from reconciler.store import ObjectStore


def secret_keys(namespace: str, remotes: Iterable[RemoteBackend]) -> tuple[ObjectKey, ...]:
    """The Secrets the remotes' credentials refer to: what the model depends on."""
    names = dict.fromkeys(ref.name for remote in remotes for ref in remote.secret_refs())
    return tuple(ObjectKey("Secret", namespace, name) for name in names)


def resolve(store: ObjectStore, namespace: str, remote: RemoteBackend) -> tuple[RemoteBackend, list[str]]:
    """The remote with the values of its Secret keys filled in, and what could not be read."""
    refs = remote.secret_refs()
    if not refs:
        return remote, []
    values, errors = [], []
    for ref in refs:
        secret = store.get(ObjectKey("Secret", namespace, ref.name))
        value = secret.get(ref.key) if isinstance(secret, Secret) else None
        if value is None:
            why = "not found" if secret is None else f"has no key {ref.key!r}"
            errors.append(f"{ref.path}: Secret {namespace}/{ref.name} {why}")
        elif (ref.name, ref.key) not in (v[0] for v in values):
            values.append(((ref.name, ref.key), value))
    return replace(remote, secrets=tuple(values)), errors
