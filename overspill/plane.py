"""Process wiring: one store, one cache, the sources, the controller and the servers, as tasks.

Data flows one way: source → store → controller (decisions) → translator (resources) →
xDS streams. The server's events come back through `events.XdsEvents`.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from metrics.instruments import Instruments
from metrics.prometheus import PrometheusInformer
from overspill.admin import make_app
from overspill.events import XdsEvents
from overspill.settings import Settings
from reconciler.controller import Controller
from reconciler.directory import DirectorySource
from reconciler.store import ObjectStore
from xds.server import XdsServer, start_server
from xds.snapshot import Translator

log = logging.getLogger("overspill")


class ControlPlane:
    def __init__(self, settings: Settings):
        if settings.manifests is None:
            raise ValueError("settings.manifests: a manifests directory is required")
        self.settings = settings
        self.store = ObjectStore()
        self.translator = Translator(settings.listener_address, settings.listener_port)
        self.source = DirectorySource(settings.manifests, self.store)
        self.controller = Controller(
            self.store,
            self.translator.publish,
            evaluation_interval=settings.evaluation_interval,
            default_remote=settings.default_remote,
            cluster_domain=settings.cluster_domain,
        )
        self.instruments = Instruments()
        self.instruments.watch_controller(
            lambda: self.controller.status.values(), lambda: self.controller.evaluations
        )
        self.instruments.watch_origins(self.store.rejected_by_origin)
        self.xds = XdsServer(self.translator.cache, XdsEvents(self.instruments, self.controller))

    def load_once(self) -> None:
        """Read the manifests and decide once, without live metrics (for `render`)."""
        self.source.sync()
        self.controller.reconcile()

    def status_document(self) -> dict:
        """Per model: state, remote %, metrics, errors (Envoy NACKs too); per node: versions and NACKs."""
        return {
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
        }

    async def run(self) -> None:
        s = self.settings
        if not s.manifests.is_dir():
            raise SystemExit(f"--manifests {s.manifests}: not a directory")
        async with aiohttp.ClientSession() as session:
            if s.prometheus_url:
                self.controller.informer = PrometheusInformer(s.prometheus_url, session)
            self.load_once()  # the first state is complete before any stream is answered
            grpc_server, xds_port = await start_server(self.xds, s.xds_address, s.xds_port)
            runner = web.AppRunner(make_app(self.status_document, self.instruments.registry), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, s.metrics_address, s.metrics_port).start()
            log.info(
                "event=started xds=%s:%d listener=%s:%d metrics=%s:%d manifests=%s prometheus=%s",
                s.xds_address,
                xds_port,
                s.listener_address,
                s.listener_port,
                s.metrics_address,
                s.metrics_port,
                s.manifests,
                s.prometheus_url or "-",
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self.source.run())
                    tg.create_task(self.controller.run())
            finally:
                await grpc_server.stop(grace=1)
                await runner.cleanup()
