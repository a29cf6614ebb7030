"""The Load Reporting Service (LRS): Envoy's own load reports, summed per cluster over every Envoy.

Envoy opens `StreamLoadStats` on the xDS port (the bootstrap's `cluster_manager.load_stats_config`);
the server answers with the clusters it wants and the reporting interval, and Envoy then sends
every interval, per cluster, the requests in flight (a gauge) and those issued and failed since
its last report, with the ORCA named metrics backends returned (`lrs_report_endpoint_metrics`).

Each stream's latest report replaces its previous one in running sums per cluster, and is taken
out when the stream ends, so a read is one lookup and a report costs only the clusters it names.
Reports are read by hand (`wire.fields_of`): a thousand Envoys send one every second.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from api.crd import MAX_REMOTES
from api.desired import CLUSTER_PREFIX, SIDES
from api.load import ClusterLoad
from xds import wire
from xds.fields import Fields, duration

log = logging.getLogger("overspill.xds")
SERVICE = "envoy.service.load_stats.v3.LoadReportingService"
METHOD = "StreamLoadStats"
ORCA_NAMED = "named_metrics."  # how Envoy names an ORCA named metric in a load report


@dataclass
class Reporter:
    """One Envoy's load report stream: who it is, the load its latest report holds per cluster,
    and the clusters it was last asked to report."""

    sid: int
    peer: str
    node_id: str = ""
    reports: int = 0
    latest: dict[str, ClusterLoad] = field(default_factory=dict)
    sent: bytes | None = None  # the LoadStatsResponse it has
    wake: asyncio.Event = field(default_factory=asyncio.Event)


_RESPONSE = Fields("envoy.service.load_stats.v3.LoadStatsResponse")


class LoadReports:
    """The LRS server and the per-cluster sums over every connected Envoy's latest report.

    Envoys are asked for the clusters of the models that read `envoy:` metrics (`ask`), not for
    all: Envoy reports every cluster it is asked for every interval, busy or not, and ten thousand
    models are twenty thousand clusters in each report of each Envoy.
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.reporters: dict[int, Reporter] = {}
        self._sums: dict[str, ClusterLoad] = {}
        self._contributors: dict[str, int] = {}  # streams whose latest report names the cluster
        self._ids = itertools.count(1)
        self.asked: frozenset[str] = frozenset()
        self._response = self._build(self.asked)

    def _build(self, clusters: frozenset[str]) -> bytes:
        interval = duration(datetime.timedelta(seconds=self.interval))
        return b"".join(_RESPONSE.clusters(c) for c in sorted(clusters)) + _RESPONSE.load_reporting_interval(
            interval
        )

    def ask(self, clusters: frozenset[str]) -> None:
        """Have every Envoy report these clusters from now on (a response to each stream, once)."""
        if clusters == self.asked:
            return
        self.asked = clusters
        self._response = self._build(clusters)
        for reporter in self.reporters.values():
            reporter.wake.set()

    def handler(self) -> grpc.GenericRpcHandler:
        async def handle(requests: AsyncIterator[bytes], context) -> None:
            await self.serve(requests, context.write, context.peer())

        # No (de)serializers: requests are read by hand, responses encoded once per cluster set.
        return grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(handle)}
        )

    def load(self, cluster: str) -> ClusterLoad | None:
        """The cluster's load summed over the Envoys whose latest report names it."""
        return self._sums.get(cluster)

    def clusters(self) -> dict[str, ClusterLoad]:
        return self._sums

    def reporting(self) -> int:
        """How many Envoys have a load report stream open."""
        return len(self.reporters)

    async def serve(
        self, requests: AsyncIterator[bytes], send: Callable[[bytes], Awaitable[None]], peer: str = ""
    ) -> None:
        reporter = Reporter(next(self._ids), peer)
        self.reporters[reporter.sid] = reporter
        reader = asyncio.create_task(self._read(reporter, requests))
        reader.add_done_callback(lambda _: reporter.wake.set())
        try:
            while True:
                await reporter.wake.wait()
                reporter.wake.clear()
                if reader.done():
                    reader.result()  # a read error ends the stream with it
                    return
                # Envoy speaks first; each response starts a new reporting period at that Envoy.
                if reporter.reports and reporter.sent is not self._response:
                    reporter.sent = self._response
                    await send(reporter.sent)
        finally:
            reader.cancel()
            self._replace(reporter, {})
            del self.reporters[reporter.sid]
            log.info("event=load_reports_closed node=%s peer=%s", reporter.node_id or "-", peer)

    async def _read(self, reporter: Reporter, requests: AsyncIterator[bytes]) -> None:
        async for data in requests:
            node_id, loads = read_report(data, self.interval)
            del data  # not kept while the next one is awaited: a thousand Envoys' reports are 1 GiB
            if node_id and not reporter.node_id:
                reporter.node_id = node_id
                log.info("event=load_reports_opened node=%s peer=%s", node_id, reporter.peer)
            if not reporter.reports:
                reporter.wake.set()
            reporter.reports += 1
            self._replace(reporter, loads)

    def _replace(self, reporter: Reporter, loads: dict[str, ClusterLoad]) -> None:
        """Swap a stream's contribution for its new report. A side still busy keeps the ORCA values
        of its last report that had them: they come only with requests that finished."""
        for name, old in reporter.latest.items():
            new = loads.get(name)
            if new is not None and (new.in_flight or new.rate):
                for metric, value in old.orca.items():
                    new.orca.setdefault(metric, value)
            self._sums[name].add(old, -1)
            left = self._contributors[name] - 1
            if left:
                self._contributors[name] = left
            else:  # nobody reports it now: dropped whole, so no float residue lingers
                del self._contributors[name], self._sums[name]
        for name, new in loads.items():
            self._sums.setdefault(name, ClusterLoad()).add(new)
            self._contributors[name] = self._contributors.get(name, 0) + 1
        reporter.latest = loads


