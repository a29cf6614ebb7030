"""sovereign (the Python REST control plane) beside Overspill, on the same models and backends.

sovereign is installed on demand into its own venv (default `out/sovereign-venv`, ignored by
git): `python -m venv` then `pip install sovereign`. It runs as its users run it (`sovereign`,
gunicorn + uvicorn workers) with a file source and python templates (its fast mode: no Jinja
rendering and no YAML round trip per request). What it serves mirrors what Overspill serves for a
model: a local cluster (its ready endpoints inline: REST EDS would be one poller per cluster), a
remote cluster, a virtual host answering the Service's names with the same two routes
(`runtime_fraction` on the key `overspill.<ns>.<name>` to the remote, the rest local) and the
model's remote share in a runtime layer (RTDS over REST). The templates apply Overspill's outage
rule (no ready endpoint and a remote: 100 %, else 0 %); sovereign has no metric reading, so the
External metric is not part of its workload. Envoy polls each of CDS, LDS, RDS and RTDS every
`--sovereign-refresh` seconds and sovereign re-reads its source as often (its shortest: 1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from api.desired import service_domains
from bench.pipeline_envoy import cpu_seconds, tree_pids
from bench.pipeline_workload import SERVICE_PORT, Backends, ModelFile, ModelSet, Workload, write_atomic
from overspill.demo.procs import ManagedProcess, free_port

LAYER = "sovereign_weights"
ENVOY_BUILD = "0/1.40.0/Clean/RELEASE"


class SovereignUnavailable(RuntimeError):
    """sovereign could not be installed or run here; the message says why."""


def ensure_sovereign(venv: Path, say: Callable[[str], None]) -> Path:
    """The `sovereign` console script of `venv`, creating the venv and installing it if needed."""
    script = venv / "bin" / "sovereign"
    if script.exists():
        return script
    say(f"installing sovereign into {venv} (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        done = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", "sovereign"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise SovereignUnavailable(f"creating {venv} failed: {exc}") from exc
    if done.returncode != 0 or not script.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SovereignUnavailable(f"pip install sovereign failed (exit {done.returncode}):\n{tail}")
    return script


# The python templates sovereign loads (`python://` loader): each module's `call` returns one xDS
# type's resources for all instances. Written into the run's work directory.
TEMPLATES = {
    "clusters": """
def _cluster(name, hosts):
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                for a, p in hosts
            ]}],
        },
    }


def call(instances, **kwargs):
    for m in instances:
        base = "overspill/%s/%s/" % (m["namespace"], m["name"])
        yield _cluster(base + "local", [(e["address"], e["port"]) for e in m["endpoints"] if e["ready"]])
        if m["remote"]:
            yield _cluster(base + "remote", [(m["remote"]["address"], m["remote"]["port"])])
""",
    "listeners": """
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def call(instances, **kwargs):
    return [{
        "name": "overspill_http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": LISTENER_PORT}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": "overspill",
                "rds": {"route_config_name": "overspill_routes", "config_source": CONFIG_SOURCE},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
            },
        }]}],
    }]
""",
    "routes": """
RETRY = {"retry_on": "connect-failure,refused-stream,reset-before-request", "num_retries": 2}


def _vhost(m):
    base = "overspill/%s/%s/" % (m["namespace"], m["name"])
    routes = []
    if m["remote"]:
        r = m["remote"]
        routes.append({
            "name": "remote",
            "match": {"prefix": "/", "runtime_fraction": {
                "default_value": {"numerator": 0, "denominator": "MILLION"},
                "runtime_key": "overspill.%s.%s" % (m["namespace"], m["name"]),
            }},
            "route": {"cluster": base + "remote", "host_rewrite_literal": "%s:%d" % (r["address"], r["port"]),
                      "timeout": "300s", "retry_policy": RETRY},
            "request_headers_to_add": [
                {"header": {"key": h["name"], "value": h["value"]},
                 "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for h in r["headers"]
            ],
        })
    routes.append({"name": "local", "match": {"prefix": "/"},
                   "route": {"cluster": base + "local", "timeout": "300s", "retry_policy": RETRY}})
    return {"name": "%s/%s" % (m["namespace"], m["name"]), "domains": m["domains"], "routes": routes}


def call(instances, **kwargs):
    vhosts = [_vhost(m) for m in instances]
    vhosts.append({"name": "unknown-host", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "no model serves this Host\\n"}}}]})
    return [{"name": "overspill_routes", "virtual_hosts": vhosts}]
