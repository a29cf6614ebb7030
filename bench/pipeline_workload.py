"""The pipeline benchmark's workload: N models as a user keeps them in a manifests directory,
the loopback HTTP servers their endpoints and remotes point at, and the edits a user makes.

Model i is `m-<i>` in namespace `team-<i % 8>`: a ModelDeployment (`percentage: 50`, an
External metric with `matchLabels` unless `metrics=False`, `offloadingConfig.remoteBackend`
`http://127.0.0.1:<port>` unless `remotes=False`), its Service and its EndpointSlice (one ready
endpoint, 127.0.0.1 on one of the local backends' ports). Layout `per-file` writes one YAML file
per model, `one-file` every object into one file. Every write is atomic (a hidden temporary
file, then a rename), as editors and `kubectl get -o yaml > f` followed by `mv` do, so the
control plane never reads half a file.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from overspill.demo.sim import ModelServer

NAMESPACES = 8
SERVICE_PORT = 8080
LAYOUTS = ("per-file", "one-file")
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class Workload:
    n: int
    layout: str = "per-file"
    remotes: bool = True
    metrics: bool = True

    @property
    def variant(self) -> str:
        parts = [self.layout]
        if not self.remotes:
            parts.append("no-remotes")
        if not self.metrics:
            parts.append("no-metrics")
        return ",".join(parts)

    @property
    def clusters(self) -> int:
        """Clusters Envoy holds for the models: a local one each, and a remote one each."""
        return self.n * (2 if self.remotes else 1)


def model_name(i: int) -> str:
    return f"m-{i:05d}"


def model_namespace(i: int) -> str:
    return f"team-{i % NAMESPACES}"


def host_of(name: str, namespace: str) -> str:
    """The Host header a client in the cluster would send: the Service's full DNS name and port."""
    return f"{name}.{namespace}.svc.cluster.local:{SERVICE_PORT}"


def model_objects(
    name: str,
    namespace: str,
    local_port: int,
    remote_port: int | None,
    metrics: bool,
    ready: bool = True,
    behavior: dict[str, Any] | None = None,
    metric: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """ModelDeployment, Service and EndpointSlice, as `kubectl get -o yaml` shows them; `behavior`
    and `metric` (an HPA MetricSpec) replace the workload's own where a benchmark needs others."""
    offloading: dict[str, Any] = {
        "behavior": behavior or {"percentage": 50, "activationDelaySeconds": 0, "bufferDurationSeconds": 30}
    }
    if remote_port is not None:
        offloading["remoteBackend"] = {
            "host": f"127.0.0.1:{remote_port}",
            "scheme": "http",
            "headersToAdd": [{"name": "x-offloaded-by", "value": "overspill"}],
        }
    if metrics:
        offloading["metrics"] = [
            metric
            or {
                "type": "External",
                "external": {
                    "metric": {
                        "name": "model_inflight_requests",
                        "selector": {"matchLabels": {"model": name, "namespace": namespace}},
                    },
                    "target": {"type": "Value", "value": "8"},
                },
            }
        ]
    model = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": name,
            "environment": "production",
            "modelSourceRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": name,
                "namespace": namespace,
            },
            "serviceRef": {"name": name, "namespace": namespace, "targetPort": SERVICE_PORT},
            "offloadingConfig": offloading,
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": name},
            "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP", "targetPort": "http"}],
        },
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-x7k2p",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
            }
        ],
        "ports": [{"name": "http", "port": local_port, "protocol": "TCP"}],
    }
    return [model, service, endpoint_slice]


def dump(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False)