# Envoy reports every asked cluster every interval, busy or not, its fields in number order: an
# idle one is its name, dropped count and interval, and adds nothing. A busy one's name is followed
# by locality stats (field 2), so `/local` + that tag finds them with a C search, and the idle ones
# (most of 20,000 in a report at 10,000 models) cost no Python at all. Only model clusters are
# asked for (`api.desired.cluster_name`: a prefix, and no '/' in Kubernetes names).
# With several remotes, each remote's cluster (`api.desired.remote_member_name`) too.
_BUSY_TAILS = tuple(f"/{side}".encode() + b"\x12" for side in SIDES) + tuple(
    f"/remote/{i}".encode() + b"\x12" for i in range(MAX_REMOTES)
)
_PREFIX = CLUSTER_PREFIX.encode()


def read_report(data: bytes, default_interval: float) -> tuple[str, dict[str, ClusterLoad]]:
    """`LoadStatsRequest{node=1, cluster_stats=2}`: the node's id (first message only) and the load
    per cluster with traffic, its counts over the report's own interval turned into rates."""
    node_id, start = "", 0
    if data[:1] == b"\x0a":  # the node, in the first message only
        _, node, start = wire.field_at(data, 0)
        node_id = dict(wire.fields_of(node)).get(1, b"").decode()  # type: ignore[arg-type, union-attr]
    loads = {}
    for tail in _BUSY_TAILS:
        at = data.find(tail, start)
        while at >= 0:
            entry = _entry_around(data, start, at + len(tail) - 1)
            if entry is not None:
                name, load = _cluster_stats(entry, default_interval)
                loads[name] = load
            at = data.find(tail, at + len(tail))
    return node_id, loads


def _entry_around(data: bytes, start: int, name_end: int) -> bytes | None:
    """The `ClusterStats` whose name ends at `name_end`: `0x12 <size> 0x0a <length> overspill/...`,
    read backwards from the name; None where the bytes are not that (a look-alike inside another field)."""
    name_at = data.rfind(_PREFIX, start, name_end)
    length, tag_at = _varint_before(data, start, name_at)
    if length != name_end - name_at or tag_at <= start or data[tag_at - 1] != 0x0A:
        return None
    size, size_at = _varint_before(data, start, tag_at - 1)
    if size_at <= start or data[size_at - 1] != 0x12:
        return None
    return data[tag_at - 1 : tag_at - 1 + size]


def _varint_before(data: bytes, start: int, end: int) -> tuple[int, int]:
    """The varint that ends just before `end`, read backwards (its last byte alone has the high bit
    clear), and where it starts; (-1, end) when there is none."""
    if end <= start or data[end - 1] >= 0x80:
        return -1, end
    first = end - 1
    while first > start and data[first - 1] >= 0x80 and end - first < 10:
        first -= 1
    return wire.read_varint(data, first)[0], first


def _cluster_stats(data: bytes, default_interval: float) -> tuple[str, ClusterLoad]:
    """`ClusterStats{cluster_name=1, upstream_locality_stats=2, load_report_interval=4}`."""
    name, interval = "", 0.0
    in_flight = issued = errors = succeeded = 0
    orca: dict[str, tuple[float, int]] = {}
    for number, value in wire.fields_of(data):
        if number == 1:
            name = value.decode()  # type: ignore[union-attr]
        elif number == 4:
            parts = dict(wire.fields_of(value))  # type: ignore[arg-type]
            interval = parts.get(1, 0) + parts.get(2, 0) / 1e9  # type: ignore[operator]
        elif number == 2:
            # UpstreamLocalityStats{successful=2, in_progress=3, error=4, load_metric_stats=5, issued=8}
            for n, v in wire.fields_of(value):  # type: ignore[arg-type]
                if n == 2:
                    succeeded += v  # type: ignore[operator]
                elif n == 3:
                    in_flight += v  # type: ignore[operator]
                elif n == 4:
                    errors += v  # type: ignore[operator]
                elif n == 8:
                    issued += v  # type: ignore[operator]
                elif n == 5:
                    metric, total, count = _metric_stats(v)  # type: ignore[arg-type]
                    was_total, was_count = orca.get(metric, (0.0, 0))
                    orca[metric] = (was_total + total, was_count + count)
    seconds = interval if interval > 0 else default_interval
    return name, ClusterLoad(
        in_flight, issued / seconds, errors / seconds, (succeeded + errors) / seconds, orca
    )


def _metric_stats(data: bytes) -> tuple[str, float, int]:
    """`EndpointLoadMetricStats{metric_name=1, num_requests_finished_with_metric=2,
    total_metric_value=3}`, the name without Envoy's `named_metrics.` prefix."""
    name, count, total = "", 0, 0.0
    for number, value in wire.fields_of(data):
        if number == 1:
            name = value.decode()  # type: ignore[union-attr]
        elif number == 2:
            count = value  # type: ignore[assignment]
        elif number == 3:
            total = struct.unpack("<d", value)[0]  # type: ignore[arg-type]
    return name.removeprefix(ORCA_NAMED), total, count
