"""The Kubernetes objects a ModelDeployment points at, reduced to what routing needs.

They come from a cluster or from `kubectl get -o yaml` files; either way only these
fields matter: Service ports, EndpointSlice endpoints and readiness, workload replicas.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from api.crd import InvalidObject, Meta, ObjectKey, parse_meta
from api.credentials import SecretValue
from api.fields import FieldError, Fields

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str | None
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    meta: Meta
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Service", self.meta.namespace, self.meta.name)

    def port_for(self, wanted: int | None) -> ServicePort | None:
        """The port `serviceRef.targetPort` names: by `port`, else by `targetPort`, else the only one."""
        if wanted is None:
            return self.ports[0] if len(self.ports) == 1 else None
        for p in self.ports:
            if p.port == wanted:
                return p
        for p in self.ports:
            if p.target_port == wanted:
                return p
        return None


@dataclass(frozen=True)
class Endpoint:
    address: str
    ready: bool


@dataclass(frozen=True)
class EndpointSlice:
    meta: Meta
    service_name: str
    address_type: str
    endpoints: tuple[Endpoint, ...]
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("EndpointSlice", self.meta.namespace, self.meta.name)


@dataclass(frozen=True)
class Workload:
    """A Deployment, StatefulSet, ReplicaSet or DaemonSet: its pod count feeds AverageValue targets."""

    kind: str
    meta: Meta
    replicas: int
    ready_replicas: int
    selector: str = ""  # `spec.selector` as a label selector string: how the metrics APIs find its pods

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


def _ports(items: list[Fields], with_target: bool) -> tuple[ServicePort, ...]:
    ports = []
    for p in items:
        port = p.int("port", required=True)
        target: int | str | None = None
        if with_target and p.has("targetPort"):
            raw = p.data["targetPort"]
            target = raw if isinstance(raw, int) else p.str("targetPort")
        if port is not None:
            ports.append(
                ServicePort(p.str("name", "") or "", port, target, p.str("protocol", "TCP") or "TCP")
            )
    return tuple(ports)


def parse_service(raw: Any) -> Service:
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc)
    ports = _ports(doc.sub("spec").items("ports"), with_target=True)
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name}", errors)
    return Service(meta, ports)


def parse_endpoint_slice(raw: Any) -> EndpointSlice:
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc)
    endpoints = []
    for e in doc.items("endpoints"):
        # Kubernetes: a nil `ready` condition means ready.
        ready = e.sub("conditions").bool("ready", True)
        for addr in e.list("addresses"):
            endpoints.append(Endpoint(str(addr), ready))
    service_name = meta.labels.get(SERVICE_NAME_LABEL, "")
    if not service_name:
        doc.sub("metadata").sub("labels").error(
            SERVICE_NAME_LABEL, "is required to tie the slice to its Service"
        )
    slice_ = EndpointSlice(
        meta,
        service_name,
        doc.str("addressType", "IPv4") or "IPv4",
        tuple(endpoints),
        _ports(doc.items("ports"), with_target=False),
    )
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name}", errors)
    return slice_


def parse_workload(raw: Any, kind: str) -> Workload:
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc)
    status = doc.sub("status")
    if kind == "DaemonSet":
        replicas = status.int("desiredNumberScheduled", 0) or 0
        ready = status.int("numberReady", 0) or 0
    else:
        replicas = doc.sub("spec").int("replicas", 1)
        replicas = 1 if replicas is None else replicas
        ready = status.int("readyReplicas", 0) or 0
    selector = label_selector(doc.sub("spec").sub("selector"))
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name}", errors)
    return Workload(kind, meta, replicas, ready, selector)


def label_selector(f: Fields) -> str:
    """A `LabelSelector` (matchLabels and matchExpressions) as the string the API's `labelSelector` takes."""
    terms = [f"{k}={v}" for k, v in sorted(f.string_map("matchLabels").items())]
    for e in f.items("matchExpressions"):
        key, op = e.str("key", "") or "", e.str("operator", "") or ""
        values = [str(v) for v in e.list("values")]
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
        elif key or op:
            e.error("operator", f"must be In, NotIn, Exists or DoesNotExist, got {op!r}")
    return ",".join(terms)


@dataclass(frozen=True)
class Secret:
    """A Secret's data (base64 `data` decoded, `stringData` as written), held only while a
    remote's credentials refer to it (Kubernetes mode) and never shown: see `SecretValue`."""

    meta: Meta
    type: str
    data: tuple[tuple[str, SecretValue], ...]

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Secret", self.meta.namespace, self.meta.name)

    def get(self, key: str) -> SecretValue | None:
        return next((v for k, v in self.data if k == key), None)


def parse_secret(raw: Any) -> Secret:
    """A v1 Secret. Errors name the key, never the value."""
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc)
    data: dict[str, SecretValue] = {}
    for key, value in (doc.data.get("data") or {}).items() if isinstance(doc.data.get("data"), dict) else ():
        try:
            data[str(key)] = SecretValue(base64.b64decode(str(value or ""), validate=True))
        except (binascii.Error, ValueError):
            doc.sub("data").error(str(key), "is not base64")
    if doc.has("data") and not isinstance(doc.data.get("data"), dict):
        doc.error("data", "must be a mapping")
    string_data = doc.data.get("stringData")
    if isinstance(string_data, dict):  # as the API server does, stringData wins over data
        data.update(
            {str(k): SecretValue(str("" if v is None else v).encode()) for k, v in string_data.items()}
        )
    elif string_data is not None:
        doc.error("stringData", "must be a mapping")
    secret_type = doc.str("type", "Opaque") or "Opaque"
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name}", errors)
    return Secret(meta, secret_type, tuple(sorted(data.items(), key=lambda kv: kv[0])))
