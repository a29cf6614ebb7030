"""The Kubernetes API server double (overspill/testing/kubeapi.py), checked with the clients that will use it:
the official `kubernetes` Python client and a real kubectl. One test per behaviour the double
promises; under CI=true a missing kubectl fails instead of skipping."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
import yaml
from kubernetes.client import ApiClient, ApiException

from overspill.testing.kubeapi import FakeApiServer, find_kubectl

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wd"],
            "categories": ["gadgets"],
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Color", "type": "string", "jsonPath": ".spec.look.color", "priority": 1},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                    {"name": "Started", "type": "date", "jsonPath": ".status.startedAt"},
                ],
            }
        ],
    },
}
GROUP, VERSION, PLURAL = "example.com", "v1alpha1", "widgets"


def widget(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec or {"size": 1},
    }


def service(name: str, namespace: str = "default", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(crds=[WIDGET_CRD], bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def kube(api: FakeApiServer) -> Iterator[ApiClient]:
    """The official client configured from the kubeconfig the double writes."""
    client = kubernetes.config.new_client_from_config(config_file=str(api.kubeconfig_path))
    yield client
    client.close()


@pytest.fixture
def kubectl() -> None:
    """kubectl is required: missing, it fails under CI and skips elsewhere."""
    if find_kubectl() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is required under CI (set $KUBECTL or put it on PATH)")
        pytest.skip("kubectl not found")


def raw(
    kube: ApiClient,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: Any = None,
    content_type: str | None = None,
    accept: str = "application/json",
) -> tuple[int, Any]:
    """One request through the client's REST layer, for what the typed API does not expose."""
    headers = {"Accept": accept, **({"Content-Type": content_type} if content_type else {})}
    method_, url, headers_, body_, post_ = kube.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    response = kube.call_api(method_, url, headers_, body_, post_, _request_timeout=10)
    data = response.read()
    return response.status, json.loads(data) if data else None


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


async def in_thread(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn), timeout)


