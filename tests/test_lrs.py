"""Envoy's load reports: the LRS server on the xDS port (real gRPC, simulated reporters) and the
`envoy:` offloading metrics read from its sums."""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest
from envoy_data_plane.envoy.service.load_stats.v3 import LoadStatsRequest, LoadStatsResponse

from api.desired import SIDES, cluster_name
from api.load import ClusterLoad
from api.metric_spec import MetricSpec, MetricTarget
from metrics.envoy import EnvoyLoadMetrics
from metrics.hpa import compare
from metrics.source import MetricScope, Reading
from overspill.sim.lrs import Load, SimReporter, report
from xds.lrs import LoadReports, read_report
from xds.server import XdsServer, start_server
from xds.snapshot import Translator

LOCAL, REMOTE = cluster_name("ns", "llm", "local"), cluster_name("ns", "llm", "remote")
SCOPE = MetricScope("ns", "app=llm", "llm")


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --- reading a report ---


def test_a_report_becomes_rates_per_second_over_its_own_interval_and_orca_means():
    data = report(
        "edge",
        {LOCAL: Load(in_flight=7, issued=40, succeeded=30, errors=6, orca={"num_requests_waiting": 2.5})},
        [LOCAL, REMOTE],
        interval=2.0,
    )
    node, loads = read_report(data, default_interval=1.0)
    assert node == "edge"
    local = loads[LOCAL]
    assert (local.in_flight, local.rate, local.errors, local.finished) == (7, 20.0, 3.0, 18.0)
    assert local.orca == {"num_requests_waiting": (2.5 * 36, 36)}  # Envoy's prefix dropped
    assert REMOTE not in loads  # asked for, idle: a name and an interval only, adding nothing


# --- the server ---


async def serve(interval: float = 0.2):
    reports = LoadReports(interval)
    xds = XdsServer(Translator("127.0.0.1", 10000).cache)
    xds.services.append(reports.handler())  # on the xDS port, beside ADS
    server, port = await start_server(xds, "127.0.0.1", 0)
    return reports, server, f"127.0.0.1:{port}"


async def test_envoys_are_asked_for_the_clusters_read_and_their_latest_reports_add_up():
    reports, server, target = await serve(interval=0.2)
    reports.ask(frozenset({LOCAL, REMOTE}))
    a = SimReporter(target, "a", lambda: {LOCAL: Load(in_flight=3, issued=4), REMOTE: Load(in_flight=1)})
    b = SimReporter(target, "b", lambda: {LOCAL: Load(in_flight=5, issued=2, errors=1)})
    try:
        for r in (a, b):
            await r.start()
            await asyncio.wait_for(r.answered.wait(), 5)
            assert r.asked == sorted([LOCAL, REMOTE]) and r.interval == pytest.approx(0.2)
        await until(lambda: a.reports >= 2 and b.reports >= 2, what="two reports each")
        await until(lambda: (reports.load(LOCAL) or ClusterLoad()).in_flight == 8, what="both Envoys summed")
        assert reports.reporting() == 2
        assert reports.load(REMOTE).in_flight == 1
        assert reports.load(LOCAL).rate == pytest.approx((4 + 2) / 0.2, rel=0.3)  # per the measured interval
        # A later report replaces the earlier one: nothing is counted twice.
        await asyncio.sleep(0.5)
        assert reports.load(LOCAL).in_flight == 8
        # The set read changes: every connected Envoy is told, and reports only those.
        reports.ask(frozenset({LOCAL}))
        await until(lambda: a.asked == [LOCAL] and b.asked == [LOCAL], what="the new set to reach both")
        await until(lambda: reports.load(REMOTE) is None, what="the remote cluster to drop out")
    finally:
        await a.close()
        await b.close()
        await server.stop(None)


async def test_a_stream_that_closes_takes_its_share_with_it():
    reports, server, target = await serve(interval=0.1)
    reports.ask(frozenset({LOCAL}))
    a = SimReporter(target, "a", lambda: {LOCAL: Load(in_flight=3, issued=1)})
    b = SimReporter(target, "b", lambda: {LOCAL: Load(in_flight=5, issued=1)})
    try:
        for r in (a, b):
            await r.start()
        await until(lambda: (reports.load(LOCAL) or ClusterLoad()).in_flight == 8, what="both summed")
        await a.close()
        await until(lambda: reports.reporting() == 1, what="the closed stream to go")
        assert reports.load(LOCAL).in_flight == 5  # only b's latest report is left
        await b.close()
        await until(lambda: reports.reporting() == 0, what="the last stream to go")
        assert reports.load(LOCAL) is None and reports.clusters() == {}
    finally:
        await a.close()
        await b.close()
        await server.stop(None)


def test_the_response_asks_for_the_clusters_with_the_configured_interval():
    reports = LoadReports(interval=1.5)
    reports.ask(frozenset({REMOTE, LOCAL}))
    answer = LoadStatsResponse.FromString(reports._response)
    assert answer.clusters == [LOCAL, REMOTE]
    assert answer.load_reporting_interval == datetime.timedelta(seconds=1.5)
    assert not answer.send_all_clusters


# --- the envoy: metrics ---


def external(name: str, target: str = "Value", **labels: str) -> MetricSpec:
    return MetricSpec("External", name, MetricTarget(target, 10), selector=labels)


