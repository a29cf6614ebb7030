"""`overspill serve` settings: the one place their defaults are written (the CLI reads them here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from api.crd import RemoteBackend


@dataclass
class Settings:
    manifests: Path | None = None
    xds_address: str = "0.0.0.0"
    xds_port: int = 18000
    listener_address: str = "0.0.0.0"
    listener_port: int = 10000
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 9102
    prometheus_url: str | None = None
    evaluation_interval: float = 5.0
    default_remote: RemoteBackend | None = None
    cluster_domain: str = "cluster.local"


DEFAULTS = Settings()
