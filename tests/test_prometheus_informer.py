"""The Prometheus informer: the PromQL it sends, and what it makes of every answer (or none)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import prometheus_client as prom
import pytest
import yaml
from aiohttp import web
from e2e_stack import Knob

from api.metric_spec import MetricSpec, MetricTarget
from metrics.prometheus import PrometheusInformer, promql_for
from metrics.source import MetricScope, Reading
from overspill.demo.procs import Prometheus

TARGET = MetricTarget("Value", 10)


def external(name: str, **labels: str) -> MetricSpec:
    return MetricSpec("External", name, TARGET, selector=labels)


def vector(*values: str) -> dict:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": {"pod": f"p{i}"}, "value": [1700000000.0, v]} for i, v in enumerate(values)
            ],
        },
    }


# --- PromQL ---


def test_a_metric_name_without_selector_is_sent_as_is():
    assert promql_for(external("my_custom_metric_in_prom")) == "my_custom_metric_in_prom"


def test_match_labels_become_label_matchers():
    spec = external("my_custom_metric_in_prom", my_label="value", b="2")
    assert promql_for(spec) == 'my_custom_metric_in_prom{b="2",my_label="value"}'


def test_label_values_are_escaped():
    spec = external("m", path='C:\\x "quoted"\nnext')
    assert promql_for(spec) == 'm{path="C:\\\\x \\"quoted\\"\\nnext"}'


@pytest.mark.parametrize(
    "expression",
    [
        'sum(rate(http_requests_total{job="llm"}[1m]))',
        "avg(vllm:num_requests_waiting)",
        "queue_depth > 3",
    ],
)
def test_a_promql_expression_is_passed_as_is(expression):
    assert promql_for(external(expression)) == expression


def test_colon_names_are_metric_names():
    spec = external("vllm:num_requests_running", model_name="llm")
    assert not spec.is_promql_expression
    assert promql_for(spec) == 'vllm:num_requests_running{model_name="llm"}'


# --- against a small HTTP server ---

# Seed 002's controller chart values.yaml (indentation restored, tabs as spaces).
SEED_002_VALUES = """\
config:
  metricInformer:
    type: prometheus
    prometheus:
      address: my-local-prom:9090
