"""Process wiring: one store, one cache, a source, the controller and the servers, as tasks.

Data flows one way: source → store → controller (decisions) → translator (resources) →
xDS streams. The server's events come back through `events.XdsEvents`. In Kubernetes
mode the source is the API server, metrics come from its metrics APIs, the leader writes
each model's status, and followers serve the decisions it wrote.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp import web

from api.crd import ModelDeployment, ObjectKey
from api.desired import loads_by_side
from api.status import ModelStatus
from metrics.envoy import EnvoyLoadMetrics
from metrics.instruments import Instruments
from metrics.kubernetes import KubernetesMetrics, timed
from metrics.prometheus import PrometheusInformer
from metrics.source import MetricSource
from overspill.admin import make_app
from overspill.events import XdsEvents
from overspill.settings import Settings
from reconciler.controller import Controller
from reconciler.directory import DirectorySource
from reconciler.kubeapi import KubeApi, load_client
from reconciler.kubernetes import KubernetesSource
from reconciler.leader import LeaderElector
from reconciler.offload import OffloadMachine
from reconciler.saved import StateFile, saved_fields, worth_saving
from reconciler.status_writer import StatusWriter, desired_status
from reconciler.store import ObjectStore
from xds.identity import IdentityRules
from xds.lrs import LoadReports
from xds.scope import Scope
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.tls import ServerTls, TlsFileError

log = logging.getLogger("overspill")
STATE_DIR_KUBERNETES = "--state-dir is for --manifests: in Kubernetes mode the state is on each CR's status"


class ControlPlane:
    def __init__(self, settings: Settings, kube: KubeApi | None = None):
        if settings.kubernetes == (settings.manifests is not None):
            raise ValueError("give either a manifests directory or Kubernetes mode, not both or neither")
        if settings.kubernetes and settings.state_dir is not None:
            raise ValueError(STATE_DIR_KUBERNETES)
        self.settings = settings
        self.store = ObjectStore()
        self.translator = Translator(settings.listener_address, settings.listener_port)
        self.controller = Controller(
            self.store,
            self.translator.apply,
            evaluation_interval=settings.evaluation_interval,
            default_remote=settings.default_remote,
            cluster_domain=settings.cluster_domain,
        )
        self.kube: KubeApi | None = None
        self.source: DirectorySource | KubernetesSource
        self.status_writer: StatusWriter | None = None
        self.elector: LeaderElector | None = None
        if settings.kubernetes:
            self.kube = kube or KubeApi(load_client(settings.kubeconfig, settings.context))
            self.source = KubernetesSource(self.store, self.kube, settings.namespaces or None)
            self.status_writer = StatusWriter(self.kube)
            self.controller.on_reconciled = self._write_status
            self.source.status_changes_wake = False  # a lone replica leads: its own writes need no action
            if settings.leader_elect:
                self.controller.follow()  # until the lease says otherwise
                self.source.status_changes_wake = True
                self.elector = LeaderElector(
                    self.kube,
                    settings.lease_namespace or os.environ.get("POD_NAMESPACE") or "overspill-system",
                    settings.lease_name,
                    settings.identity or os.environ.get("POD_NAME") or socket.gethostname(),
                    lease_seconds=settings.lease_seconds,
                    renew_every=max(0.5, settings.lease_seconds / 5),
                    on_lead=self._lead,
                    on_follow=self._follow,
                )
        else:
            assert settings.manifests is not None
            self.source = DirectorySource(settings.manifests, self.store, limits=settings.manifest_limits)
        self.state: StateFile | None = None
        if settings.state_dir is not None:
            self.state = StateFile(settings.state_dir)
            self.controller.on_reconciled = self._save_state
        self.instruments = Instruments()
        self.instruments.watch_controller(
            lambda: self.controller.status.values(), lambda: self.controller.evaluations
        )
        self.instruments.watch_origins(self.store.rejected_by_origin)
        self.controller.on_evaluated = self._evaluated
        if self.state is not None:
            state = self.state
            self.instruments.watch_state_file(lambda: state.writes, lambda: state.errors)
        self.xds_tls = _server_tls(settings)
        self.xds = XdsServer(
            self.translator.cache,
            XdsEvents(self.instruments, self.controller),
            identities=IdentityRules(tuple(settings.xds_gateway_identities), settings.cluster_domain),
        )
        self.load_reports = LoadReports(settings.load_report_interval)
        self.xds.services.append(self.load_reports.handler())
        self.instruments.watch_load(self.load_reports.clusters, self.load_reports.reporting)
        self.ready = False
        self._tasks: set[asyncio.Task] = set()

    def load_once(self) -> None:
        """Read the manifests and decide once, without live metrics (for `render`), from the saved
        state when there is one: what Envoy is first sent is what it had before a restart."""
        assert isinstance(self.source, DirectorySource)
        with bulk_load():
            self.source.sync()
            if self.state is not None:
                self.controller.restored = self.state.load(m.key for m in self.store.models())
            self.controller.reconcile()
        self.controller.restored.clear()  # models not decided by now start afresh

    def _evaluated(self, seconds: float) -> None:
        self.instruments.evaluation_duration.observe(seconds)
        if self.controller.evaluations == 1:
            # What the first round made to last (each model's status and readings, the xDS views
            # built meanwhile) joins the first load's objects out of the collector's way (see
            # `bulk_load`): after a freeze the collector runs a full collection whenever the
            # objects made since grow by a quarter, so they had better be few.
            gc.freeze()

    def _save_state(
        self,
        items: Iterable[tuple[ModelDeployment, ModelStatus, OffloadMachine | None]],
        removed: Iterable[ObjectKey],
    ) -> None:
        assert self.state is not None
        to_wall = self.controller.to_wall
        self.state.update(
            (
                (m.key, saved_fields(status, machine, to_wall) if worth_saving(status, machine) else None)
                for m, status, machine in items
            ),
            removed,
        )

    def _lead(self) -> None:
        """Take over: resume every state machine from status, and decide once the metrics are read
        (a reconcile without readings would first write a status that shows none)."""
        self.controller.lead()
        if isinstance(self.source, KubernetesSource):
            self.source.status_changes_wake = False
        task = asyncio.get_running_loop().create_task(self.controller.evaluate())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _follow(self) -> None:
        self.controller.follow()
        if isinstance(self.source, KubernetesSource):
            self.source.status_changes_wake = True

    def _write_status(
        self,
        items: Iterable[tuple[ModelDeployment, ModelStatus, OffloadMachine | None]],
        removed: Iterable[ObjectKey],
    ) -> None:
        if self.status_writer is None or not self.controller.leading:
            return
        self.status_writer.sync(
            (
                (model, desired_status(model, status, machine, self.controller.to_wall))
                for model, status, machine in items
                # Before its first readings (just started) a model's status would show none: the
                # first evaluation decides it again and writes it then.
                if status.metrics or not (model.offloading and model.offloading.metrics)
            ),
            removed,
        )
        self.status_writer.sync_rejected(
            (r.key, r.errors)
            for r in self.store.rejected()
            if r.key is not None and r.key.kind == "ModelDeployment" and self.store.get(r.key) is None
        )

    def status_document(self) -> dict:
        """Per model: state, remote %, metrics, errors (Envoy NACKs too); per node: versions and NACKs."""
        doc = {
            "models": {str(k): s.to_dict() for k, s in sorted(self.controller.status.items())},
            "rejected": [
                {
                    "origin": r.origin,
                    "object": str(r.key) if r.key else None,
                    "kind": r.key.kind if r.key else None,
                    "errors": list(r.errors),
                }
                for r in self.store.rejected()
            ],
            "nodes": [stream.describe() for stream in self.xds.streams.values()],
            "load": load_document(self.load_reports),
        }
        if self.elector is not None:
            doc["leader"] = {"leading": self.elector.leading, "holder": self.elector.holder}
        if self.state is not None:
            state = self.state
            doc["state"] = {"file": str(state.path), "writes": state.writes, "error": state.error}
        return doc

    async def run(self) -> None:
        s = self.settings
        if s.manifests is not None and not s.manifests.is_dir():
            raise SystemExit(f"--manifests {s.manifests}: not a directory")
        if s.state_dir is not None:
            try:
                s.state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SystemExit(f"--state-dir {s.state_dir}: cannot be created: {exc}") from exc
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            reads = self.instruments.metric_read_duration
            prometheus = (
                PrometheusInformer(s.prometheus_url, session, observe=reads.labels("prometheus").observe)
                if s.prometheus_url
                else None
            )
            informer: MetricSource | None = prometheus
            if self.kube is not None:
                informer = KubernetesMetrics(
                    timed(self.kube.get, reads.labels("kubernetes").observe),
                    fallback=prometheus,
                    max_age=s.evaluation_interval / 2,
                )
            # `envoy:` metrics from the load reports first; any other name goes on down the chain.
            self.controller.informer = EnvoyLoadMetrics(
                self.load_reports.load, self.load_reports.reporting, self.load_reports.ask, informer
            )
            runner = web.AppRunner(
                make_app(self.status_document, self.instruments.registry, lambda: self.ready), access_log=None
            )
            await runner.setup()
            await web.TCPSite(runner, s.metrics_address, s.metrics_port).start()
            grpc_server = None
            try:
                # The first state is complete before any stream is answered.
                if isinstance(self.source, KubernetesSource):
                    tg.create_task(self.source.run())
                    await self.source.synced.wait()
                    if self.elector is not None:
                        await self.elector.try_once()
                        tg.create_task(self.elector.run())
                    with bulk_load():
                        self.controller.reconcile()
                else:
                    self.load_once()
                    tg.create_task(self.source.run())
                # No model at all is a complete state too. Without this an Envoy got no answer
                # until the first model came, and waited out its 15 s initial fetch timeout.
                self.translator.cache.flush()
                self.translator.cache.keep(Scope())  # the edge gateways', ready before they connect
                try:
                    grpc_server, xds_port = await start_server(
                        self.xds, s.xds_address, s.xds_port, self.xds_tls
                    )
                except TlsFileError as exc:
                    raise SystemExit(f"--xds-tls-cert/--xds-tls-key/--xds-client-ca: {exc}") from None
                self.ready = True
                log.info(
                    "event=started xds=%s:%d xds_security=%s listener=%s:%d metrics=%s:%d source=%s "
                    "prometheus=%s",
                    s.xds_address,
                    xds_port,
                    "plaintext" if self.xds_tls is None else "mtls" if self.xds_tls.mutual else "tls",
                    s.listener_address,
                    s.listener_port,
                    s.metrics_address,
                    s.metrics_port,
                    "kubernetes" if s.kubernetes else s.manifests,
                    s.prometheus_url or "-",
                )
                await self.controller.run()
            finally:
                self.ready = False
                if grpc_server is not None:
                    await grpc_server.stop(grace=1)
                await runner.cleanup()


def _server_tls(s: Settings) -> ServerTls | None:
    """The xDS port's TLS files from the settings, or None for plaintext; a ValueError names the
    flags that do not go together."""
    if (s.xds_tls_cert is None) != (s.xds_tls_key is None):
        raise ValueError("--xds-tls-cert and --xds-tls-key go together")
    if s.xds_tls_cert is None or s.xds_tls_key is None:
        if s.xds_client_ca is not None:
            raise ValueError("--xds-client-ca needs --xds-tls-cert and --xds-tls-key")
        if s.xds_gateway_identities:
            raise ValueError("--xds-gateway-identity needs mTLS (--xds-client-ca)")
        return None
    if s.xds_gateway_identities and s.xds_client_ca is None:
        raise ValueError("--xds-gateway-identity needs mTLS (--xds-client-ca)")
    return ServerTls(s.xds_tls_cert, s.xds_tls_key, s.xds_client_ca)


@contextmanager
def bulk_load() -> Iterator[None]:
    """The cyclic garbage collector paused while a cold start builds millions of objects that
    all live on: it would walk the growing heap again and again (1.8 s of 5 at 10,000 models).
    Nothing is lost: reference counting still frees, and the collector resumes after.

    Then those objects are frozen (`gc.freeze`): left out of every later collection, which
    otherwise walked all of them in each full one (0.7 s at 10,000 models, every half minute
    or so of an idle control plane: 0.023 CPU-s/s). What they hold that later becomes a cycle
    of garbage is never freed, a bounded part of the first load."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def load_document(reports: LoadReports) -> dict:
    """Envoy's load reports as `/status` shows them: per model and side, summed over the Envoys."""
    models: dict[str, dict] = {}
    for ((namespace, name), side), load in loads_by_side(reports.clusters()).items():
        models.setdefault(f"{namespace}/{name}", {})[side] = {
            "requests_in_flight": load.in_flight,
            "request_rate": round(load.rate, 3),
            "errors": round(load.errors, 3),
            "orca": {name: total / count for name, (total, count) in sorted(load.orca.items())},
        }
    return {"reporting_envoys": reports.reporting(), "models": models}
