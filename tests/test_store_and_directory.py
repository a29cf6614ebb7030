"""The object store, the directory source and the controller that turns them into routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import pytest
import yaml

from api.crd import ObjectKey, RemoteBackend, Spillover
from api.status import Phase
from metrics.instruments import Instruments
from metrics.source import Reading, read_each
from reconciler.controller import Controller
from reconciler.directory import PARALLEL_MIN_FILES, DirectorySource, parse_files
from reconciler.documents import LIMITS, load_all, parse_documents, parse_file
from reconciler.probe import RemoteProbe
from reconciler.status_writer import desired_status
from reconciler.store import ObjectStore
from xds.cache import ResourceCache, Scope
from xds.snapshot import Translator
from xds.types import CLUSTER


def model_doc(
    name: str = "m",
    service: str = "svc",
    percentage: float = 50,
    namespace: str = "default",
    remote: str | None = "standby.example.com",
    metric: str = "queue_depth",
    target_type: str = "Value",
    threshold: float = 10,
    buffer: float = 30,
    offloading: bool = True,
    source: str | None = None,
    behavior: dict | None = None,
) -> dict:
    spec: dict = {"serviceRef": {"name": service, "targetPort": 80}}
    if source:
        spec["modelSourceRef"] = {"kind": "Deployment", "name": source}
    if offloading:
        key = "value" if target_type == "Value" else "averageValue"
        spec["offloadingConfig"] = {
            "behavior": {"percentage": percentage, "bufferDurationSeconds": buffer, **(behavior or {})},
            "metrics": [
                {
                    "type": "External",
                    "external": {"metric": {"name": metric}, "target": {"type": target_type, key: threshold}},
                }
            ],
        }
        if remote:
            spec["offloadingConfig"]["remoteBackend"] = {"host": remote}
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def service_docs(name: str = "svc", namespace: str = "default", ready=(True, True)) -> list[dict]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8000}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-abcde",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [f"10.0.0.{i + 1}"], "conditions": {"ready": r}} for i, r in enumerate(ready)
            ],
            "ports": [{"name": "http", "port": 8000}],
        },
    ]


def deployment_doc(name: str, ready: int, namespace: str = "default") -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": ready},
        "status": {"readyReplicas": ready},
    }


def text(*docs: dict) -> str:
    return yaml.safe_dump_all(docs)


def load(store: ObjectStore, origin: str, body: str) -> None:
    store.replace_origin(origin, *parse_documents(body, origin))


MODEL = ObjectKey("ModelDeployment", "default", "m")
SERVICE = ObjectKey("Service", "default", "svc")


# --- ObjectStore ---


def test_replace_origin_holds_exactly_the_files_objects():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), *service_docs()))
    assert store.get(MODEL) is not None
    assert store.service("default", "svc") is not None
    assert len(store.endpoint_slices("default", "svc")) == 1
    revision = store.revision
    load(store, "a.yaml", text(model_doc()))
    assert store.get(MODEL) is not None
    assert store.service("default", "svc") is None
    assert store.endpoint_slices("default", "svc") == []
    assert store.revision > revision


def test_rejected_new_version_keeps_the_last_valid_one():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(percentage=50), *service_docs()))
    good = store.get(MODEL)
    load(store, "a.yaml", text(model_doc(percentage=150), *service_docs()))
    assert store.get(MODEL) is good
    assert store.get(MODEL).offloading.behavior.percentage == 50
    (rejected,) = store.rejected_for(MODEL)
    assert rejected.errors == (
        "default/m: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150",
    )
    # Fixing the file takes the new version and clears the error.
    load(store, "a.yaml", text(model_doc(percentage=70), *service_docs()))
    assert store.get(MODEL).offloading.behavior.percentage == 70
    assert store.rejected() == []


def test_rejected_object_that_was_never_valid_is_not_invented():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(percentage=150)))
    assert store.get(MODEL) is None
    assert len(store.rejected_for(MODEL)) == 1


def test_malformed_yaml_keeps_every_object_of_the_file():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), *service_docs()))
    before = (store.get(MODEL), store.service("default", "svc"))
    load(store, "a.yaml", "apiVersion: v1\nkind: [Service\n")
    assert (store.get(MODEL), store.service("default", "svc")) == before
    (rejected,) = store.rejected()
    assert rejected.key is None
    assert "a.yaml: malformed YAML" in rejected.errors[0]


def test_removing_an_origin_removes_its_objects_and_errors():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), model_doc(name="bad", percentage=-1)))
    load(store, "b.yaml", text(*service_docs()))
    store.remove_origin("a.yaml")
    assert store.models() == []
    assert store.rejected() == []
    assert store.service("default", "svc") is not None


def test_another_origins_objects_never_change():
    store = ObjectStore()
    load(store, "b.yaml", text(*service_docs(), model_doc()))
    held = (store.get(MODEL), store.get(SERVICE), store.endpoint_slices("default", "svc"))
    load(store, "a.yaml", text(model_doc(name="other", service="x")))
    load(store, "a.yaml", "{{{")
    load(store, "a.yaml", text(model_doc(name="other", percentage=500)))
    load(store, "a.yaml", text())
    store.remove_origin("a.yaml")
    assert (store.get(MODEL), store.get(SERVICE), store.endpoint_slices("default", "svc")) == held


def test_an_object_moved_to_another_origin_survives_its_removal_from_the_first():
    """Moving a document from a.yaml to b.yaml: a.yaml's edit must not delete b.yaml's object."""
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc()))
    load(store, "b.yaml", text(model_doc(percentage=60)))
    load(store, "a.yaml", text())
    assert store.get(MODEL) is not None, "b.yaml still defines default/m"
    assert store.get(MODEL).offloading.behavior.percentage == 60


async def test_wait_changed_wakes_on_a_change():
    store = ObjectStore()
    waiter = asyncio.create_task(store.wait_changed())
    await asyncio.sleep(0)
    assert not waiter.done()
    load(store, "a.yaml", text(model_doc()))
    await asyncio.wait_for(waiter, 1)


# --- DirectorySource ---


def watched(store: ObjectStore) -> Instruments:
    instruments = Instruments()
    instruments.watch_origins(store.rejected_by_origin)
    return instruments


def invalid_gauge(instruments: Instruments, path: Path) -> float | None:
    return instruments.registry.get_sample_value("overspill_invalid_objects", {"origin": str(path)})


def test_directory_sync_picks_up_added_changed_and_deleted_files(tmp_path):
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    assert source.sync() is False
    models = tmp_path / "models.yaml"
    models.write_text(text(model_doc(percentage=50)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "svc.yml").write_text(text(*service_docs()))
    assert source.sync() is True
    assert store.get(MODEL).offloading.behavior.percentage == 50
    assert store.service("default", "svc") is not None
    assert source.sync() is False  # nothing changed

    models.write_text(text(model_doc(percentage=75)))
    assert source.sync() is True
    assert store.get(MODEL).offloading.behavior.percentage == 75

    models.unlink()
    assert source.sync() is True
    assert store.get(MODEL) is None
    assert store.service("default", "svc") is not None


def test_directory_sees_a_same_size_edit_by_its_mtime(tmp_path):
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    path = tmp_path / "m.yaml"
    path.write_text(text(model_doc(percentage=50)))
    source.sync()
    stat = path.stat()
    path.write_text(text(model_doc(percentage=60)))  # same length
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert source.sync() is True
    assert store.get(MODEL).offloading.behavior.percentage == 60


def test_directory_records_rejected_documents_and_the_invalid_objects_gauge(tmp_path):
    store = ObjectStore()
    instruments = watched(store)
    source = DirectorySource(tmp_path, store)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        text(model_doc(name="x", percentage=150), model_doc(name="y", remote="https://h"), model_doc())
    )
    good = tmp_path / "good.yaml"
    good.write_text(text(*service_docs()))
    source.sync()
    assert invalid_gauge(instruments, bad) == 2
    assert invalid_gauge(instruments, good) == 0
    errors = [e for r in store.rejected() for e in r.errors]
    assert (
        "default/x: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150" in errors
    )
    assert any(e.startswith("default/y: spec.offloadingConfig.remoteBackend.host:") for e in errors)
    assert store.get(MODEL) is not None  # the valid document beside them is loaded

    bad.write_text(text(model_doc()))
    source.sync()
    assert invalid_gauge(instruments, bad) == 0
    assert store.rejected() == []

    bad.write_text("kind: [")
    source.sync()
    assert invalid_gauge(instruments, bad) == 1
    assert store.get(MODEL) is not None  # kept from the last good version

    bad.unlink()
    source.sync()
    assert invalid_gauge(instruments, bad) is None
    assert store.get(MODEL) is None


def test_directory_ignores_hidden_and_foreign_files(tmp_path):
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    (tmp_path / ".hidden.yaml").write_text(text(model_doc(name="a")))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text(text(model_doc(name="b")))
    (tmp_path / "notes.txt").write_text(text(model_doc(name="c")))
    (tmp_path / "m.json").write_text(text(model_doc(name="d")))  # YAML is a superset of JSON; either parses
    source.sync()
    assert [m.meta.name for m in store.models()] == ["d"]


def test_moving_a_model_between_files_keeps_it(tmp_path):
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    (tmp_path / "b.yaml").write_text(text(model_doc()))
    source.sync()
    assert store.get(MODEL) is not None
    # Cut from b.yaml, paste into a.yaml, both seen in the same poll.
    (tmp_path / "a.yaml").write_text(text(model_doc()))
    (tmp_path / "b.yaml").write_text(text(*service_docs()))
    source.sync()
    assert store.get(MODEL) is not None, "default/m is defined in a.yaml"


def test_directory_run_refuses_a_missing_directory(tmp_path):
    source = DirectorySource(tmp_path / "nope", ObjectStore())
    with pytest.raises(SystemExit, match="not a directory"):
        asyncio.run(asyncio.wait_for(source.run(), 1))


async def test_the_watcher_sees_edits_removals_and_configmap_swaps(tmp_path):
    """Edits are loaded as they happen, with no poll; a Kubernetes ConfigMap volume (files that
    are links into a `..data` directory swapped as a whole) is followed too."""
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    source.sync()
    task = asyncio.create_task(source.run())

    async def until(check) -> None:
        for _ in range(100):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the watcher did not load the change within 5 s")

    def percentage() -> float | None:
        model = store.get(MODEL)
        return model.offloading.behavior.percentage if model else None

    try:
        await asyncio.sleep(0.2)  # the watch is set up
        (tmp_path / "m.yaml").write_text(text(model_doc(percentage=10)))
        await until(lambda: percentage() == 10)
        (tmp_path / "m.yaml").write_text(text(model_doc(percentage=20)))
        await until(lambda: percentage() == 20)
        (tmp_path / "m.yaml").unlink()
        await until(lambda: percentage() is None)

        mounted = tmp_path / "configmap"
        (mounted / "..v1").mkdir(parents=True)
        (mounted / "..v1" / "m.yaml").write_text(text(model_doc(percentage=30)))
        (mounted / "..data").symlink_to("..v1")
        (mounted / "m.yaml").symlink_to("..data/m.yaml")
        await until(lambda: percentage() == 30)
        (mounted / "..v2").mkdir()
        (mounted / "..v2" / "m.yaml").write_text(text(model_doc(percentage=40)))
        (mounted / "..data_tmp").symlink_to("..v2")
        (mounted / "..data_tmp").rename(mounted / "..data")  # what the kubelet does
        await until(lambda: percentage() == 40)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- Controller ---


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeInformer:
    """Readings by metric name; a missing name is a metric without data."""

    def __init__(self, **values: float | None) -> None:
        self.values = values
        self.reads: list[str] = []

    async def read(self, spec, scope=None) -> Reading:
        self.reads.append(spec.name)
        value = self.values.get(spec.name)
        if value is None:
            return Reading(None, f"query {spec.name!r} returned no series", spec.name)
        return Reading(value, None, spec.name)

    async def read_many(self, requests) -> list[Reading]:
        return await read_each(self, requests)


@pytest.fixture
async def remote_port():
    """A listening TCP port on 127.0.0.1 for the remote probe to reach."""

    async def accept(reader, writer):
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def make_controller(store: ObjectStore, informer=None) -> tuple[Controller, ResourceCache, Clock]:
    clock = Clock()
    translator = Translator("127.0.0.1", 10000)
    controller = Controller(store, translator.apply, informer=informer, clock=clock)
    instruments = Instruments()  # what /metrics shows, read from the controller's status
    instruments.watch_controller(lambda: controller.status.values(), lambda: controller.evaluations)
    controller.instruments = instruments  # a handle for the tests below
    return controller, translator.cache, clock


def routes_by_name(controller: Controller) -> dict[str, object]:
    return {r.name: r for r in controller.routes}


async def test_controller_offloads_when_the_reading_is_over_target(remote_port):
    store = ObjectStore()
    remote = f"127.0.0.1:{remote_port}"
    load(store, "a.yaml", text(model_doc(percentage=40, remote=remote, buffer=30), *service_docs()))
    informer = FakeInformer(queue_depth=3)
    controller, cache, clock = make_controller(store, informer)

    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent) == ("Standby", 0.0)
    assert routes_by_name(controller)["m"].remote_percent == 0.0

    informer.values["queue_depth"] = 12
    clock.now += 5
    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent) == ("Offloading", 40.0)
    route = routes_by_name(controller)["m"]
    assert route.remote_percent == 40.0
    assert route.endpoints == (("10.0.0.1", 8000), ("10.0.0.2", 8000))
    assert route.remote.port == remote_port
    assert "svc.default.svc.cluster.local:80" in route.domains
    assert status.remote_usable
    assert [(m.current, m.over) for m in status.metrics] == [(12, True)]
    gauge = controller.instruments.registry.get_sample_value(
        "overspill_model_remote_weight_percent", {"namespace": "default", "name": "m"}
    )
    assert gauge == 40.0

    informer.values["queue_depth"] = 2
    clock.now += 5
    await asyncio.wait_for(controller.evaluate(), 5)
    assert (controller.status[MODEL].phase, controller.status[MODEL].remote_percent) == ("Releasing", 40.0)
    clock.now += 30
    await asyncio.wait_for(controller.evaluate(), 5)
    assert (controller.status[MODEL].phase, controller.status[MODEL].remote_percent) == ("Standby", 0.0)
    assert routes_by_name(controller)["m"].remote_percent == 0.0


@pytest.mark.parametrize(
    "action,phase,share",
    [("local", "Standby", 0.0), ("offload", "Offloading", 40.0), ("hold", "Standby", 0.0)],
)
async def test_a_stale_metric_moves_the_model_to_the_chosen_state_and_back(
    remote_port, caplog, action, phase, share
):
    """A source answering nothing for metricStaleAfterSeconds: the model goes to onStaleMetric's
    state, status names the metric, one log line says so, the stale gauge is 1; readings
    returning undo all of it."""
    caplog.set_level(logging.INFO, "overspill")
    store = ObjectStore()
    behavior = {"metricStaleAfterSeconds": 20, "onStaleMetric": action}
    doc = model_doc(percentage=40, remote=f"127.0.0.1:{remote_port}", buffer=10, behavior=behavior)
    load(store, "a.yaml", text(doc, *service_docs()))
    informer = FakeInformer(queue_depth=3)
    controller, _, clock = make_controller(store, informer)
    stale_gauge = {"namespace": "default", "name": "m", "metric": "External/queue_depth"}

    def gauge() -> float | None:
        return controller.instruments.registry.get_sample_value("overspill_model_metric_stale", stale_gauge)

    await asyncio.wait_for(controller.evaluate(), 5)
    assert controller.status[MODEL].phase == "Standby"
    del informer.values["queue_depth"]  # the source goes away
    for _ in range(3):  # 15 s without a reading: not stale yet
        clock.now += 5
        await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.phase, status.stale_metrics, gauge()) == ("Standby", [], 0)
    clock.now += 5
    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent) == (phase, share)
    assert status.stale_metrics == ["External/queue_depth"]
    assert status.to_dict()["staleMetrics"] == ["External/queue_depth"]
    assert (
        "stale: External/queue_depth" in status.reason
        or "metric stale: External/queue_depth" in status.reason
    )
    assert routes_by_name(controller)["m"].remote_percent == share
    assert gauge() == 1
    written = desired_status(store.get(MODEL), status, controller.machines[MODEL], controller.to_wall)
    (metrics_condition,) = [c for c in written["conditions"] if c["type"] == "MetricsAvailable"]
    assert metrics_condition["reason"] == "MetricStale"
    assert "External/queue_depth" in metrics_condition["message"]
    for _ in range(3):  # staying stale logs nothing more
        clock.now += 5
        await asyncio.wait_for(controller.evaluate(), 5)
    stale_lines = [r.getMessage() for r in caplog.records if "event=metric_stale" in r.getMessage()]
    assert stale_lines == [
        "event=metric_stale metric=External/queue_depth count=1 names='default/m' age=20s stale_after=20s "
        f"action={action}"
    ]

    informer.values["queue_depth"] = 3  # readings return, under target
    clock.now += 5
    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.stale_metrics, gauge()) == ([], 0)
    fresh = [r.getMessage() for r in caplog.records if "event=metric_fresh" in r.getMessage()]
    assert fresh == ["event=metric_fresh metric=External/queue_depth count=1 names='default/m'"]
    # back under the ordinary rules: after `offload`, the buffer runs before the share goes
    assert (status.phase, status.remote_percent) == (
        ("Releasing", 40.0) if action == "offload" else ("Standby", 0.0)
    )
    clock.now += 10
    await asyncio.wait_for(controller.evaluate(), 5)
    assert (controller.status[MODEL].phase, controller.status[MODEL].remote_percent) == ("Standby", 0.0)


async def test_steady_readings_over_minutes_count_every_failure_and_go_stale_on_time(remote_port, caplog):
    """400 s of evaluations that read the same as before (most of them take the shortcut for
    unchanged readings): a failing metric counts every failed read, goes stale exactly at
    metricStaleAfterSeconds and logs its error again after METRIC_ERROR_REPEAT; a metric read
    steadily never goes stale."""
    caplog.set_level(logging.INFO, "overspill")
    store = ObjectStore()
    behavior = {"metricStaleAfterSeconds": 20, "onStaleMetric": "hold"}
    remote = f"127.0.0.1:{remote_port}"
    docs = [
        model_doc(name="failing", service="s1", remote=remote, behavior=behavior, metric="gone"),
        *service_docs("s1"),
        model_doc(name="steady", service="s2", remote=remote, behavior=behavior),
        *service_docs("s2"),
    ]
    load(store, "a.yaml", text(*docs))
    controller, _, clock = make_controller(store, FakeInformer(queue_depth=3))
    failing = ObjectKey("ModelDeployment", "default", "failing")
    steady = ObjectKey("ModelDeployment", "default", "steady")
    started, stale_at = clock.now, None
    for i in range(1, 81):
        await asyncio.wait_for(controller.evaluate(), 5)
        assert controller.status[failing].metric_read_errors["External/gone"] == i
        if stale_at is None and controller.status[failing].stale_metrics:
            stale_at = clock.now - started
        assert controller.status[steady].stale_metrics == []
        assert sum(controller.status[steady].metric_read_errors.values()) == 0
        clock.now += 5
    assert stale_at == 20
    assert controller.status[failing].stale_metrics == ["External/gone"]
    controller.reconcile([steady])  # decided anew, it still finds its metric read just now
    assert controller.status[steady].stale_metrics == []
    unavailable = [r.getMessage() for r in caplog.records if "event=metric_unavailable" in r.getMessage()]
    assert len(unavailable) == 2 and all("names='default/failing'" in line for line in unavailable)
    counted = controller.instruments.registry.get_sample_value(
        "overspill_metric_read_errors_total",
        {"namespace": "default", "name": "failing", "metric": "External/gone"},
    )
    assert counted == 80


async def test_decisions_moved_by_readings_alone_route_to_the_endpoints_of_the_last_change(remote_port):
    """Readings moving every evaluation decide a model again without resolving its Service
    anew; an endpoint change between two evaluations is still what the next decisions route
    to, and an outage (no ready endpoint) is still seen."""
    store = ObjectStore()
    remote = f"127.0.0.1:{remote_port}"
    model = model_doc(percentage=40, remote=remote, buffer=0)
    load(store, "m.yaml", text(model, *service_docs(ready=(True, True))))
    informer = FakeInformer(queue_depth=3)
    controller, _, clock = make_controller(store, informer)
    await asyncio.wait_for(controller.evaluate(), 5)
    assert routes_by_name(controller)["m"].endpoints == (("10.0.0.1", 8000), ("10.0.0.2", 8000))
    for depth, ready in ((12, (True, False)), (2, (False, True)), (14, (False, False)), (3, (True, True))):
        load(store, "m.yaml", text(model, *service_docs(ready=ready)))
        for value in (depth, depth + 1):  # the readings move; the second evaluation is by readings alone
            informer.values["queue_depth"] = value
            clock.now += 5
            await asyncio.wait_for(controller.evaluate(), 5)
            route = routes_by_name(controller)["m"]
            wanted = tuple((f"10.0.0.{i + 1}", 8000) for i, r in enumerate(ready) if r)
            assert route.endpoints == wanted
            status = controller.status[MODEL]
            assert status.ready_endpoints == len(wanted)
            if not wanted:
                assert (status.phase, route.remote_percent) == ("Outage", 100.0)
            else:
                assert route.remote_percent == (40.0 if value > 10 else 0.0)


async def test_controller_average_value_divides_by_the_workloads_pods(remote_port):
    store = ObjectStore()
    doc = model_doc(remote=f"127.0.0.1:{remote_port}", target_type="AverageValue", threshold=10, source="w")
    load(store, "a.yaml", text(doc, *service_docs(), deployment_doc("w", ready=4)))
    controller, _, _ = make_controller(store, FakeInformer(queue_depth=30))
    await asyncio.wait_for(controller.evaluate(), 5)
    (metric,) = controller.status[MODEL].metrics
    assert (metric.current, metric.over) == (7.5, False)
    assert controller.status[MODEL].phase == "Standby"

    load(store, "b.yaml", text(deployment_doc("w", ready=2)))
    await asyncio.wait_for(controller.evaluate(), 5)
    (metric,) = controller.status[MODEL].metrics
    assert (metric.current, metric.over) == (15, True)
    assert controller.status[MODEL].phase == "Offloading"


async def test_controller_metric_without_reading_is_on_status_and_changes_nothing(remote_port):
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(remote=f"127.0.0.1:{remote_port}"), *service_docs()))
    controller, _, _ = make_controller(store, FakeInformer())
    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent) == ("Standby", 0.0)
    (metric,) = status.metrics
    assert metric.over is None
    assert "returned no series" in metric.error
    errors = controller.instruments.registry.get_sample_value(
        "overspill_metric_read_errors_total",
        {"namespace": "default", "name": "m", "metric": "External/queue_depth"},
    )
    assert errors == 1


def test_two_models_on_one_service_the_second_is_refused():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(name="first"), model_doc(name="second"), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    first = controller.status[ObjectKey("ModelDeployment", "default", "first")]
    second = controller.status[ObjectKey("ModelDeployment", "default", "second")]
    assert first.errors == []
    assert first.phase != "Invalid"
    assert second.phase == "Invalid"
    (error,) = second.errors
    assert error.startswith("default/second: spec.serviceRef: ")
    assert "default/first" in error
    assert list(routes_by_name(controller)) == ["first"]
    assert (
        controller.instruments.registry.get_sample_value(
            "overspill_model_config_errors", {"namespace": "default", "name": "second"}
        )
        == 1
    )


def test_a_model_whose_service_is_missing_gets_an_error_and_others_keep_routing():
    store = ObjectStore()
    load(
        store,
        "a.yaml",
        text(model_doc(name="ok"), model_doc(name="lost", service="nowhere"), *service_docs()),
    )
    controller, cache, _ = make_controller(store)
    controller.reconcile()
    lost = controller.status[ObjectKey("ModelDeployment", "default", "lost")]
    assert lost.phase == "Invalid"
    assert lost.errors == ["default/lost: spec.serviceRef: Service default/nowhere not found"]
    assert list(routes_by_name(controller)) == ["ok"]
    assert "overspill/default/ok/local" in cache.view(Scope()).resources[CLUSTER]


def test_a_service_without_the_named_port_is_an_error():
    store = ObjectStore()
    doc = model_doc()
    doc["spec"]["serviceRef"]["targetPort"] = 9999
    load(store, "a.yaml", text(doc, *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    (error,) = controller.status[MODEL].errors
    assert error == "default/m: spec.serviceRef.targetPort: Service default/svc has no port 9999"
    assert controller.routes == []


def test_no_ready_endpoints_is_an_outage():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(percentage=30), *service_docs(ready=(False, False))))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent, status.ready_endpoints) == ("Outage", 100.0, 0)
    route = routes_by_name(controller)["m"]
    assert (route.remote_percent, route.endpoints) == (100.0, ())

    # An endpoint turning ready ends the outage on the next reconcile, without waiting for metrics.
    load(store, "a.yaml", text(model_doc(percentage=30), *service_docs(ready=(False, True))))
    controller.reconcile()
    assert controller.status[MODEL].phase == "Standby"
    assert routes_by_name(controller)["m"].endpoints == (("10.0.0.2", 8000),)


def test_no_remote_means_no_offloading_even_in_an_outage():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(remote=None), *service_docs(ready=(False,))))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    assert controller.status[MODEL].remote_percent == 0.0
    route = routes_by_name(controller)["m"]
    assert (route.remote, route.remote_percent) == (None, 0.0)


def test_without_offloading_config_the_model_is_routed_all_local():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(offloading=False), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    assert controller.status[MODEL].phase == "Standby"
    route = routes_by_name(controller)["m"]
    assert (route.remote, route.remote_percent) == (None, 0.0)


def test_a_rejected_edit_keeps_the_model_routing_and_shows_the_error():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(percentage=50), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    load(store, "a.yaml", text(model_doc(percentage=150), *service_docs()))
    controller.reconcile()
    assert "m" in routes_by_name(controller)
    (error,) = controller.status[MODEL].errors
    assert "spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150" in error


def test_a_removed_model_is_forgotten():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    labels = {"namespace": "default", "name": "m"}
    assert controller.instruments.registry.get_sample_value("overspill_model_ready_endpoints", labels) == 2
    load(store, "a.yaml", text(*service_docs()))
    controller.reconcile()
    assert controller.status == {}
    assert controller.routes == []
    assert MODEL not in controller.machines
    assert controller.instruments.registry.get_sample_value("overspill_model_ready_endpoints", labels) is None


async def test_a_remote_that_refuses_connections_gets_no_traffic():
    """Neither the steady share nor spill-over: a shed request would only wait for a
    connection that fails."""
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()

    store = ObjectStore()
    spill = {"spillover": {"enabled": True}}
    load(store, "a.yaml", text(model_doc(remote=f"127.0.0.1:{port}", behavior=spill), *service_docs()))
    controller, _, _ = make_controller(store, FakeInformer(queue_depth=50))
    controller.reconcile()
    assert routes_by_name(controller)["m"].spillover == Spillover(enabled=True)
    assert controller.status[MODEL].to_dict()["spillover"] is True
    for _ in range(controller.probe.failures_to_down):
        await asyncio.wait_for(controller.evaluate(), 5)
        await asyncio.wait_for(controller.probe_remotes(), 5)
    status = controller.status[MODEL]
    assert not status.remote_usable
    assert (status.phase, status.remote_percent) == (Phase.REMOTE_DOWN.value, 0.0)
    assert routes_by_name(controller)["m"].remote_percent == 0.0
    assert routes_by_name(controller)["m"].spillover is None
    assert status.to_dict()["spillover"] is False


def test_status_document_shape():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    doc = controller.status[MODEL].to_dict()
    assert doc["phase"] == "Standby"
    assert doc["remote"] == "http://standby.example.com"
    assert doc["readyEndpoints"] == 2
    assert doc["errors"] == []


def test_same_service_name_in_two_namespaces_both_route():
    """`llm` in team-a and `llm` in team-b are different Services: neither model may be refused.

    Only the bare short names (`llm`, `llm:80`) are ambiguous; the namespaced names are not, and no
    domain may be served by two virtual hosts (Envoy rejects the whole route configuration).
    """
    store = ObjectStore()
    load(
        store,
        "a.yaml",
        text(
            model_doc(name="llm", service="llm", namespace="team-a"),
            *service_docs("llm", "team-a"),
            model_doc(name="llm", service="llm", namespace="team-b"),
            *service_docs("llm", "team-b"),
        ),
    )
    controller, _, _ = make_controller(store)
    controller.reconcile()
    for ns in ("team-a", "team-b"):
        status = controller.status[ObjectKey("ModelDeployment", ns, "llm")]
        assert status.errors == [], status.errors
    routes = {r.namespace: r for r in controller.routes}
    assert set(routes) == {"team-a", "team-b"}
    assert "llm.team-a.svc.cluster.local" in routes["team-a"].domains
    assert "llm.team-b.svc.cluster.local:80" in routes["team-b"].domains
    assert not set(routes["team-a"].domains) & set(routes["team-b"].domains)


def test_a_bare_name_moves_to_the_next_model_when_its_holder_goes():
    """`llm` in team-a keeps the bare name `llm`; once team-a's model is deleted, team-b's takes
    it, though nothing of team-b's changed."""
    store = ObjectStore()
    load(
        store,
        "a.yaml",
        text(model_doc(name="llm", service="llm", namespace="team-a"), *service_docs("llm", "team-a")),
    )
    load(
        store,
        "b.yaml",
        text(model_doc(name="llm", service="llm", namespace="team-b"), *service_docs("llm", "team-b")),
    )
    controller, _, _ = make_controller(store)
    controller.reconcile()
    team_b = ObjectKey("ModelDeployment", "team-b", "llm")
    assert "llm" not in {r.namespace: r for r in controller.routes}["team-b"].domains
    assert controller.status[team_b].warnings
    store.remove_origin("a.yaml")
    controller.reconcile()
    (route,) = controller.routes
    assert route.namespace == "team-b" and "llm" in route.domains and "llm:80" in route.domains
    assert controller.status[team_b].warnings == []