def collect(func: Callable[..., Any], count: int, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The first `count` events of a kubernetes.watch stream (which the server ends by timeoutSeconds)."""
    events: list[dict[str, Any]] = []
    watcher = kubernetes.watch.Watch()
    for event in watcher.stream(func, *args, **kwargs):
        events.append(event)
        if len(events) >= count:
            watcher.stop()
            break
    return events


# --- 1. discovery ---------------------------------------------------------------------------------


async def test_discovery_documents(api: FakeApiServer, kube: ApiClient, kubectl: None) -> None:
    version = kubernetes.client.VersionApi(kube).get_code()
    assert (version.major, version.minor) == ("1", "32")
    assert raw(kube, "GET", "/api")[1]["versions"] == ["v1"]

    core = kubernetes.client.CoreV1Api(kube).get_api_resources()
    by_name = {r.name: r for r in core.resources}
    assert {"namespaces", "services", "pods", "events", "configmaps", "secrets"} <= set(by_name)
    assert by_name["services"].short_names == ["svc"] and by_name["services"].namespaced
    assert not by_name["namespaces"].namespaced and "watch" in by_name["pods"].verbs

    groups = {g.name: g for g in kubernetes.client.ApisApi(kube).get_api_versions().groups}
    for name in (
        "apps",
        "discovery.k8s.io",
        "coordination.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
        GROUP,
        "metrics.k8s.io",
        "custom.metrics.k8s.io",
        "external.metrics.k8s.io",
    ):
        assert name in groups, name
    assert groups[GROUP].preferred_version.group_version == f"{GROUP}/{VERSION}"

    code, resources = raw(kube, "GET", f"/apis/{GROUP}/{VERSION}")
    assert code == 200 and resources["kind"] == "APIResourceList"
    entries = {r["name"]: r for r in resources["resources"]}
    assert entries["widgets"] == {
        "name": "widgets",
        "singularName": "widget",
        "namespaced": True,
        "kind": "Widget",
        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        "shortNames": ["wd"],
        "categories": ["gadgets"],
    }
    assert entries["widgets/status"]["verbs"] == ["get", "patch", "update"]
    apps = {r["name"] for r in raw(kube, "GET", "/apis/apps/v1")[1]["resources"]}
    assert {"deployments", "deployments/status", "statefulsets", "statefulsets/status"} <= apps

    # Aggregated discovery alone is refused (406), so clients fall back to these plain lists.
    aggregated = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    assert raw(kube, "GET", "/apis", accept=aggregated)[0] == 406
    assert raw(kube, "GET", "/apis", accept=aggregated + ",application/json")[0] == 200

    _, out, err = await api.kubectl("api-resources")
    assert "widgets" in out and "wd" in out and "endpointslices" in out and "leases" in out
    assert "error" not in err.lower()


async def test_kubectl_apply_creates_then_updates(api: FakeApiServer, kubectl: None, tmp_path: Path) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "model", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "model"}},
            "template": {
                "metadata": {"labels": {"app": "model"}},
                "spec": {
                    "containers": [
                        {"name": "server", "image": "model:1", "ports": [{"containerPort": 8000}]},
                        {"name": "sidecar", "image": "proxy:1"},
                    ]
                },
            },
        },
    }
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"a": "1"}}
    manifest = tmp_path / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all([config, deployment, widget("w1", size=3)]))
    _, out, _ = await api.kubectl("apply", "-f", str(manifest))
    assert out.split("\n")[:3] == [
        "configmap/settings created",
        "deployment.apps/model created",
        "widget.example.com/w1 created",
    ]

    deployment["spec"]["replicas"] = 3
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "model:2"
    del deployment["spec"]["template"]["spec"]["containers"][1]
    manifest.write_text(yaml.safe_dump_all([config, deployment, widget("w1", size=5)]))
    _, out, _ = await api.kubectl("apply", "-f", str(manifest))
    assert out.split("\n")[:3] == [
        "configmap/settings unchanged",
        "deployment.apps/model configured",
        "widget.example.com/w1 configured",
    ]

    live = api.get("deployments.apps", "model")
    assert live is not None and live["spec"]["replicas"] == 3 and live["metadata"]["generation"] == 2
    containers = live["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [("server", "model:2")]
    assert containers[0]["ports"] == [{"containerPort": 8000}]
    cr = api.get("widgets", "w1")
    assert cr is not None and cr["spec"] == {"size": 5} and cr["metadata"]["generation"] == 2
    _, out, _ = await api.kubectl("apply", "-f", str(manifest))
    assert "deployment.apps/model unchanged" in out and "widget.example.com/w1 unchanged" in out


# --- 2. object metadata, create, errors -----------------------------------------------------------


async def test_create_get_and_error_statuses(api: FakeApiServer, kube: ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    before = api.resource_version
    data, code, _ = core.create_namespaced_service_with_http_info("default", service("web"))
    assert code == 201
    created = data.metadata
    assert created.uid and created.creation_timestamp and created.generation == 1
    assert int(created.resource_version) == before + 1
    assert core.read_namespaced_service("web", "default").spec.cluster_ip

    with pytest.raises(ApiException) as exc:
        core.create_namespaced_service("default", service("web"))
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as exc:
        core.read_namespaced_service("missing", "default")
    assert exc.value.status == 404
    assert status_of(exc.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'services "missing" not found',
        "reason": "NotFound",
        "details": {"name": "missing", "kind": "services"},
        "code": 404,
    }
    custom = kubernetes.client.CustomObjectsApi(kube)
    with pytest.raises(ApiException) as exc:
        custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "nope")
    assert status_of(exc.value)["details"] == {"name": "nope", "group": GROUP, "kind": PLURAL}
    with pytest.raises(ApiException) as exc:  # a namespace that does not exist, as on a real server
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "c"}})
    assert exc.value.status == 404 and 'namespaces "nowhere" not found' in status_of(exc.value)["message"]


async def test_bearer_token_when_asked() -> None:
    async with FakeApiServer(token="s3cret") as secured:
        client = kubernetes.config.new_client_from_config(config_file=str(secured.kubeconfig_path))
        assert kubernetes.client.CoreV1Api(client).read_namespace("default").status.phase == "Active"
        client.configuration.api_key = {}
        with pytest.raises(ApiException) as exc:
            kubernetes.client.CoreV1Api(client).read_namespace("default")
        assert exc.value.status == 401
        client.close()


async def test_generation_and_resource_version(api: FakeApiServer, kube: ApiClient) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("w", size=1))
    rvs = [int(created["metadata"]["resourceVersion"])]
    assert created["metadata"]["generation"] == 1

    def patch(body: dict[str, Any], *, status: bool = False) -> dict[str, Any]:
        fn = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
        obj = fn(GROUP, VERSION, "default", PLURAL, "w", body)
        rvs.append(int(obj["metadata"]["resourceVersion"]))
        return obj

    assert patch({"metadata": {"labels": {"a": "b"}}})["metadata"]["generation"] == 1
    assert patch({"spec": {"size": 2}})["metadata"]["generation"] == 2
    assert patch({"status": {"phase": "Running"}}, status=True)["metadata"]["generation"] == 2
    assert rvs == sorted(rvs) and len(set(rvs)) == len(rvs)
    # A write that changes nothing commits nothing: same resourceVersion, no event.
    same = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "w", {"spec": {"size": 2}}
    )
    assert int(same["metadata"]["resourceVersion"]) == rvs[-1] == api.resource_version


# --- 3. lists and selectors -------------------------------------------------------------------------


async def test_list_selectors_and_paging(api: FakeApiServer, kube: ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    api.create(service("a", "default", {"tier": "web", "env": "prod"}))
    api.create(service("b", "default", {"tier": "db"}))
    api.create(service("c", "team", {"tier": "web", "canary": "yes"}))
    api.create(service("d", "team", {}))

    everywhere = core.list_service_for_all_namespaces()
    assert [s.metadata.name for s in everywhere.items] == ["a", "b", "c", "d"]
    assert int(everywhere.metadata.resource_version) == api.resource_version
    assert [s.metadata.name for s in core.list_namespaced_service("team").items] == ["c", "d"]

    def names(**kwargs: str) -> list[str]:
        return [s.metadata.name for s in core.list_service_for_all_namespaces(**kwargs).items]

    assert names(label_selector="tier=web") == ["a", "c"]
    assert names(label_selector="tier==web,env=prod") == ["a"]
    assert names(label_selector="tier!=web") == ["b", "d"]
    assert names(label_selector="tier in (db, web)") == ["a", "b", "c"]
    assert names(label_selector="tier notin (web)") == ["b", "d"]
    assert names(label_selector="canary") == ["c"]
    assert names(label_selector="!tier") == ["d"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace=team,metadata.name!=c") == ["d"]
    with pytest.raises(ApiException) as exc:
        names(label_selector="tier in (web")
    assert exc.value.status == 400

    first = core.list_service_for_all_namespaces(limit=3)
    assert len(first.items) == 3 and first.metadata._continue
    rest = core.list_service_for_all_namespaces(limit=3, _continue=first.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["d"] and not rest.metadata._continue


# --- 4. watch ---------------------------------------------------------------------------------------


async def test_watch_replays_then_streams_changes(api: FakeApiServer, kube: ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    start = core.list_namespaced_config_map("default").metadata.resource_version
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": {"w": "1"}}})
    api.patch("configmaps", "x", {"data": {"k": "v"}})

    def watch() -> list[dict[str, Any]]:
        return collect(
            core.list_namespaced_config_map,
            4,
            "default",
            resource_version=start,
            label_selector="w=1",
            timeout_seconds=5,
        )

    pending = asyncio.ensure_future(in_thread(watch))
    await api.wait_for_watches("configmaps")
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated"}})
    api.delete("configmaps", "x")
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "y", "labels": {"w": "1"}}})
    events = await pending
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "x"),
        ("MODIFIED", "x"),
        ("DELETED", "x"),
        ("ADDED", "y"),
    ]
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(start)

    # Without a resourceVersion a watch starts with the current state as ADDED events.
    current = await in_thread(
        lambda: collect(core.list_namespaced_config_map, 2, "default", timeout_seconds=5)
    )
    assert sorted(e["object"].metadata.name for e in current) == ["unrelated", "y"]
    assert {e["type"] for e in current} == {"ADDED"}


async def test_watch_bookmarks(api: FakeApiServer, kube: ApiClient) -> None:
    custom = kubernetes.client.CoreV1Api(kube)
    api.create(service("s"))
    rv = str(api.resource_version)

    def watch(count: int) -> list[dict[str, Any]]:
        return collect(
            custom.list_namespaced_service,
            count,
            "default",
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        )

    began = time.monotonic()
    events = await in_thread(lambda: watch(2))  # the fixture's bookmark interval is 0.2 s
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"] and time.monotonic() - began < 2
    assert events[0]["raw_object"] == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
    }

    async with FakeApiServer(bookmark_interval=3600) as quiet:  # on demand only
        client = kubernetes.config.new_client_from_config(config_file=str(quiet.kubeconfig_path))
        quiet_core = kubernetes.client.CoreV1Api(client)
        pending = asyncio.ensure_future(
            in_thread(
                lambda: collect(
                    quiet_core.list_namespaced_pod,
                    1,
                    "default",
                    allow_watch_bookmarks=True,
                    timeout_seconds=5,
                )
            )
        )
        await quiet.wait_for_watches("pods")
        quiet.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bump"}})
        assert quiet.bookmark("pods") == 1
        (event,) = await pending
        assert event["type"] == "BOOKMARK"
        assert event["raw_object"]["metadata"]["resourceVersion"] == str(quiet.resource_version)
        client.close()


async def test_watch_expiry_timeout_and_drop(api: FakeApiServer, kube: ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    api.create(service("s1"))
    old = str(api.resource_version)
    api.create(service("s2"))
    assert api.compact() == api.resource_version

    # The raw stream: one ERROR event with a 410 Status, then the end.
    method, url, headers, body, post = kube.param_serialize(
        method="GET",
        resource_path="/api/v1/namespaces/default/services",
        query_params=[("watch", "true"), ("resourceVersion", old)],
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = kube.call_api(method, url, headers, body, post, _request_timeout=5)
    lines = [json.loads(line) for line in response.read().decode().splitlines() if line]
    assert response.status == 200 and len(lines) == 1 and lines[0]["type"] == "ERROR"
    assert lines[0]["object"]["code"] == 410 and lines[0]["object"]["reason"] == "Expired"
    with pytest.raises(ApiException) as exc:  # the Python client's Watch turns it into an exception
        await in_thread(
            lambda: collect(
                core.list_namespaced_service, 1, "default", resource_version=old, timeout_seconds=2
            )
        )
    assert exc.value.status == 410
    # From the compaction point on, watching works again.
    fresh = str(api.resource_version)
    pending = asyncio.ensure_future(
        in_thread(
            lambda: collect(
                core.list_namespaced_service, 1, "default", resource_version=fresh, timeout_seconds=5
            )
        )
    )
    await api.wait_for_watches("services")
    api.create(service("s3"))
    assert (await pending)[0]["object"].metadata.name == "s3"

    # A bounded history: the oldest changes fall out and a watch from before them expires.
    async with FakeApiServer(history=3) as small:
        first = small.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c0"}})
        for i in range(1, 5):
            small.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}})
        client = kubernetes.config.new_client_from_config(config_file=str(small.kubeconfig_path))
        small_core = kubernetes.client.CoreV1Api(client)
        since = first["metadata"]["resourceVersion"]
        with pytest.raises(ApiException) as exc:
            collect(
                small_core.list_namespaced_config_map, 1, "default", resource_version=since, timeout_seconds=2
            )
        assert exc.value.status == 410
        recent = str(small.resource_version - 2)
        replay = collect(
            small_core.list_namespaced_config_map, 2, "default", resource_version=recent, timeout_seconds=2
        )
        assert [e["object"].metadata.name for e in replay] == ["c3", "c4"]
        client.close()

    # timeoutSeconds ends an idle stream; drop_watches ends open ones at once.
    began = time.monotonic()
    assert (
        await in_thread(
            lambda: collect(core.list_namespaced_pod, 1, "default", resource_version=fresh, timeout_seconds=1)
        )
        == []
    )
    assert 0.8 < time.monotonic() - began < 3
    pending = asyncio.ensure_future(
        in_thread(lambda: collect(core.list_namespaced_pod, 1, "default", timeout_seconds=30))
    )
    await api.wait_for_watches("pods")
    began = time.monotonic()
    assert api.drop_watches() == 1
    assert await pending == [] and time.monotonic() - began < 2
    assert api.watch_count() == 0
    # abrupt=True cuts the connection mid-stream (the chunked body never ends).
    pending = asyncio.ensure_future(
        in_thread(lambda: collect(core.list_namespaced_pod, 1, "default", timeout_seconds=30))
    )
    await api.wait_for_watches("pods")
    assert api.drop_watches("pods", abrupt=True) == 1
    with pytest.raises(urllib3.exceptions.ProtocolError):
        await pending


# --- 5. updates and patches -------------------------------------------------------------------------


async def test_update_conflicts_patches_and_delete(api: FakeApiServer, kube: ApiClient) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    apps = kubernetes.client.AppsV1Api(kube)
    api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}}
    )
    stale = raw(kube, "GET", "/api/v1/namespaces/default/configmaps/cfg")[1]
    fresh = core.replace_namespaced_config_map("cfg", "default", {**stale, "data": {"a": "10"}})
    assert fresh.data == {"a": "10"}
    with pytest.raises(ApiException) as exc:
        core.replace_namespaced_config_map("cfg", "default", {**stale, "data": {"a": "stale"}})
    assert exc.value.status == 409 and status_of(exc.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(exc.value)["message"]

    code, merged = raw(
        kube,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/cfg",
        body={"data": {"a": None, "c": "3"}},
        content_type="application/merge-patch+json",
    )
    assert code == 200 and merged["data"] == {"c": "3"}
    patched = core.patch_namespaced_config_map(
        "cfg",
        "default",
        [
            {"op": "add", "path": "/data/d", "value": "4"},
            {"op": "replace", "path": "/data/c", "value": "30"},
            {"op": "test", "path": "/data/d", "value": "4"},
        ],
    )
    assert patched.data == {"c": "30", "d": "4"}
    with pytest.raises(ApiException) as exc:
        core.patch_namespaced_config_map("cfg", "default", [{"op": "test", "path": "/data/d", "value": "5"}])
    assert exc.value.status == 422
    with pytest.raises(
        ApiException
    ) as exc:  # a merge patch carrying a stale resourceVersion is a precondition
        core.patch_namespaced_config_map(
            "cfg", "default", {"metadata": {"resourceVersion": "1"}, "data": {"e": "5"}}
        )
    assert exc.value.status == 409

    api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "selector": {"matchLabels": {"app": "d"}},
                "template": {
                    "metadata": {"labels": {"app": "d"}},
                    "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
                },
            },
        }
    )
    # A dict body is a strategic merge patch for built-ins: containers merge by name.
    dep = apps.patch_namespaced_deployment(
        "d", "default", {"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}}}
    )
    assert [(c.name, c.image) for c in dep.spec.template.spec.containers] == [("a", "a:1"), ("b", "b:2")]
    dep = apps.patch_namespaced_deployment(
        "d", "default", {"spec": {"template": {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}}}
    )
    assert [c.name for c in dep.spec.template.spec.containers] == ["b"] and dep.metadata.generation == 3

    rv = str(api.resource_version)
    code, deleted = raw(kube, "DELETE", "/api/v1/namespaces/default/configmaps/cfg")
    assert code == 200 and (deleted["kind"], deleted["metadata"]["name"]) == ("ConfigMap", "cfg")
    events = await in_thread(
        lambda: collect(core.list_namespaced_config_map, 1, "default", resource_version=rv, timeout_seconds=2)
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "cfg")]
    assert int(events[0]["object"].metadata.resource_version) == api.resource_version

    # Finalizers hold deletion: deletionTimestamp first, the object goes when the last is removed.
    api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "held", "finalizers": ["x/y"]}})
    core.delete_namespaced_config_map("held", "default")
    held = core.read_namespaced_config_map("held", "default")
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", "default", {"metadata": {"finalizers": None}})
    assert api.get("configmaps", "held") is None


# --- 6. status subresource ----------------------------------------------------------------------------


async def test_status_subresource(api: FakeApiServer, kube: ApiClient) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, {**widget("w", size=1), "status": {"phase": "Forged"}}
    )
    assert "status" not in created  # a create ignores status when it is a subresource

    written = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "w", {"spec": {"size": 9}, "status": {"phase": "Running"}}
    )
    assert written["status"] == {"phase": "Running"} and written["spec"] == {"size": 1}
    replaced = custom.replace_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "w", {**written, "spec": {"size": 8}, "status": {"phase": "Done"}}
    )
    assert replaced["status"] == {"phase": "Done"} and replaced["spec"] == {"size": 1}
    assert replaced["metadata"]["generation"] == 1

    main = custom.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "w", {"spec": {"size": 2}, "status": {"phase": "Hijacked"}}
    )
    assert (
        main["status"] == {"phase": "Done"}
        and main["spec"] == {"size": 2}
        and main["metadata"]["generation"] == 2
    )
    main = custom.replace_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "w", {**main, "status": {}}
    )
    assert main["status"] == {"phase": "Done"}

    # Deployments have it too.
    apps = kubernetes.client.AppsV1Api(kube)
    api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"spec": {"containers": []}}},
        }
    )
    dep = apps.patch_namespaced_deployment_status(
        "d", "default", {"status": {"readyReplicas": 1}, "spec": {"replicas": 7}}
    )
    assert dep.status.ready_replicas == 1 and dep.spec.replicas == 1 and dep.metadata.generation == 1
    dep = apps.patch_namespaced_deployment("d", "default", {"status": {"readyReplicas": 5}})
    assert dep.status.ready_replicas == 1

    # Injected conflicts on the next status writes of one object only.
    api.conflict_status_writes("widgets", "w", times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", PLURAL, "w", {"status": {"phase": "X"}}
            )
        assert exc.value.status == 409 and status_of(exc.value)["reason"] == "Conflict"
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "w", {"metadata": {"labels": {"ok": "1"}}}
        )
    ok = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "w", {"status": {"phase": "X"}}
    )
    assert ok["status"]["phase"] == "X"


# --- 7. tables and kubectl printing --------------------------------------------------------------------


async def test_tables_for_kubectl(api: FakeApiServer, kube: ApiClient, kubectl: None) -> None:
    started = (datetime.now(UTC) - timedelta(hours=50)).strftime("%Y-%m-%dT%H:%M:%SZ")
    api.create(
        {
            **widget("w1", size=3, look={"color": "red"}),
            "metadata": {"name": "w1", "namespace": "default", "labels": {"tier": "gold"}},
            "status": {
                "phase": "Running",
                "startedAt": started,
                "conditions": [{"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}],
            },
        }
    )
    api.create(widget("w2", size=1))
    table_accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    code, table = raw(
        kube, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}", accept=table_accept
    )
    assert code == 200 and (table["kind"], table["apiVersion"]) == ("Table", "meta.k8s.io/v1")
    assert [(c["name"], c["type"], c["priority"]) for c in table["columnDefinitions"]] == [
        ("Name", "string", 0),
        ("Phase", "string", 0),
        ("Size", "integer", 0),
        ("Color", "string", 1),
        ("Ready", "string", 0),
        ("Started", "date", 0),
        ("Age", "string", 0),
    ]
    assert table["rows"][0]["cells"][:6] == ["w1", "Running", 3, "red", "True", "2d2h"]
    assert table["rows"][1]["cells"][:6] == ["w2", None, 1, None, None, None]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"

    _, out, _ = await api.kubectl("get", "wd")
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "PHASE", "SIZE", "READY", "STARTED", "AGE"]
    assert first.split()[:5] == ["w1", "Running", "3", "True", "2d2h"]
    assert second.split()[:2] == ["w2", "1"]  # empty cells print blank
    _, out, _ = await api.kubectl("get", "widget", "-o", "wide")
    assert out.splitlines()[0].split() == ["NAME", "PHASE", "SIZE", "COLOR", "READY", "STARTED", "AGE"]
    assert "red" in out.splitlines()[1].split()
    _, out, _ = await api.kubectl("get", "widgets.example.com", "w1", "-o", "yaml")
    obj = yaml.safe_load(out)
    assert (
        obj["kind"] == "Widget" and obj["status"]["phase"] == "Running" and obj["metadata"]["generation"] == 1
    )
    _, out, _ = await api.kubectl("describe", "wd", "w1")
    assert "Name:         w1" in out and "tier=gold" in out and "Phase:" in out and "Events:" in out
    _, out, _ = await api.kubectl("get", "gadgets")  # the CRD's category
    assert "w1" in out and "w2" in out

    api.create(service("web"))
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c"}]},
        }
    )
    _, out, _ = await api.kubectl("get", "svc,pods", "-o", "wide")
    assert "CLUSTER-IP" in out and "80/TCP" in out and "SELECTOR" in out and "app=web" in out
    assert "READY" in out and "0/1" in out and "Pending" in out
    _, out, _ = await api.kubectl("get", "ns")
    assert "default" in out and "Active" in out
    _, out, _ = await api.kubectl("describe", "svc", "web")
    assert "10.96." in out and "80/TCP" in out


# --- 8. metrics APIs ---------------------------------------------------------------------------------


async def test_metrics_apis(api: FakeApiServer, kube: ApiClient, kubectl: None) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube)
    for name, app in (("web-1", "web"), ("web-2", "web"), ("db-1", "db")):
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"containers": [{"name": "main"}]},
            }
        )
    api.set_pod_metrics("default", "web-1", {"main": {"cpu": "250m", "memory": "64Mi"}})
    api.set_pod_metrics("default", "web-2", {"main": {"cpu": 0.5, "memory": 2**20}})
    api.set_pod_metrics("default", "db-1", {"main": {"cpu": 1, "memory": "1Gi"}})

    pods = custom.list_namespaced_custom_object(
        "metrics.k8s.io", "v1beta1", "default", "pods", label_selector="app=web"
    )
    assert pods["kind"] == "PodMetricsList"
    assert [(p["metadata"]["name"], p["containers"][0]["usage"]) for p in pods["items"]] == [
        ("web-1", {"cpu": "250m", "memory": "64Mi"}),
        ("web-2", {"cpu": "500m", "memory": "1048576"}),
    ]
    one = custom.get_namespaced_custom_object("metrics.k8s.io", "v1beta1", "default", "pods", "db-1")
    assert one["kind"] == "PodMetrics" and one["window"] == "30s" and one["timestamp"]
    _, out, _ = await api.kubectl("top", "pod", "-n", "default")
    assert "web-1" in out and "250m" in out and "64Mi" in out and "1000m" in out

    api.set_custom_metric("pods", "web-1", "queue_depth", 7)
    api.set_custom_metric("pods", "web-2", "queue_depth", 2.5)
    api.set_custom_metric("pods", "db-1", "queue_depth", 100)
    api.set_custom_metric("services", "web", "requests_per_second", "12", labels={"app": "web"})
    base = "/apis/custom.metrics.k8s.io/v1beta2"
    code, values = raw(
        kube, "GET", f"{base}/namespaces/default/pods/*/queue_depth", query={"labelSelector": "app=web"}
    )
    assert code == 200 and values["kind"] == "MetricValueList"
    assert [(v["describedObject"]["name"], v["value"], v["metric"]["name"]) for v in values["items"]] == [
        ("web-1", "7", "queue_depth"),
        ("web-2", "2500m", "queue_depth"),
    ]
    assert values["items"][0]["describedObject"] == {
        "kind": "Pod",
        "name": "web-1",
        "apiVersion": "v1",
        "namespace": "default",
    }
    code, single = raw(kube, "GET", f"{base}/namespaces/default/services/web/requests_per_second")
    assert code == 200 and single["items"][0]["value"] == "12"
    assert raw(kube, "GET", f"{base}/namespaces/default/services/web/nothing")[0] == 404
    listed = {r["name"] for r in raw(kube, "GET", base)[1]["resources"]}
    assert {"pods/queue_depth", "services/requests_per_second"} <= listed

    api.set_external_metric("default", "queue_messages", 42, labels={"queue": "a"})
    api.set_external_metric("default", "queue_messages", 5, labels={"queue": "b"})
    _, out, _ = await api.kubectl(
        "get",
        "--raw",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_messages?labelSelector=queue%3Da",
    )
    external = json.loads(out)
    assert external["kind"] == "ExternalMetricValueList"
    assert [(i["metricName"], i["metricLabels"], i["value"]) for i in external["items"]] == [
        ("queue_messages", {"queue": "a"}, "42")
    ]
    code, both = raw(kube, "GET", "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/queue_messages")
    assert code == 200 and len(both["items"]) == 2
    assert raw(kube, "GET", "/apis/external.metrics.k8s.io/v1beta1/namespaces/other/queue_messages")[0] == 404


# --- 9. leases -----------------------------------------------------------------------------------------


async def test_lease_optimistic_concurrency(api: FakeApiServer, kube: ApiClient, kubectl: None) -> None:
    coordination = kubernetes.client.CoordinationV1Api(kube)
    lease = coordination.create_namespaced_lease(
        "kube-system",
        {
            "metadata": {"name": "overspill-leader"},
            "spec": {
                "holderIdentity": "a",
                "leaseDurationSeconds": 15,
                "renewTime": "2026-01-01T00:00:00.000000Z",
            },
        },
    )
    seen = coordination.read_namespaced_lease("overspill-leader", "kube-system")
    assert (
        seen.spec.holder_identity == "a" and seen.metadata.resource_version == lease.metadata.resource_version
    )

    seen.spec.holder_identity = "b"
    renewed = coordination.replace_namespaced_lease("overspill-leader", "kube-system", seen)
    assert int(renewed.metadata.resource_version) > int(seen.metadata.resource_version)
    seen.spec.holder_identity = "c"  # still carries the old resourceVersion: someone else won
    with pytest.raises(ApiException) as exc:
        coordination.replace_namespaced_lease("overspill-leader", "kube-system", seen)
    assert exc.value.status == 409
    assert coordination.read_namespaced_lease("overspill-leader", "kube-system").spec.holder_identity == "b"
    _, out, _ = await api.kubectl("get", "leases", "-n", "kube-system")
    assert out.splitlines()[0].split() == ["NAME", "HOLDER", "AGE"] and "overspill-leader   b" in out


# --- 10. fault injection ---------------------------------------------------------------------------------


async def test_fault_injection(api: FakeApiServer, kube: ApiClient, kubectl: None) -> None:
    core = kubernetes.client.CoreV1Api(kube)
    api.create(service("s"))
    api.fail("services", verbs=("list",), code=503, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            core.list_namespaced_service("default")
        assert exc.value.status == 503 and status_of(exc.value)["reason"] == "ServiceUnavailable"
    assert [s.metadata.name for s in core.list_namespaced_service("default").items] == ["s"]

    api.fail("svc", verbs=("watch",), code=500, times=1)
    with pytest.raises(ApiException) as exc:
        collect(core.list_namespaced_service, 1, "default", timeout_seconds=2)
    assert exc.value.status == 500
    assert len(collect(core.list_namespaced_service, 1, "default", timeout_seconds=2)) == 1

    api.fail("services", verbs=("list",), code=500, times=1)
    code, _, err = await api.kubectl("get", "services", check=False)
    assert code != 0 and "InternalError" in err
    _, out, _ = await api.kubectl("get", "services")
    assert "s " in out

    api.slow("configmaps", 0.4, times=1)
    began = time.monotonic()
    core.list_namespaced_config_map("default")
    assert time.monotonic() - began >= 0.4
    began = time.monotonic()
    core.list_namespaced_config_map("default")
    assert time.monotonic() - began < 0.4

    api.fail("pods", verbs=("list", "watch"), code=503, times=None)
    for _ in range(3):
        with pytest.raises(ApiException):
            core.list_namespaced_pod("default")
    api.clear_faults()
    core.list_namespaced_pod("default")
    lists = [c for c in api.calls if c.verb == "list" and c.resource == "pods"]
    assert [c.code for c in lists] == [503, 503, 503, 200]


# --- CRDs added and removed at run time; the standalone command -------------------------------------------


async def test_crd_applied_later_and_deleted(
    api: FakeApiServer, kube: ApiClient, kubectl: None, tmp_path: Path
) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gizmos.tools.example.org"},
        "spec": {
            "group": "tools.example.org",
            "scope": "Cluster",
            "names": {"plural": "gizmos", "singular": "gizmo", "kind": "Gizmo", "shortNames": ["gz"]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                },
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": False,
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                },
            ],
        },
    }
    (tmp_path / "crd.yaml").write_text(yaml.safe_dump(crd))
    _, out, _ = await api.kubectl("apply", "-f", str(tmp_path / "crd.yaml"))
    assert "customresourcedefinition.apiextensions.k8s.io/gizmos.tools.example.org created" in out
    stored = api.get("crd", "gizmos.tools.example.org", namespace=None)
    assert stored is not None
    assert {c["type"] for c in stored["status"]["conditions"]} == {"NamesAccepted", "Established"}
    _, out, _ = await api.kubectl(
        "wait", "--for=condition=Established", "crd/gizmos.tools.example.org", "--timeout=5s"
    )

    gizmo = {
        "apiVersion": "tools.example.org/v1",
        "kind": "Gizmo",
        "metadata": {"name": "g1"},
        "spec": {"x": 1},
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(gizmo))
    _, out, _ = await api.kubectl("apply", "-f", str(tmp_path / "g.yaml"))
    assert "gizmo.tools.example.org/g1 created" in out
    _, out, _ = await api.kubectl("get", "gz")
    assert out.splitlines()[0].split() == ["NAME", "AGE"] and out.splitlines()[1].startswith("g1")
    custom = kubernetes.client.CustomObjectsApi(kube)
    older = custom.get_cluster_custom_object("tools.example.org", "v1beta1", "gizmos", "g1")
    assert older["apiVersion"] == "tools.example.org/v1beta1" and older["spec"] == {"x": 1}
    group = raw(kube, "GET", "/apis/tools.example.org")[1]
    assert group["preferredVersion"]["version"] == "v1" and len(group["versions"]) == 2

    pending = asyncio.ensure_future(
        in_thread(
            lambda: collect(
                custom.list_cluster_custom_object, 5, "tools.example.org", "v1", "gizmos", timeout_seconds=10
            )
        )
    )
    await api.wait_for_watches("gizmos")
    _, out, _ = await api.kubectl("delete", "crd", "gizmos.tools.example.org")
    assert "deleted" in out
    events = await pending  # the stream ends with the resource
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]
    assert raw(kube, "GET", "/apis/tools.example.org/v1/gizmos")[0] == 404
    with pytest.raises(ApiException) as exc:
        custom.create_cluster_custom_object(
            "apiextensions.k8s.io", "v1", "customresourcedefinitions", {**crd, "metadata": {"name": "wrong"}}
        )
    assert exc.value.status == 422


async def test_standalone_command(tmp_path: Path, kubectl: None) -> None:
    kubeconfig = tmp_path / "kc"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "overspill.testing.kubeapi",
        "--port",
        "0",
        "--kubeconfig",
        str(kubeconfig),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert "serving on http://127.0.0.1:" in line and kubeconfig.exists()
        binary = find_kubectl()
        assert binary is not None
        kubectl_proc = await asyncio.create_subprocess_exec(
            binary,
            f"--kubeconfig={kubeconfig}",
            f"--cache-dir={tmp_path / 'cache'}",
            "get",
            "namespaces",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(kubectl_proc.communicate(), 30)
        assert kubectl_proc.returncode == 0 and "kube-system" in out.decode()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def test_sync_use_from_a_thread() -> None:
    """`with` works too, and helpers are safe from any thread (the server has its own loop)."""
    with FakeApiServer() as api:
        results: list[int] = []

        def writer(i: int) -> None:
            api.create(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}", "namespace": "t"}}
            )
            results.append(i)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results) == list(range(8))
        assert len(api.list("cm", "t")) == 8 and api.get("ns", "t", namespace=None) is not None
