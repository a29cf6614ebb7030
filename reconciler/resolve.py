"""From a ModelDeployment's references to what routing needs: its Service port, endpoints, pods."""

from __future__ import annotations

from dataclasses import dataclass

from api.crd import ModelDeployment
from reconciler.kube import ServicePort
from reconciler.store import ObjectStore


@dataclass(frozen=True)
class Backend:
    """The model's Service port and its ready endpoints, or why they cannot be had."""

    port: ServicePort | None
    endpoints: tuple[tuple[str, int], ...] = ()
    error: str | None = None


def resolve_backend(store: ObjectStore, model: ModelDeployment) -> Backend:
    ref = model.service
    service = store.service(ref.namespace, ref.name)
    if service is None:
        return Backend(
            None, error=f"{model.key}: spec.serviceRef: Service {ref.namespace}/{ref.name} not found"
        )
    port = service.port_for(ref.target_port)
    if port is None:
        wanted = ref.target_port if ref.target_port is not None else "(none given, and it has several)"
        return Backend(
            None,
            error=f"{model.key}: spec.serviceRef.targetPort: Service {ref.namespace}/{ref.name} "
            f"has no port {wanted}",
        )
    return Backend(port, ready_endpoints(store, ref.namespace, ref.name, port))


def ready_endpoints(
    store: ObjectStore, namespace: str, service: str, port: ServicePort
) -> tuple[tuple[str, int], ...]:
    """Ready addresses of the Service's EndpointSlices on the slice port named as the Service port."""
    found = set()
    for s in store.endpoint_slices(namespace, service):
        numbers = [p.port for p in s.ports if p.name == port.name] or (
            [s.ports[0].port] if len(s.ports) == 1 and not port.name else []
        )
        if not numbers and isinstance(port.target_port, int):
            numbers = [port.target_port]
        for e in s.endpoints:
            if e.ready:
                found.update((e.address, n) for n in numbers)
    return tuple(sorted(found))


def pod_count(store: ObjectStore, model: ModelDeployment, ready_endpoints: int) -> int:
    """Pods for AverageValue targets: the workload's ready replicas, else the ready endpoints."""
    if model.source is not None:
        workload = store.workload(model.source.kind, model.source.namespace, model.source.name)
        if workload is not None:
            return workload.ready_replicas or workload.replicas
    return ready_endpoints


def pod_selector(store: ObjectStore, model: ModelDeployment) -> str:
    """The workload's pod selector, where the metrics APIs find the model's pods ("" if unknown)."""
    if model.source is None:
        return ""
    workload = store.workload(model.source.kind, model.source.namespace, model.source.name)
    return workload.selector if workload is not None else ""
