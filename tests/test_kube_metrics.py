"""The metrics-API source against numbers worked by hand from the HPA's documented algorithm.

HPA (kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale, "Algorithm
details"): utilization is the ready pods' summed usage over their summed requests; pods
without metrics are assumed to use 0 % of their request when the others say scale up and
100 % when they say scale down, and if that reverses the direction the HPA does nothing;
unready pods are set aside; a missing request is an error. Each case below is that
arithmetic done on paper; `over` is whether offloading would trigger.
"""

from __future__ import annotations

import pytest

from api.metric_spec import MetricSpec, MetricTarget
from metrics.hpa import compare
from metrics.kubernetes import KubernetesMetrics, PodSample, selector_matches, utilization
from metrics.source import MetricScope

# (case, pods as (ready, request millicores, usage millicores or None), target %, utilization or None)
THREE = [(True, 1000, 900), (True, 1000, 900), (True, 1000, None)]
LOW = [(True, 1000, 200), (True, 1000, 200), (True, 1000, None)]
CASES = [
    ("three pods at their request", [(True, 500, 400), (True, 500, 500), (True, 500, 600)], 90, 100.0),
    ("uneven requests: sums, not a mean of ratios", [(True, 1000, 900), (True, 250, 50)], 70, 76.0),
    ("over; a pod without metrics at 0 % flips it: no verdict", THREE, 80, None),  # 1800/3000 = 60
    ("over; still over with the missing pod at 0 %", THREE, 50, 90.0),  # 60 > 50
    ("under; still under with the missing pod at 100 %", LOW, 50, 20.0),  # 1400/3000 = 46.7 < 50
    ("under; the missing pod at 100 % flips it: no verdict", LOW, 40, None),  # 46.7 > 40
    ("an unready pod is set aside", [(True, 1000, 500), (True, 1000, 500), (False, 1000, 1000)], 60, 50.0),
    ("no ready pod: no verdict", [(False, 1000, 900)], 50, None),
]


@pytest.mark.parametrize("case,pods,target,expected", CASES, ids=[c[0] for c in CASES])
def test_utilization_follows_the_hpa(case, pods, target, expected):
    samples = [
        PodSample(f"p{i}", ready, req / 1000, None if use is None else use / 1000)
        for i, (ready, req, use) in enumerate(pods)
    ]
    value, why = utilization(samples, target)
    if expected is None:
        assert value is None and why
    else:
        assert why is None and value == pytest.approx(expected)


def pod(name: str, ready: bool = True, cpu: str | None = "500m", containers: int = 1, phase: str = "Running"):
    spec = [
        {
            "name": f"c{i}",
            "resources": {"requests": {"cpu": cpu, "memory": "1Gi"} if cpu else {"memory": "1Gi"}},
        }
        for i in range(containers)
    ]
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "m"}},
        "spec": {"containers": spec},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def usage(name: str, *cpu: str, memory: str = "512Mi"):
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "m"}},
        "containers": [{"name": f"c{i}", "usage": {"cpu": c, "memory": memory}} for i, c in enumerate(cpu)],
    }


class Api:
    """What the API server answers for these paths (the e2e tests use the API server double)."""

    def __init__(self, pods, metrics, custom=None):
        self.answers = {
            "/api/v1/namespaces/default/pods": {"items": pods},
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods": {"items": metrics},
            **(custom or {}),
        }
        self.asked: list[tuple[str, dict]] = []

    async def get(self, path: str, params: dict) -> dict:
        self.asked.append((path, params))
        return self.answers[path]


def cpu(target_type: str = "Utilization", threshold: float = 80, container: str | None = None) -> MetricSpec:
    return MetricSpec(
        "ContainerResource" if container else "Resource",
        "cpu",
        MetricTarget(target_type, threshold),
        container=container,
    )


SCOPE = MetricScope("default", "app=m")


async def test_resource_utilization_reads_pods_by_the_workloads_selector():
    api = Api([pod("a"), pod("b")], [usage("a", "450m"), usage("b", "350m")])
    reading = await KubernetesMetrics(api.get).read(cpu(), SCOPE)
    assert reading.total == pytest.approx(80.0)  # 800m of 1000m
    assert not compare(cpu(), reading.total, 2).over  # 80 is not over 80
    # One namespace-wide list each of pods and PodMetrics, matched against the selector here.
    assert [path for path, _ in api.asked] == [
        "/api/v1/namespaces/default/pods",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods",
    ]


