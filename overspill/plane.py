"""Process wiring: one store, one cache, the sources, the controller and the servers, as tasks."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from metrics.instruments import Instruments
from metrics.prometheus import PrometheusInformer
from reconciler.controller import Controller
from reconciler.crd import RemoteBackend
from reconciler.directory import DirectorySource
from reconciler.store import ObjectStore
from xds.server import XdsServer, start_server
from xds.snapshot import Translator

log = logging.getLogger("overspill")


@dataclass
class Settings:
    """`overspill serve` flags."""

    manifests: Path
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


class ControlPlane:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.instruments = Instruments()
        self.store = ObjectStore()
        self.translator = Translator(settings.listener_address, settings.listener_port)
        self.xds = XdsServer(self.translator.cache, self.instruments)
        self.source = DirectorySource(settings.manifests, self.store, self.instruments)
        self.controller = Controller(
            self.store,
            self.translator,
            self.instruments,
            evaluation_interval=settings.evaluation_interval,
            default_remote=settings.default_remote,
            cluster_domain=settings.cluster_domain,
        )

    def load_once(self) -> None:
        """Read the manifests and decide once, without live metrics (for `render`)."""
        self.source.sync()
        self.controller.reconcile()

    async def run(self) -> None:
        from aiohttp import web

        from overspill.admin import make_app

        s = self.settings
        if not s.manifests.is_dir():
            raise SystemExit(f"--manifests {s.manifests}: not a directory")
        async with aiohttp.ClientSession() as session:
            if s.prometheus_url:
                self.controller.informer = PrometheusInformer(s.prometheus_url, session)
            self.load_once()  # the first state is complete before any stream is answered
            grpc_server, xds_port = await start_server(self.xds, s.xds_address, s.xds_port)
            runner = web.AppRunner(make_app(self), access_log=None)
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