"""

ANSWERS: dict[str, tuple[int, bytes]] = {
    "two_series": (200, json.dumps(vector("3", "4.5")).encode()),
    "with_nan": (200, json.dumps(vector("NaN", "2")).encode()),
    "only_nan": (200, json.dumps(vector("NaN")).encode()),
    "empty_vector": (200, json.dumps(vector()).encode()),
    "scalar": (
        200,
        json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "7.25"]}}).encode(),
    ),
    "matrix": (
        200,
        json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode(),
    ),
    "bad_query": (
        400,
        json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"}).encode(),
    ),
    "text_500": (500, b"upstream connect error or disconnect/reset before headers"),
    "empty_500": (500, b""),
    "empty_200": (200, b""),
    "garbage": (200, b"<html>not prometheus</html>"),
    "json_list": (200, b"[1, 2, 3]"),
    "bad_number": (200, json.dumps(vector("twelve")).encode()),
    "null_result": (
        200,
        json.dumps({"status": "success", "data": {"resultType": "scalar", "result": None}}).encode(),
    ),
}


@pytest.fixture
async def prometheus():
    """A stand-in Prometheus on 127.0.0.1: answers by query, records what was asked."""
    asked: list[str] = []
    release = asyncio.Event()

    async def query(request: web.Request) -> web.Response:
        q = request.query.get("query", "")
        asked.append(q)
        if q == "slow":
            await asyncio.wait_for(release.wait(), 5)
        status, body = ANSWERS.get(q, (200, json.dumps(vector("1")).encode()))
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}", asked
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def read(address: str, session, name: str, timeout: float = 3.0) -> Reading:
    informer = PrometheusInformer(address, session, timeout=timeout)
    return await asyncio.wait_for(informer.read(external(name)), 10)


async def test_seed_002_address_without_scheme(prometheus, session):
    config = yaml.safe_load(SEED_002_VALUES)
    address = config["config"]["metricInformer"]["prometheus"]["address"]
    assert PrometheusInformer(address, session).url == "http://my-local-prom:9090"
    # The same form pointed at the test server reads a value.
    host_port, _ = prometheus
    assert (await read(host_port, session, "anything")).total == 1.0


async def test_url_with_scheme_and_trailing_slash(prometheus, session):
    host_port, asked = prometheus
    reading = await read(f"http://{host_port}/", session, "two_series")
    assert reading.total == 7.5
    assert asked == ["two_series"]


async def test_the_selector_is_sent_as_label_matchers(prometheus, session):
    host_port, asked = prometheus
    informer = PrometheusInformer(host_port, session)
    reading = await informer.read(external("my_custom_metric_in_prom", my_label="value"))
    assert asked == ['my_custom_metric_in_prom{my_label="value"}']
    assert reading.query == asked[0]
    assert reading.total == 1.0


async def test_series_are_summed(prometheus, session):
    reading = await read(prometheus[0], session, "two_series")
    assert (reading.total, reading.error) == (7.5, None)


async def test_nan_series_are_left_out(prometheus, session):
    assert (await read(prometheus[0], session, "with_nan")).total == 2.0
    reading = await read(prometheus[0], session, "only_nan")
    assert reading.total is None
    assert "returned no series" in reading.error


async def test_scalar(prometheus, session):
    assert (await read(prometheus[0], session, "scalar")).total == 7.25


async def test_empty_result_is_an_error_not_zero(prometheus, session):
    reading = await read(prometheus[0], session, "empty_vector")
    assert reading.total is None
    assert reading.error == "query 'empty_vector' returned no series"


async def test_a_range_vector_is_refused(prometheus, session):
    reading = await read(prometheus[0], session, "matrix")
    assert reading.total is None
    assert "returned a matrix" in reading.error


async def test_prometheus_error_is_passed_on(prometheus, session):
    reading = await read(prometheus[0], session, "bad_query")
    assert reading.total is None
    assert reading.error == "prometheus error for 'bad_query': parse error at char 5"


async def test_http_500_is_reported_with_its_status(prometheus, session):
    reading = await read(prometheus[0], session, "text_500")
    assert reading.total is None
    assert "500" in reading.error, reading.error


@pytest.mark.parametrize(
    "name", ["garbage", "empty_200", "empty_500", "json_list", "bad_number", "null_result"]
)
async def test_unusable_answers_become_errors_and_never_raise(prometheus, session, name):
    reading = await read(prometheus[0], session, name)
    assert reading.total is None
    assert reading.error


async def test_a_closed_port_is_an_error(session):
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    reading = await read(f"127.0.0.1:{port}", session, "anything")
    assert reading.total is None
    assert reading.error.startswith(f"prometheus unreachable at http://127.0.0.1:{port}")
    assert reading.query == "anything"


async def test_a_batch_failing_the_same_way_gives_the_same_readings_again(session):
    """Prometheus down under 600 models: each model's reading names its own query and the
    error; the next evaluation's identical failure returns the very same Reading objects (the
    controller then sees 'unchanged' without comparing them), and a new error new ones."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    informer = PrometheusInformer(f"127.0.0.1:{port}", session)
    specs = [(external("inflight", model=f"m{i}"), MetricScope()) for i in range(600)]
    first = await asyncio.wait_for(informer.read_many(specs), 10)
    again = await asyncio.wait_for(informer.read_many(specs), 10)
    assert informer.queries == 2 * 2  # 500 + 100, twice
    assert first[7].query == 'inflight{model="m7"}' and first[7].total is None
    assert first[7].error.startswith(f"prometheus unreachable at http://127.0.0.1:{port}")
    assert all(a is b for a, b in zip(first, again, strict=True))
    informer.url = "http://127.0.0.1:9"  # another address: another error
    other = await asyncio.wait_for(informer.read_many(specs), 10)
    assert other[7].error.startswith("prometheus unreachable at http://127.0.0.1:9")
    assert other[7].query == 'inflight{model="m7"}'


async def test_a_slow_server_times_out_as_an_error(prometheus, session):
    reading = await read(prometheus[0], session, "slow", timeout=0.3)
    assert reading.total is None
    assert "TimeoutError" in reading.error