async def test_models_in_one_namespace_share_one_list_per_evaluation():
    other = dict(pod("x"), metadata={"name": "x", "namespace": "default", "labels": {"app": "other"}})
    api = Api([pod("a"), other], [usage("a", "450m"), dict(usage("x", "50m"), metadata=other["metadata"])])
    source = KubernetesMetrics(api.get, max_age=60)
    first = await source.read(cpu(), SCOPE)
    second = await source.read(cpu(), MetricScope("default", "app=other"))
    assert (first.total, second.total) == (pytest.approx(90.0), pytest.approx(10.0))
    assert len(api.asked) == 2  # shared by both models


@pytest.mark.parametrize(
    "selector,labels,matches",
    [
        ("app=m", {"app": "m"}, True),
        ("app=m,tier!=db", {"app": "m", "tier": "db"}, False),
        ("app in (m, n)", {"app": "n"}, True),
        ("app notin (m)", {"app": "m"}, False),
        ("gpu", {"gpu": ""}, True),
        ("!gpu", {"gpu": "a100"}, False),
        ("app==m,env in (prod,staging),!canary", {"app": "m", "env": "prod"}, True),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selectors_match_as_the_api_server_does(selector, labels, matches):
    assert selector_matches(selector, labels) is matches


async def test_a_container_without_a_request_is_an_error_not_a_crash():
    api = Api([pod("a"), pod("b", cpu=None)], [usage("a", "450m"), usage("b", "350m")])
    reading = await KubernetesMetrics(api.get).read(cpu(), SCOPE)
    assert reading.total is None and "no request" in reading.error and "b" in reading.error


async def test_container_resource_counts_only_that_container():
    api = Api([pod("a", containers=2)], [usage("a", "400m", "100m")])
    reading = await KubernetesMetrics(api.get).read(cpu(container="c0"), SCOPE)
    assert reading.total == pytest.approx(80.0)  # c0: 400m of 500m; c1 ignored


async def test_average_value_divides_by_the_pods_with_metrics():
    spec = MetricSpec("Resource", "memory", MetricTarget("AverageValue", 2 * 2**30))
    api = Api(
        [pod("a"), pod("b"), pod("c")], [usage("a", "1m", memory="1Gi"), usage("b", "1m", memory="3Gi")]
    )
    reading = await KubernetesMetrics(api.get).read(spec, SCOPE)
    status = compare(spec, reading.total, reading.pods or 99)
    assert (reading.pods, status.current, status.over) == (2, 2 * 2**30, False)


async def test_without_a_workload_selector_the_metric_says_why():
    reading = await KubernetesMetrics(Api([], []).get).read(cpu(), MetricScope("default", ""))
    assert reading.total is None and "modelSourceRef" in reading.error


async def test_external_and_pods_metrics_come_from_their_apis():
    custom = {
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_depth": {
            "items": [
                {"metricName": "queue_depth", "value": "7"},
                {"metricName": "queue_depth", "value": "500m"},
            ]
        },
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/*/inflight": {
            "items": [{"value": "3"}, {"value": "5"}]
        },
    }
    api = Api([], [], custom)
    source = KubernetesMetrics(api.get)
    external = await source.read(
        MetricSpec("External", "queue_depth", MetricTarget("Value", 5), selector={"q": "a"}), SCOPE
    )
    assert external.total == pytest.approx(7.5)
    pods = await source.read(MetricSpec("Pods", "inflight", MetricTarget("AverageValue", 3)), SCOPE)
    assert (pods.total, pods.pods) == (8, 2)
    assert (
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_depth",
        {"labelSelector": "q=a"},
    ) in api.asked


async def test_an_api_error_is_a_reading_error():
    async def broken(path, params):
        raise RuntimeError("503 ServiceUnavailable: metrics-server is down")

    reading = await KubernetesMetrics(broken).read(cpu(), SCOPE)
    assert reading.total is None and "metrics-server is down" in reading.error