""",
    "runtime": """
def call(instances, **kwargs):
    layer = {}
    for m in instances:
        outage = m["remote"] and not any(e["ready"] for e in m["endpoints"])
        layer["overspill.%s.%s" % (m["namespace"], m["name"])] = 100 if outage else 0
    return [{"name": "LAYER", "layer": layer}]
""".replace("LAYER", LAYER),
}


def rest_source(cluster: str, refresh: float) -> dict[str, Any]:
    return {
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": "REST",
            "transport_api_version": "V3",
            "cluster_names": [cluster],
            "refresh_delay": f"{refresh:g}s",
            # The default 1 s is shorter than a render of 10,000 models.
            "request_timeout": "60s",
        },
    }


class SovereignModels(ModelSet):
    """The models as sovereign's file source reads them: one JSON list of instances."""

    def _instance(self, m: ModelFile) -> dict[str, Any]:
        return {
            "name": m.name,
            "namespace": m.namespace,
            "domains": list(service_domains(m.name, m.namespace, SERVICE_PORT)),
            "endpoints": [{"address": "127.0.0.1", "port": m.local_port, "ready": m.ready}],
            "remote": None
            if m.remote_port is None
            else {
                "address": "127.0.0.1",
                "port": m.remote_port,
                "headers": [{"name": "x-offloaded-by", "value": "overspill"}],
            },
        }

    @property
    def path(self) -> Path:
        return self.root / "instances.json"

    def _dump(self) -> float:
        return write_atomic(self.path, json.dumps([self._instance(m) for m in self.models]))

    def _write_all(self) -> None:
        self._dump()

    def rewrite(self, m: ModelFile) -> float:
        return self._dump()

    def _write_new(self, m: ModelFile) -> float:
        self.models.append(m)
        return self._dump()


class SovereignProcess(ManagedProcess):
    """`sovereign` with our config; ready when a CDS request (as Envoy sends it) returns every cluster."""

    name = "sovereign"
    stop_timeout = 5.0
    spawned_at = 0.0
    ready_at = 0.0

    def __init__(self, script: Path, config: Path, expected_clusters: int, cfg: argparse.Namespace) -> None:
        super().__init__(cfg.logs)
        self.script = script
        self.config = config
        self.expected = expected_clusters
        self.port = free_port()
        self.workers = cfg.sovereign_workers
        self.refresh = max(1, round(cfg.sovereign_refresh))
        self.startup_timeout = cfg.start_timeout
        self._pids: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self, workdir: Path) -> list[str]:
        return [str(self.script)]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env |= {
            "SOVEREIGN_CONFIG": f"file://{self.config}",
            "SOVEREIGN_HOST": "127.0.0.1",
            "SOVEREIGN_PORT": str(self.port),
            "SOVEREIGN_SOURCES_REFRESH_RATE": str(self.refresh),
            "SOVEREIGN_ENABLE_ACCESS_LOGS": "False",
            "PYTHONUNBUFFERED": "1",
        }
        if self.workers:
            env["SOVEREIGN_WORKERS"] = str(self.workers)
        return env

    async def _spawn(self, argv: list[str]) -> None:
        self.spawned_at = time.monotonic()
        await super()._spawn(argv)

    async def discover(self, xds_type: str, names: list[str] | None = None) -> list[dict[str, Any]]:
        body = {
            "node": {"id": "bench-probe", "cluster": "bench", "build_version": ENVOY_BUILD},
            "version_info": "",
            "resource_names": names or [],
        }
        async with self.session.post(
            f"{self.url}/v3/discovery:{xds_type}", json=body, timeout=aiohttp.ClientTimeout(total=120)
        ) as resp:
            text = await resp.text()
            self._last_probe = f"POST discovery:{xds_type} -> {resp.status} {text[:120]!r}"
            if resp.status != 200:
                return []
            return json.loads(text).get("resources", [])

    async def _ready(self) -> bool:
        if len(await self.discover("clusters")) >= self.expected:
            self.ready_at = time.monotonic()
            return True
        return False

    def pids(self) -> list[int]:
        if self.pid is None or self.proc is None or self.proc.returncode is not None:
            return []
        self._pids = tree_pids(self.pid)
        return self._pids

    async def close(self) -> None:
        """Stopped with SIGKILL, master and workers: gunicorn's SIGTERM and SIGINT wait for the
        workers, and a measurement has nothing to lose."""
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await super().close()