def write_atomic(path: Path, text: str) -> float:
    """Write through a hidden temporary file and a rename; returns `time.monotonic()` just before
    the rename, the moment the change becomes visible to a reader of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    stamp = time.monotonic()
    os.replace(tmp, path)
    return stamp


class Backends:
    """Loopback HTTP servers (`ModelServer`, answering 200 with `x-served-by`) that the models'
    endpoints and remotes point at; a few ports shared by all models."""

    def __init__(self, local: int = 8, remote: int = 4) -> None:
        self.local = [ModelServer(f"local-{i}", None, 0.0) for i in range(local)]
        self.remote = [ModelServer(f"remote-{i}", None, 0.0) for i in range(remote)]
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Backends:
        try:
            for server in [*self.local, *self.remote]:
                await self._stack.enter_async_context(server)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def local_port(self, i: int) -> int:
        port = self.local[i % len(self.local)].port
        assert port is not None
        return port

    def remote_port(self, i: int) -> int:
        port = self.remote[i % len(self.remote)].port
        assert port is not None
        return port

    def name_of_port(self, port: int) -> str:
        return next(s.name for s in [*self.local, *self.remote] if s.port == port)


@dataclass
class ModelFile:
    """Where one model's objects live, and their current text."""

    index: int
    name: str
    namespace: str
    local_port: int
    remote_port: int | None
    ready: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def host(self) -> str:
        return host_of(self.name, self.namespace)

    @property
    def cluster_local(self) -> str:
        return f"overspill/{self.namespace}/{self.name}/local"

    @property
    def cluster_remote(self) -> str:
        return f"overspill/{self.namespace}/{self.name}/remote"

    @property
    def runtime_key(self) -> str:
        return f"overspill.{self.namespace}.{self.name}"


class ModelSet:
    """The N models of a workload and a user's edits to them; subclasses say how they are stored
    (`ManifestDir` for Overspill; sovereign's bench keeps them as its source's instance list)."""

    def __init__(self, root: Path, workload: Workload, backends: Backends) -> None:
        self.root = root
        self.workload = workload
        self.backends = backends
        self.models: list[ModelFile] = []
        self._added = 0

    def _model(self, i: int, name: str | None = None) -> ModelFile:
        return ModelFile(
            i,
            name or model_name(i),
            model_namespace(i),
            self.backends.local_port(i),
            self.backends.remote_port(i) if self.workload.remotes else None,
        )

    def write(self) -> None:
        """Write all N models (run in a thread: 10,000 files take a few seconds)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.models = [self._model(i) for i in range(self.workload.n)]
        self._write_all()

    def add_model(self) -> tuple[ModelFile, float]:
        """A new model on a local backend; returns it and the moment it became visible."""
        self._added += 1
        m = self._model(self.workload.n + self._added, name=f"new-{self._added:03d}")
        return m, self._write_new(m)

    def rewrite(self, m: ModelFile) -> float:
        """Store a changed model; returns the moment the change became visible."""
        raise NotImplementedError

    def _write_all(self) -> None:
        raise NotImplementedError

    def _write_new(self, m: ModelFile) -> float:
        raise NotImplementedError

    def sample(self, count: int) -> list[ModelFile]:
        """`count` models spread evenly over the set."""
        step = max(1, len(self.models) // max(1, count))
        return self.models[::step][:count]


class ManifestDir(ModelSet):
    """The directory a user hands to `overspill serve --manifests`."""

    def __init__(self, root: Path, workload: Workload, backends: Backends) -> None:
        super().__init__(root, workload, backends)
        self._texts: list[str] = []

    def _text(self, m: ModelFile) -> str:
        return dump(
            model_objects(m.name, m.namespace, m.local_port, m.remote_port, self.workload.metrics, m.ready)
        )

    def _one_file(self) -> Path:
        return self.root / "models.yaml"

    def _write_all(self) -> None:
        self._texts = [self._text(m) for m in self.models]
        if self.workload.layout == "one-file":
            write_atomic(self._one_file(), "---\n".join(self._texts))
        else:
            for m, text in zip(self.models, self._texts, strict=True):
                (self.root / f"{m.name}.yaml").write_text(text)

    def rewrite(self, m: ModelFile) -> float:
        """Write a changed model back where it lives (in `one-file`, the whole file again)."""
        text = self._text(m)
        if m.index >= self.workload.n:
            return write_atomic(self.root / f"{m.name}.yaml", text)
        self._texts[m.index] = text
        if self.workload.layout == "one-file":
            return write_atomic(self._one_file(), "---\n".join(self._texts))
        return write_atomic(self.root / f"{m.name}.yaml", text)

    def _write_new(self, m: ModelFile) -> float:
        """A new model gets a new file of its own, in both layouts."""
        return write_atomic(self.root / f"{m.name}.yaml", self._text(m))


async def write_models(model_set: ModelSet) -> ModelSet:
    await asyncio.to_thread(model_set.write)
    return model_set