async def test_a_busy_event_loop_does_not_mark_a_live_remote_down(remote_port):
    """The loop blocked past the probe's timeout (10,000 models loading) proves nothing about
    the remote, which had accepted meanwhile: it must not count as a failure."""
    probe = RemoteProbe(timeout=0.2, failures_to_down=1)
    remote = RemoteBackend("127.0.0.1", remote_port, "http")

    async def block() -> None:
        await asyncio.sleep(0)  # let the connect start first
        time.sleep(0.5)  # noqa: ASYNC251 - the stall under test

    changed, _ = await asyncio.gather(probe.check_all([remote]), block())
    assert changed == set() and probe.usable(remote)
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    dead = RemoteBackend("127.0.0.1", port, "http")
    assert await probe.check_all([dead]) == {("127.0.0.1", port)}  # a refusal still counts
    assert not probe.usable(dead)


async def test_a_metric_source_that_hangs_does_not_hold_up_other_changes(remote_port):
    """While the metric source takes its time, a change in the store is still acted on at once."""

    class Hanging(FakeInformer):
        async def read_many(self, requests):
            await asyncio.sleep(30)
            return []

    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(remote=f"127.0.0.1:{remote_port}"), *service_docs()))
    controller, _, _ = make_controller(store, Hanging())
    controller.reconcile()
    task = asyncio.create_task(controller.run())
    try:
        await asyncio.sleep(0.1)  # the evaluation is waiting on the source
        load(
            store,
            "a.yaml",
            text(model_doc(remote=f"127.0.0.1:{remote_port}"), *service_docs(ready=(False, False))),
        )
        for _ in range(50):
            if controller.status[MODEL].phase == Phase.OUTAGE:
                break
            await asyncio.sleep(0.01)
        assert controller.status[MODEL].phase == Phase.OUTAGE
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_change_decides_only_the_models_it_touches():
    """One EndpointSlice of 200 models changes: one model is decided and one route published."""
    store = ObjectStore()
    for i in range(200):
        load(store, f"m{i}.yaml", text(model_doc(name=f"m{i}", service=f"s{i}"), *service_docs(f"s{i}")))
    controller, _, _ = make_controller(store)
    published: list[dict] = []
    decided: list[list] = []
    apply = controller.publish
    controller.publish = lambda changes: (published.append(changes), apply(changes))
    controller.on_reconciled = lambda items, removed: decided.append([m.key.name for m, _, _ in items])
    controller.reconcile()
    assert len(decided[-1]) == 200 and len(published[-1]) == 200
    load(store, "m7.yaml", text(model_doc(name="m7", service="s7"), *service_docs("s7", ready=(True, False))))
    controller.reconcile()
    assert decided[-1] == ["m7"]
    assert list(published[-1]) == [("default", "m7")]
    assert published[-1][("default", "m7")].endpoints == (("10.0.0.1", 8000),)
    controller.reconcile()  # nothing changed: nothing decided
    assert len(decided) == 2