class SovereignRig:
    """sovereign and one Envoy polling it over REST (CDS, LDS, RDS, RTDS)."""

    system = "sovereign"

    def __init__(self, cfg: argparse.Namespace, protocol: str, model_set: ModelSet, workdir: Path) -> None:
        self.cfg = cfg
        self.protocol = protocol
        self.models = model_set
        self.workdir = workdir
        self.listener_port = free_port()
        self.proc: SovereignProcess | None = None
        self.detail: dict[str, Any] = {}

    @staticmethod
    def model_set(root: Path, workload: Workload, backends: Backends) -> ModelSet:
        return SovereignModels(root, workload, backends)

    @staticmethod
    def variant(workload: Workload) -> str:
        return "instances.json" if workload.remotes else "instances.json,no-remotes"

    def _config(self) -> Path:
        refresh = self.cfg.sovereign_refresh
        source = rest_source("xds_cluster", refresh)  # the routes' source, as Envoy's bootstrap names it
        specs = []
        for xds_type, code in TEMPLATES.items():
            path = self.workdir / f"template_{xds_type}.py"
            code = code.replace("LISTENER_PORT", str(self.listener_port))
            code = code.replace("CONFIG_SOURCE", repr(source))
            path.write_text(code)
            specs.append(
                {"type": xds_type, "spec": {"protocol": "python", "serialization": "raw", "path": str(path)}}
            )
        config = {
            "templates": {"default": specs},
            "sources": [
                {
                    "type": "file",
                    "scope": "default",
                    "config": {
                        "spec": {"protocol": "file", "serialization": "json", "path": str(self.models.path)}
                    },  # type: ignore[attr-defined]
                }
            ],
            "matching": {"enabled": False},
            "source_config": {"refresh_rate": max(1, round(refresh))},
        }
        path = self.workdir / "sovereign.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    async def start(self, stack: AsyncExitStack) -> float:
        script = ensure_sovereign(self.cfg.sovereign_venv, lambda _: None)
        proc = SovereignProcess(script, self._config(), self.models.workload.clusters, self.cfg)
        self.proc = await stack.enter_async_context(proc)
        start_s = proc.ready_at - proc.spawned_at
        self.detail = {"cpu_s": cpu_seconds(proc.pids()), "processes": len(proc.pids())}
        return start_s

    def xds_port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    def bootstrap(self, admin_port: int) -> Path:
        assert self.proc is not None
        source = rest_source("xds_cluster", self.cfg.sovereign_refresh)
        doc = {
            "node": {"id": "bench-rest", "cluster": "bench"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "dynamic_resources": {"cds_config": source, "lds_config": source},
            "layered_runtime": {
                "layers": [
                    {"name": LAYER, "rtds_layer": {"name": LAYER, "rtds_config": source}},
                    {"name": "admin", "admin_layer": {}},
                ]
            },
            "static_resources": {
                "clusters": [
                    {
                        "name": "xds_cluster",
                        "type": "STATIC",
                        "connect_timeout": "1s",
                        "load_assignment": {
                            "cluster_name": "xds_cluster",
                            "endpoints": [
                                {
                                    "lb_endpoints": [
                                        {
                                            "endpoint": {
                                                "address": {
                                                    "socket_address": {
                                                        "address": "127.0.0.1",
                                                        "port_value": self.proc.port,
                                                    }
                                                }
                                            }
                                        }
                                    ]
                                }
                            ],
                        },
                    }
                ]
            },
        }
        path = self.workdir / "bootstrap-rest.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def pids(self) -> list[int]:
        assert self.proc is not None
        return self.proc.pids()

    async def sent_bytes(self) -> float | None:
        return None  # sovereign does not count them

    def expected_clusters(self) -> int:
        return self.models.workload.clusters + 1  # and the static xds_cluster

    def runtime_keys(self, models: list[ModelFile]) -> list[str]:
        """Its template writes every model's share into the layer, 0 % too."""
        return [m.runtime_key for m in models]

    def quiet_after(self) -> float:
        return 0.0  # nothing of sovereign's is due later: it renders on each Envoy request

    async def after(self) -> dict[str, Any]:
        assert self.proc is not None
        lines = self.proc.log_text().splitlines()
        bad = [line for line in lines if "error" in line.lower() or "Traceback" in line]
        return {
            "processes": len(self.proc.pids()),
            "log_lines": len(lines),
            "log_errors": len(bad),
            "log_first_errors": bad[:3],
        }
