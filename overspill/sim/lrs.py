"""A simulated Envoy load reporter on the LRS wire (tests, and the benchmark's thousand Envoys).

Like Envoy it opens `StreamLoadStats`, names its node in the first request, and once answered
reports every interval each cluster it was asked for: a name and the measured interval for an idle
cluster, and a locality's counts for a busy one. The load to report comes from `load`, which
returns per cluster name a `Load`; clusters it does not name are reported idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterStats,
    EndpointLoadMetricStats,
    UpstreamLocalityStats,
)
from envoy_data_plane.envoy.service.load_stats.v3 import LoadStatsRequest, LoadStatsResponse

from overspill.sim.envoy import CHANNEL_OPTIONS

METHOD = "/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats"
SEND_ALL = "envoy.lrs.supports_send_all_clusters"


@dataclass(frozen=True)
class Load:
    """What one Envoy saw of one cluster over an interval (counts) and now (in flight)."""

    in_flight: int = 0
    issued: int = 0
    succeeded: int = 0
    errors: int = 0
    orca: dict[str, float] = field(default_factory=dict)  # named metric -> value every request returned

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.issued or self.succeeded or self.errors)


def report(node_id: str | None, loads: dict[str, Load], asked: list[str], interval: float) -> bytes:
    """A `LoadStatsRequest` as Envoy writes it: every asked cluster, localities only where busy.
    A request is its node and its `cluster_stats` entries one after another, so entries are
    encoded on their own and joined; an idle one is the same every time (cached)."""
    head = bytes(LoadStatsRequest(node=Node(id=node_id, client_features=[SEND_ALL]))) if node_id else b""
    return head + b"".join(
        _busy(name, load, interval)
        if (load := loads.get(name)) is not None and load.busy
        else _idle(name, interval)
        for name in asked
    )


@functools.lru_cache(maxsize=1 << 16)
def _idle(name: str, interval: float) -> bytes:
    return _entry(ClusterStats(cluster_name=name, load_report_interval=datetime.timedelta(seconds=interval)))


def _busy(name: str, load: Load, interval: float) -> bytes:
    finished = load.succeeded + load.errors
    locality = UpstreamLocalityStats(
        total_successful_requests=load.succeeded,
        total_requests_in_progress=load.in_flight,
        total_error_requests=load.errors,
        total_issued_requests=load.issued,
        load_metric_stats=[
            EndpointLoadMetricStats(
                metric_name=f"named_metrics.{k}",
                num_requests_finished_with_metric=finished,
                total_metric_value=v * finished,
            )
            for k, v in sorted(load.orca.items())
        ],
    )
    return _entry(
        ClusterStats(
            cluster_name=name,
            upstream_locality_stats=[locality],
            load_report_interval=datetime.timedelta(seconds=interval),
        )
    )


def _entry(stats: ClusterStats) -> bytes:
    return bytes(LoadStatsRequest(cluster_stats=[stats]))


class SimReporter:
    """One simulated Envoy's load report stream; `close()` ends it as an Envoy going away would."""

    def __init__(
        self,
        target: str,
        node_id: str,
        load: Callable[[], dict[str, Load]] | None = None,
        static: bool = False,
    ):
        self.target = target
        self.node_id = node_id
        self.load = load or dict
        self.static = static  # the same load every interval: a report is built once per set asked
        self._built: tuple[list[str], bytes] | None = None
        self.asked: list[str] = []
        self.send_all = False
        self.interval = 0.0
        self.reports = 0
        self.answered = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        call = self._channel.stream_stream(METHOD)(self._requests())
        self._task = asyncio.create_task(self._run(call))
        await self._outbox.put(report(self.node_id, {}, [], 0.0))

    async def _requests(self) -> AsyncIterator[bytes]:
        while (data := await self._outbox.get()) is not None:
            yield data

    async def _run(self, call) -> None:
        ticker = None
        try:
            async for raw in call:
                answer = LoadStatsResponse.FromString(raw)
                self.asked, self.send_all = list(answer.clusters), answer.send_all_clusters
                self.interval = answer.load_reporting_interval.total_seconds()
                self.answered.set()
                if ticker is None:
                    ticker = asyncio.create_task(self._tick())
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.send_now()

    def send_now(self) -> None:
        """Report now (tests also report between ticks)."""
        if self.static and self._built is not None and self._built[0] is self.asked:
            data = self._built[1]
        else:
            loads = self.load()
            data = report(None, loads, sorted(loads) if self.send_all else self.asked, self.interval)
            self._built = (self.asked, data)
        self._outbox.put_nowait(data)
        self.reports += 1

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task
        if self._channel is not None:
            await self._channel.close()