def test_an_invalid_model_shows_the_invalid_phase_and_a_deleted_model_leaves_no_series():
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(), *service_docs()))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    registry = controller.instruments.registry

    def phase(p: str) -> float | None:
        return registry.get_sample_value(
            "overspill_model_offload_state", {"namespace": "default", "name": "m", "phase": p}
        )

    assert (phase("Standby"), phase("Invalid")) == (1, 0)
    load(store, "a.yaml", text(model_doc(service="nowhere"), *service_docs()))
    controller.reconcile()
    assert (phase("Standby"), phase("Invalid")) == (0, 1)
    labels = {"namespace": "default", "name": "m"}
    assert registry.get_sample_value("overspill_model_config_errors", labels) == 1
    assert registry.get_sample_value("overspill_model_transitions_total", {**labels, "phase": "Invalid"}) == 1

    load(store, "a.yaml", text(*service_docs()))
    controller.reconcile()
    families = {m.name for m in registry.collect() for s in m.samples if s.labels.get("name") == "m"}
    assert families == set()  # gauges and counters alike


async def test_an_unavailable_metric_is_logged_once_until_it_changes_or_returns(remote_port, caplog):
    store = ObjectStore()
    load(store, "a.yaml", text(model_doc(remote=f"127.0.0.1:{remote_port}"), *service_docs()))
    informer = FakeInformer()
    controller, _, clock = make_controller(store, informer)
    with caplog.at_level("INFO", logger="overspill.reconciler"):
        for _ in range(5):
            await asyncio.wait_for(controller.evaluate(), 5)
            clock.now += 1
        informer.values["queue_depth"] = 1
        await asyncio.wait_for(controller.evaluate(), 5)
    events = [r.getMessage().split()[0] for r in caplog.records if "metric_" in r.getMessage()]
    assert events == ["event=metric_unavailable", "event=metric_available"]
    errors = controller.instruments.registry.get_sample_value(
        "overspill_metric_read_errors_total",
        {"namespace": "default", "name": "m", "metric": "External/queue_depth"},
    )
    assert errors == 5  # every failed read still counted


