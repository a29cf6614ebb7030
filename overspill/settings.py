"""`overspill serve` settings: the one place their defaults are written (the CLI reads them here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from api.crd import RemoteBackend
from reconciler.documents import Limits


@dataclass
class Settings:
    manifests: Path | None = None
    state_dir: Path | None = None  # directory mode: where the offload state survives a restart
    xds_address: str = "0.0.0.0"
    xds_port: int = 18000
    # xDS over TLS: the server's certificate and key; with a client CA, mTLS (a client
    # certificate is required, and its identity bounds the namespaces the node receives).
    xds_tls_cert: Path | None = None
    xds_tls_key: Path | None = None
    xds_client_ca: Path | None = None
    xds_gateway_identities: list[str] = field(default_factory=list)  # SAN globs that receive every model
    listener_address: str = "0.0.0.0"
    listener_port: int = 10000
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 9102
    prometheus_url: str | None = None
    evaluation_interval: float = 5.0
    load_report_interval: float = 1.0  # how often Envoys send their load reports (LRS)
    default_remote: RemoteBackend | None = None
    cluster_domain: str = "cluster.local"
    manifest_limits: Limits = field(default_factory=Limits)  # what one manifest file may hold
    # Kubernetes mode (instead of `manifests`)
    kubernetes: bool = False
    kubeconfig: str | None = None
    context: str | None = None
    namespaces: list[str] = field(default_factory=list)  # empty: all
    leader_elect: bool = False
    lease_name: str = "overspill-leader"
    lease_namespace: str | None = None  # default: the pod's namespace (POD_NAMESPACE), else overspill-system
    identity: str | None = None  # default: the pod's name (POD_NAME), else the host name
    lease_seconds: float = 15.0


DEFAULTS = Settings()