def source(loads: dict[str, ClusterLoad], reporting: int = 1, fallback=None, asked=None) -> EnvoyLoadMetrics:
    return EnvoyLoadMetrics(
        loads.get, lambda: reporting, asked.append if asked is not None else None, fallback
    )


LOADS = {
    LOCAL: ClusterLoad(
        in_flight=6, rate=12.0, errors=1.0, finished=11.0, orca={"kv_cache_usage_perc": (1.8, 3)}
    ),
    REMOTE: ClusterLoad(in_flight=4, rate=8.0, errors=0.5, finished=8.0),
}


async def test_counts_are_measured_before_the_split_local_and_remote_summed():
    m = source(LOADS)
    assert (await m.read(external("envoy:requests_in_flight"), SCOPE)).total == 10
    assert (await m.read(external("envoy:request_rate"), SCOPE)).total == 20.0
    assert (await m.read(external("envoy:errors"), SCOPE)).total == 1.5
    # One side when asked for.
    assert (await m.read(external("envoy:requests_in_flight", side="local"), SCOPE)).total == 6
    assert (await m.read(external("envoy:request_rate", side="remote"), SCOPE)).total == 8.0


async def test_average_value_targets_and_pods_metrics_divide_by_the_ready_local_pods():
    m = source(LOADS)
    reading = await m.read(external("envoy:requests_in_flight", "AverageValue"), SCOPE)
    assert reading.pods is None  # the controller's pod count: ready local pods
    assert compare(external("envoy:requests_in_flight", "AverageValue"), reading.total, 4).current == 2.5
    pods = MetricSpec("Pods", "envoy:requests_in_flight", MetricTarget("AverageValue", 2))
    status = compare(pods, (await m.read(pods, SCOPE)).total, 4)
    assert (status.current, status.over) == (2.5, True)


async def test_orca_metrics_are_the_mean_the_local_pods_returned():
    m = source(LOADS)
    assert (await m.read(external("envoy:orca:kv_cache_usage_perc"), SCOPE)).total == pytest.approx(0.6)
    idle = source({LOCAL: ClusterLoad(in_flight=2)})  # nothing answered yet: no load reported
    assert (await idle.read(external("envoy:orca:kv_cache_usage_perc"), SCOPE)).total == 0.0
    silent = await m.read(external("envoy:orca:num_requests_waiting"), SCOPE)
    assert silent.total is None and "none returned ORCA metric 'num_requests_waiting'" in silent.error


async def test_an_unreported_model_reads_zero_but_no_envoy_reporting_is_an_error():
    assert (await source({}).read(external("envoy:requests_in_flight"), SCOPE)).total == 0.0
    reading = await source({}, reporting=0).read(external("envoy:requests_in_flight"), SCOPE)
    assert reading.total is None and "no Envoy is sending load reports" in reading.error


async def test_a_bad_envoy_metric_reads_as_its_error():
    """Parsing refuses these with the field path (tests/test_crd.py); a spec built otherwise still
    gets the same words rather than a number."""
    reading = await source(LOADS).read(external("envoy:queue"), SCOPE)
    assert reading.total is None and "unknown Envoy load metric 'envoy:queue'" in reading.error


class Fallback:
    def __init__(self) -> None:
        self.asked: list = []

    async def read(self, spec, scope) -> Reading:
        return (await self.read_many([(spec, scope)]))[0]

    async def read_many(self, requests) -> list[Reading]:
        self.asked.extend(spec.name for spec, _ in requests)
        return [Reading(42.0) for _ in requests]


async def test_other_names_go_down_the_chain_and_envoys_are_asked_for_the_models_read():
    fallback, asked = Fallback(), []
    m = source(LOADS, fallback=fallback, asked=asked)
    other = MetricScope("ns", "", "other")
    readings = await m.read_many(
        [
            (external("queue_depth"), SCOPE),
            (external("envoy:requests_in_flight"), SCOPE),
            (external("x"), other),
        ]
    )
    assert [r.total for r in readings] == [42.0, 10.0, 42.0]
    assert fallback.asked == ["queue_depth", "x"]
    assert asked == [frozenset({LOCAL, REMOTE})]  # only the model that reads envoy: metrics


def test_the_fast_reader_agrees_with_envoy_data_plane_on_a_large_report():
    """20,000 asked clusters, a few busy: the busy ones are found by searching the bytes, so check
    them against a full decode (names of every length, ORCA names that look like cluster names)."""
    asked = [cluster_name(f"ns-{i % 7}", "m" * (1 + i % 120), side) for i in range(10_000) for side in SIDES]
    busy = {
        name: Load(
            in_flight=i % 5, issued=i + 1, succeeded=i // 2, errors=i % 3, orca={"x/local": 1.0, "q": i / 7}
        )
        for i, name in enumerate(asked)
        if i % 997 == 0
    }
    data = report("edge", busy, asked, interval=1.0)
    _, loads = read_report(data, 1.0)
    expected = {}
    for stats in LoadStatsRequest.FromString(data).cluster_stats:
        if stats.upstream_locality_stats:
            [loc] = stats.upstream_locality_stats
            expected[stats.cluster_name] = (loc.total_requests_in_progress, float(loc.total_issued_requests))
    assert {name: (load.in_flight, load.rate) for name, load in loads.items()} == expected
    assert len(expected) == len(busy)
