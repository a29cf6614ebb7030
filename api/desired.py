"""The contract between the reconciler and the Envoy side: desired state per model, and its names.

The reconciler decides a `ModelRoute` per model; `xds` turns it into Envoy resources.
Neither imports the other. The naming rules live here too, because the builder, NACK
attribution and status all have to agree on which Envoy resources belong to which model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from api.crd import RemoteBackend, Spillover
from api.load import ClusterLoad

ModelKey = tuple[str, str]  # (namespace, name) of a ModelDeployment

CLUSTER_PREFIX = "overspill/"
RUNTIME_PREFIX = "overspill."
SIDES = ("local", "remote")
ROUTES = "routes"  # the last part of a model's route configuration name
# The last part of a model's composite cluster [local, remote] that spills over on retry: not a
# side of its own (its requests are counted at the local and remote clusters' hosts).
SPILLOVER = "spillover"


def cluster_name(namespace: str, name: str, side: str) -> str:
    """`overspill/<ns>/<name>/<side>`: '/' cannot occur in Kubernetes names, so it parses back."""
    return f"{CLUSTER_PREFIX}{namespace}/{name}/{side}"


def runtime_key(namespace: str, name: str) -> str:
    """Where Envoy finds a model's remote share (admin `/runtime` shows it under this name)."""
    return f"{RUNTIME_PREFIX}{namespace}.{name}"


def virtual_host_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def route_config_name(namespace: str, name: str) -> str:
    """`overspill/<ns>/<name>/routes`: the model's own route configuration, named like its
    clusters so that an Envoy error naming it ("... in route overspill/ns/name/routes") and
    `model_of` both lead back to the model."""
    return f"{CLUSTER_PREFIX}{namespace}/{name}/{ROUTES}"


def remote_member_name(namespace: str, name: str, index: int) -> str:
    """`overspill/<ns>/<name>/remote/<i>`: the i-th of several remotes (in the user's order),
    one cluster each behind the model's remote cluster."""
    return f"{cluster_name(namespace, name, 'remote')}/{index}"


def side_clusters(namespace: str, name: str, side: str, remotes: int = 1) -> tuple[str, ...]:
    """The clusters that carry a side's requests, whose load reports count: the remote cluster
    itself, or with several remotes the cluster of each (the aggregate over them has no hosts)."""
    if side == "remote" and remotes > 1:
        return tuple(remote_member_name(namespace, name, i) for i in range(remotes))
    return (cluster_name(namespace, name, side),)


def model_of(resource_name: str) -> ModelKey | None:
    """The model a cluster, endpoint set (by its cluster name), route configuration, or a
    resource named under one of its clusters (`<cluster>/<part>`: a remote's secrets and token
    endpoint) belongs to."""
    if not resource_name.startswith(CLUSTER_PREFIX):
        return None
    parts = resource_name[len(CLUSTER_PREFIX) :].split("/")
    if (
        len(parts) < 3
        or (parts[2] not in SIDES and parts[2] not in (ROUTES, SPILLOVER))
        or (len(parts) > 3 and parts[2] != "remote")
    ):
        return None
    return parts[0], parts[1]


def side_of(cluster: str) -> tuple[ModelKey, str] | None:
    """The model and side (local, remote) of a model's cluster, the cluster of one of several
    remotes being on the remote side; None for any other name (the spill-over composite too: it
    has no hosts, so its load shows at the two sides)."""
    key = model_of(cluster)
    if key is None:
        return None
    parts = cluster.split("/")
    side = parts[-2] if parts[-1].isdigit() else parts[-1]
    return (key, side) if side in SIDES else None


def loads_by_side(clusters: Mapping[str, ClusterLoad]) -> dict[tuple[ModelKey, str], ClusterLoad]:
    """Per model and side (local, remote), in cluster name order: the clusters of several remotes
    summed into their model's remote side; clusters of no model left out."""
    sides: dict[tuple[ModelKey, str], ClusterLoad] = {}
    for cluster in sorted(clusters):
        found = side_of(cluster)
        if found is not None:
            sides.setdefault(found, ClusterLoad()).add(clusters[cluster])
    return sides


def models_named_in(message: str, keys: set[ModelKey]) -> list[ModelKey]:
    """The models whose resources an Envoy error message names (cluster, route configuration or
    virtual host names)."""
    return sorted(k for k in keys if f"{k[0]}/{k[1]}/" in message or f"'{k[0]}/{k[1]}'" in message)


def service_domains(
    name: str, namespace: str, port: int, cluster_domain: str = "cluster.local"
) -> tuple[str, ...]:
    """The Host values clients use for a Service, with and without its port."""
    names = (
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.{cluster_domain}",
    )
    return tuple(d for n in names for d in (n, f"{n}:{port}"))


def host_of(domain: str) -> str:
    """A Host value without its port: how Envoy picks a model's routing scope (`svc.ns:80` -> `svc.ns`)."""
    return domain.split(":", 1)[0]


@dataclass(frozen=True)
class ModelRoute:
    """Everything Envoy needs to route one model; hashable so unchanged models cost nothing."""

    namespace: str
    name: str
    domains: tuple[str, ...]
    endpoints: tuple[tuple[str, int], ...]
    remotes: tuple[RemoteBackend, ...]  # the remotes allowed, in order of preference
    remote_percent: float
    labels: tuple[tuple[str, str], ...] = ()
    # Set (enabled, with a remote) when Envoy retries what the local pods turn away on the remote.
    spillover: Spillover | None = None

    @property
    def key(self) -> ModelKey:
        return (self.namespace, self.name)

    @property
    def remote(self) -> RemoteBackend | None:
        """The preferred remote (with one remote, the only one)."""
        return self.remotes[0] if self.remotes else None

    @property
    def local_cluster(self) -> str:
        return cluster_name(self.namespace, self.name, "local")

    @property
    def remote_cluster(self) -> str:
        return cluster_name(self.namespace, self.name, "remote")

    @property
    def spillover_cluster(self) -> str:
        return cluster_name(self.namespace, self.name, SPILLOVER)

    @property
    def runtime_key(self) -> str:
        return runtime_key(self.namespace, self.name)

    @property
    def route_config(self) -> str:
        return route_config_name(self.namespace, self.name)

    @property
    def hosts(self) -> tuple[str, ...]:
        """Its Host names without port, each once, in the order of `domains`."""
        return tuple(dict.fromkeys(host_of(d) for d in self.domains))
