"""Bad metric answers, tried systematically: whatever Prometheus or the Kubernetes metrics APIs
answer, a read is a number or says why there is none; never an exception, never a NaN or an
infinity on a model's status.

The Prometheus answers come over HTTP from a server on loopback that answers what Hypothesis
draws; the metrics APIs' answers are handed to the source as the API server's JSON.
"""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_manifests import values
from test_kube_metrics import pod, usage

from api.metric_spec import MetricSpec, MetricTarget
from metrics.hpa import compare
from metrics.kubernetes import KubernetesMetrics
from metrics.prometheus import PrometheusInformer
from metrics.source import MetricScope, Reading

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["NaN", "+Inf", "-Inf", "1e308", "-0", "", "x", "1_0", " 5 "]),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    values,
)
series = st.fixed_dictionaries(
    {
        "metric": st.one_of(
            st.dictionaries(st.sampled_from(["model", "pod", "x"]), st.text(max_size=5)), values
        )
    },
    optional={"value": st.one_of(st.tuples(st.floats(), numbers).map(list), values)},
)
answers = st.one_of(
    st.fixed_dictionaries(
        {"status": st.sampled_from(["success", "error", None]) | values},
        optional={
            "data": st.one_of(
                st.fixed_dictionaries(
                    {"resultType": st.sampled_from(["vector", "scalar", "matrix", "string"]) | values},
                    optional={
                        "result": st.one_of(
                            st.lists(series, max_size=4), st.tuples(st.floats(), numbers).map(list), values
                        )
                    },
                ),
                values,
            ),
            "error": values,
        },
    ).map(json.dumps),
    values.map(json.dumps),
    st.text(max_size=100),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
)
SPECS = [
    MetricSpec("External", "queue_depth", MetricTarget("Value", 10)),
    MetricSpec("External", "sum(rate(x[1m]))", MetricTarget("AverageValue", 1)),
    *(MetricSpec("External", "queue", MetricTarget("Value", 10), selector={"model": m}) for m in ("a", "b")),
]


def sane(reading: Reading) -> None:
    """A reading is a finite number, or None with the reason."""
    if reading.total is None:
        assert isinstance(reading.error, str) and reading.error
    else:
        assert isinstance(reading.total, float | int)
    status = compare(SPECS[0], reading.total, reading.pods or 1, reading.error)
    assert status.current is None or math.isfinite(status.current)
    assert (status.current is None) == (status.over is None) and (status.current is None) == bool(
        status.error
    )


@pytest.fixture
def prometheus_double():
    """A Prometheus HTTP API on loopback whose every answer is `answer` (body, status), and an
    informer reading it, on an event loop of the test's own (Hypothesis runs examples in turn)."""
    loop = asyncio.new_event_loop()
    answer = {"body": "", "status": 200}

    async def query(_: web.Request) -> web.Response:
        return web.Response(text=answer["body"], status=answer["status"], content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/api/v1/query", query)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    session = loop.run_until_complete(open_session())
    informer = PrometheusInformer(f"127.0.0.1:{port}", session, timeout=5)
    yield loop, answer, informer
    loop.run_until_complete(session.close())
    loop.run_until_complete(runner.cleanup())
    loop.close()


@SETTINGS
@given(answers, st.sampled_from([200, 400, 422, 500, 503]))
def test_any_prometheus_answer_is_a_reading_or_its_reason(prometheus_double, body, status):
    loop, answer, informer = prometheus_double
    answer.update(body=body, status=status)
    single = loop.run_until_complete(informer.read(SPECS[0]))
    batch = loop.run_until_complete(informer.read_many([(s, MetricScope()) for s in SPECS]))
    for reading in (single, *batch):
        sane(reading)


def test_prometheus_infinities_never_reach_a_status_and_nan_series_are_left_out(prometheus_double):
    loop, answer, informer = prometheus_double
    for value, expected in (("+Inf", None), ("-Inf", None), ("1e308", None), ("NaN", 1e308)):
        body = {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [0, value]}, {"metric": {}, "value": [0, "1e308"]}]}}  # fmt: skip
        answer.update(body=json.dumps(body), status=200)
        reading = loop.run_until_complete(informer.read(SPECS[0]))
        status = compare(SPECS[0], reading.total, 1, reading.error)
        assert status.current == expected, (value, status)
        assert (status.error is None) == (expected is not None)
        if expected is None:
            assert status.error.startswith("External/queue_depth: the reading is not a finite number")


# --- the Kubernetes metrics APIs ---

K8S_SPECS = [
    MetricSpec("Resource", "cpu", MetricTarget("Utilization", 80)),
    MetricSpec("Resource", "memory", MetricTarget("AverageValue", 2**30)),
    MetricSpec("ContainerResource", "cpu", MetricTarget("Utilization", 50), container="c0"),
    MetricSpec("Pods", "inflight", MetricTarget("AverageValue", 3)),
    MetricSpec("External", "queue_depth", MetricTarget("Value", 5), selector={"q": "a"}),
]
SCOPE = MetricScope("default", "app=m")
quantity = st.one_of(st.sampled_from(["500m", "1Gi", "0", "-1", "1e308", "9E", "abc", "", "1e-400"]), values)


@st.composite
def pods(draw) -> list:
    """Pods near what the API server sends, with any field replaced by anything."""
    out = []
    for i in range(draw(st.integers(0, 3))):
        p = pod(f"p{i}", ready=draw(st.booleans()), cpu=draw(quantity), containers=draw(st.integers(0, 2)))
        if draw(st.booleans()):
            where = draw(st.sampled_from(["metadata", "spec", "status"]))
            p[where] = draw(values)
        out.append(p)
    return out


@st.composite
def api_answers(draw) -> dict:
    def listing(items):
        return draw(st.one_of(st.just({"items": items}), values))

    metrics = [usage(f"p{i}", *draw(st.lists(quantity, max_size=2))) for i in range(draw(st.integers(0, 3)))]
    custom = [{"value": draw(quantity)} for _ in range(draw(st.integers(0, 3)))]
    return {
        "/api/v1/namespaces/default/pods": listing(draw(pods())),
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods": listing(metrics),
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/inflight": listing(custom),
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_depth": listing(custom),
    }


@settings(max_examples=300, deadline=None)
@given(api_answers())
def test_any_metrics_api_answer_is_a_reading_or_its_reason(answers):
    async def get(path: str, params: dict):
        return answers[path]

    async def read_all() -> list[Reading]:
        return await KubernetesMetrics(get, max_age=0).read_many([(s, SCOPE) for s in K8S_SPECS])

    for spec, reading in zip(K8S_SPECS, asyncio.run(read_all()), strict=True):
        sane(reading)
        status = compare(spec, reading.total, reading.pods or 1, reading.error)
        assert status.current is None or math.isfinite(status.current)


# --- HPA arithmetic ---


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(SPECS + K8S_SPECS),
    st.none() | st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-5, max_value=10**6),
)
def test_any_reading_held_against_a_target_is_a_verdict_or_its_reason(spec, total, pods_):
    status = compare(spec, total, pods_)
    if status.current is None:
        assert status.over is None and status.error
    else:
        assert math.isfinite(status.current) and status.over == (status.current > spec.target.threshold)