ROOT = Path(__file__).resolve().parent.parent
ODD_YAML = """\
a: &x {b: 1, c: [1, 0x1F, 1_000, 2.5, .inf, true, no, null, ~, 2026-01-01, "quoted", 'single']}
d: *x
e:
  <<: *x
  f: plain
g: {1: one, 2.5: two, null: three}
h: |
  literal
  block
---
- [nested, [deeper, {k: v}]]
- !!str 123
---
"""


@pytest.mark.parametrize(
    "body",
    [ODD_YAML, *(p.read_text() for p in sorted((ROOT / "manifests").rglob("*.yaml")))],
    ids=["odd", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "manifests").rglob("*.yaml")))],
)
def test_yaml_is_read_exactly_as_safe_load_reads_it(body):
    assert load_all(body) == list(yaml.safe_load_all(body))


def test_a_large_directory_is_parsed_across_cores_into_what_one_core_reads(tmp_path):
    """Past PARALLEL_MIN_FILES a forked parser reads a share of the files: each file must still
    give its own objects and its own errors, in the same order, as read one by one."""
    n = PARALLEL_MIN_FILES + 44
    for i in range(n):
        if i % 50 == 7:
            body = "kind: ModelDeployment\nmetadata: {name: [unclosed\n"  # broken YAML
        elif i % 50 == 19:
            body = text(model_doc(name=f"m{i}", percentage=150))  # invalid: percentage over 100
        else:
            body = text(model_doc(name=f"m{i}", service=f"s{i}"), *service_docs(f"s{i}"))
        (tmp_path / f"f{i:04d}.yaml").write_text(body)
    paths = [str(p) for p in sorted(tmp_path.iterdir())]
    one_by_one = [parse_file(p, LIMITS) for p in paths]
    assert parse_files(paths, LIMITS) == one_by_one
    store = ObjectStore()
    DirectorySource(tmp_path, store).sync()
    assert len(store.models()) == n - 2 * len(range(7, n, 50))  # every valid model, once
    assert sum(bool(rejected) for _, rejected in one_by_one) == 2 * len(range(7, n, 50))