@pytest.mark.parametrize("mtype", ["Resource", "ContainerResource"])
async def test_resource_metrics_point_at_metrics_server(prometheus, session, mtype):
    host_port, asked = prometheus
    spec = MetricSpec(mtype, "cpu", MetricTarget("Utilization", 90), container="c")
    reading = await PrometheusInformer(host_port, session).read(spec)
    assert reading.total is None
    assert "metrics-server" in reading.error
    assert asked == []


async def test_pods_and_object_metrics_are_queried(prometheus, session):
    host_port, asked = prometheus
    informer = PrometheusInformer(host_port, session)
    pods = MetricSpec("Pods", "inflight", MetricTarget("AverageValue", 4))
    obj = MetricSpec("Object", "two_series", MetricTarget("Value", 4))
    assert (await informer.read(pods)).total == 1.0
    assert (await informer.read(obj)).total == 7.5
    assert asked == ["inflight", "two_series"]


# --- through the controller: one model's broken metric never disturbs another ---


async def test_a_broken_answer_for_one_model_does_not_stop_the_others(prometheus, session):
    from api.crd import ObjectKey
    from reconciler.controller import Controller
    from reconciler.documents import parse_documents
    from reconciler.store import ObjectStore
    from xds.snapshot import Translator

    remote = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    remote_port = remote.sockets[0].getsockname()[1]
    docs = []
    for name, metric in (("good", "two_series"), ("broken", "empty_200")):
        docs += [
            {
                "apiVersion": "deployment.beamlit.com/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name},
                "spec": {
                    "serviceRef": {"name": name},
                    "offloadingConfig": {
                        "remoteBackend": {"host": f"127.0.0.1:{remote_port}"},
                        "behavior": {"percentage": 50},
                        "metrics": [
                            {
                                "type": "External",
                                "external": {
                                    "metric": {"name": metric},
                                    "target": {"type": "Value", "value": 5},
                                },
                            }
                        ],
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name},
                "spec": {"ports": [{"port": 80}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-1", "labels": {"kubernetes.io/service-name": name}},
                "endpoints": [{"addresses": ["10.0.0.1"]}],
                "ports": [{"port": 8000}],
            },
        ]
    store = ObjectStore()
    store.replace_origin("x.yaml", *parse_documents(yaml.safe_dump_all(docs), "x.yaml"))
    informer = PrometheusInformer(prometheus[0], session)
    controller = Controller(store, Translator("127.0.0.1", 10000).apply, informer)
    try:
        await asyncio.wait_for(controller.evaluate(), 10)
    finally:
        remote.close()
        await remote.wait_closed()
    good = controller.status[ObjectKey("ModelDeployment", "default", "good")]
    broken = controller.status[ObjectKey("ModelDeployment", "default", "broken")]
    assert (good.phase, good.remote_percent) == ("Offloading", 50.0)
    assert good.metrics[0].current == 7.5
    assert broken.metrics[0].over is None
    assert broken.metrics[0].error


# --- many models against a real Prometheus ---


async def test_many_models_are_read_with_a_few_batched_queries(session):
    """1,200 models, each with its own label value (dots and dashes included, which a regex
    would otherwise read as wildcards), are read with one query per 500: every model gets
    exactly its own series' sum, and a model without series gets an error, not another's value."""
    knob = Knob()
    gauge = prom.Gauge("inflight", "per model and replica", ["model", "replica"], registry=knob.registry)
    names = [f"m-{i}.team" for i in range(1200)]
    for i, name in enumerate(names):
        gauge.labels(name, "a").set(i)
        gauge.labels(name, "b").set(0.5)
    gauge.labels("m-1xteam", "a").set(1e6)  # what an unescaped "m-1.team" would also match
    await knob.start()
    try:
        async with Prometheus([f"127.0.0.1:{knob.port}"], scrape_interval=0.5) as prometheus:
            informer = PrometheusInformer(prometheus.url, session)
            specs = [(external("inflight", model=n), MetricScope()) for n in [*names, "absent"]]
            for _ in range(40):  # until the first scrape is in
                readings = await informer.read_many(specs)
                if readings[0].error is None:
                    break
                await asyncio.sleep(0.25)
            informer.queries = 0
            readings = await asyncio.wait_for(informer.read_many(specs), 10)
            # Other requests (the reading plan is remembered for the same ones): read as asked.
            others = await asyncio.wait_for(informer.read_many(specs[2::-1]), 10)
    finally:
        await knob.stop()
    assert [r.total for r in others] == [2.5, 1.5, 0.5]
    assert informer.queries == 3 + 1  # 1,201 models: 500 + 500 + 201; then the 3 others
    assert [r.total for r in readings[:-1]] == [i + 0.5 for i in range(1200)]
    assert readings[1].query == 'inflight{model="m-1.team"}'  # status shows the model's own query
    assert readings[-1].total is None and "returned no series" in readings[-1].error


# --- a real Prometheus going away: the metric goes stale, and comes back ---


async def test_prometheus_going_away_makes_the_metric_stale_until_it_returns(session, caplog):
    """Prometheus stops while the model offloads: after metricStaleAfterSeconds the model goes
    all local (onStaleMetric: local), its status and the log name the metric; a Prometheus back
    on the same address brings the readings, and the offloading, back."""
    from api.crd import ObjectKey
    from reconciler.controller import Controller
    from reconciler.documents import parse_documents
    from reconciler.store import ObjectStore
    from xds.snapshot import Translator

    caplog.set_level("INFO", "overspill")
    knob = Knob()
    knob.set("m", 12)  # over its target of 5
    await knob.start()
    remote = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    docs = [
        {
            "apiVersion": "deployment.beamlit.com/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "m"},
            "spec": {
                "serviceRef": {"name": "m"},
                "offloadingConfig": {
                    "remoteBackend": {"host": f"127.0.0.1:{remote.sockets[0].getsockname()[1]}"},
                    "behavior": {"percentage": 50, "metricStaleAfterSeconds": 2, "onStaleMetric": "local"},
                    "metrics": [
                        {
                            "type": "External",
                            "external": {
                                "metric": {
                                    "name": "overspill_test_load",
                                    "selector": {"matchLabels": {"model": "m"}},
                                },
                                "target": {"type": "Value", "value": 5},
                            },
                        }
                    ],
                },
            },
        },
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "m"}, "spec": {"ports": [{"port": 80}]}},
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "m-1", "labels": {"kubernetes.io/service-name": "m"}},
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"port": 8000}],
        },
    ]
    store = ObjectStore()
    store.replace_origin("x.yaml", *parse_documents(yaml.safe_dump_all(docs), "x.yaml"))
    key = ObjectKey("ModelDeployment", "default", "m")
    metric = "External/overspill_test_load"
    series = 'overspill_test_load{model="m"}'
    first = Prometheus([f"127.0.0.1:{knob.port}"], scrape_interval=0.5)
    controller: Controller | None = None

    async def evaluate_until(done, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            await asyncio.wait_for(controller.evaluate(), 5)
            if done(controller.status[key]):
                return
            assert loop.time() < deadline, controller.status[key].to_dict()
            await asyncio.sleep(0.25)

    try:
        async with first:
            await first.wait_for_series(series, timeout=30)
            controller = Controller(
                store, Translator("127.0.0.1", 10000).apply, PrometheusInformer(first.url, session, 1.0)
            )
            await evaluate_until(lambda s: s.phase == "Offloading", 10)
            assert controller.status[key].remote_percent == 50.0
        gone_at = asyncio.get_running_loop().time()
        await evaluate_until(lambda s: s.stale_metrics, 10)
        assert asyncio.get_running_loop().time() - gone_at >= 2
        status = controller.status[key]
        assert (status.phase, status.remote_percent, status.stale_metrics) == ("Standby", 0.0, [metric])
        assert f"metric stale: {metric}" in status.reason
        assert "unreachable" in (status.metrics[0].error or "")
        assert controller.routes[0].remote_percent == 0.0
        async with Prometheus([f"127.0.0.1:{knob.port}"], scrape_interval=0.5, port=first.port) as second:
            await second.wait_for_series(series, timeout=30)
            await evaluate_until(lambda s: not s.stale_metrics, 10)
            status = controller.status[key]
            assert (status.phase, status.remote_percent) == ("Offloading", 50.0)
    finally:
        await knob.stop()
        remote.close()
        await remote.wait_closed()
    lines = [
        r.getMessage()
        for r in caplog.records
        if "event=metric_stale" in r.getMessage() or "event=metric_fresh" in r.getMessage()
    ]
    assert [line.split()[0] for line in lines] == ["event=metric_stale", "event=metric_fresh"], lines
    assert all(f"metric={metric}" in line for line in lines)