async def test_a_source_gone_for_many_models_is_one_stale_line_and_one_fresh_line(remote_port, caplog):
    """300 models reading one source: when it goes away they all go stale in one evaluation,
    which is one log line with a count, not 300; likewise when it returns."""
    caplog.set_level(logging.INFO, "overspill")
    store = ObjectStore()
    behavior = {"metricStaleAfterSeconds": 20, "onStaleMetric": "hold"}
    remote = f"127.0.0.1:{remote_port}"
    docs = [
        d
        for i in range(300)
        for d in (
            model_doc(name=f"m{i}", service=f"s{i}", remote=remote, behavior=behavior),
            *service_docs(f"s{i}"),
        )
    ]
    load(store, "all.yaml", text(*docs))
    informer = FakeInformer(queue_depth=3)
    controller, _, clock = make_controller(store, informer)
    await asyncio.wait_for(controller.evaluate(), 5)
    del informer.values["queue_depth"]
    for _ in range(6):
        clock.now += 5
        await asyncio.wait_for(controller.evaluate(), 5)
    assert all(s.stale_metrics == ["External/queue_depth"] for s in controller.status.values())
    informer.values["queue_depth"] = 3
    clock.now += 5
    await asyncio.wait_for(controller.evaluate(), 5)
    assert all(s.stale_metrics == [] for s in controller.status.values())
    lines = [r.getMessage() for r in caplog.records if "event=metric_stale" in r.getMessage()]
    assert len(lines) == 1 and "count=300 names='default/m0, default/m1," in lines[0], lines
    assert "and_more=295" in lines[0]
    fresh = [r.getMessage() for r in caplog.records if "event=metric_fresh" in r.getMessage()]
    assert len(fresh) == 1 and "count=300" in fresh[0], fresh
