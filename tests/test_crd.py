"""ModelDeployment and Policy parsing: the seed examples as written, field-path errors, the validate CLI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from seeds import (
    SEED_001_MODEL,
    SEED_001_MODEL_WITH_POLICIES,
    SEED_001_POLICY,
    SEED_002_EXTERNAL_HPA,
    SEED_002_EXTERNAL_NESTED,
    SEED_002_METRICS_SERVER,
    SEED_002_OVERVIEW,
    model_with,
)

from api.crd import (
    InvalidObject,
    ModelDeployment,
    Policy,
    Spillover,
    parse_model_deployment,
    parse_policy,
    parse_remote_backend,
)
from api.metric_spec import MetricSpec
from overspill.cli import main
from reconciler.documents import parse_documents
from reconciler.kube import parse_endpoint_slice, parse_service

EXAMPLES = Path(__file__).resolve().parent.parent / "manifests" / "examples"


def parse_text(text: str) -> ModelDeployment:
    return parse_model_deployment(yaml.safe_load(text))


def errors_of(doc: dict | str) -> list[str]:
    """The error lines an invalid ModelDeployment produces, as `InvalidObject` words them."""
    raw = yaml.safe_load(doc) if isinstance(doc, str) else doc
    with pytest.raises(InvalidObject) as info:
        parse_model_deployment(raw)
    return [f"{info.value.key}: {e}" for e in info.value.errors]


def minimal(**spec_extra) -> dict:
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "my-model"},
        "spec": {"serviceRef": {"name": "my-model", "targetPort": 8080}},
    }
    doc["spec"].update(spec_extra)
    return doc


def offloading(**config) -> dict:
    base = {
        "behavior": {"percentage": 50},
        "metrics": [
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 90}},
            }
        ],
    }
    base.update(config)
    return minimal(offloadingConfig=base)


# --- the seeds' examples work as written ---


def test_seed_001_model_deployment_parses_with_every_documented_field():
    md = parse_text(SEED_001_MODEL)
    assert md.meta.name == "my-model"
    assert md.meta.namespace == "default"
    assert md.model == "my-model-on-Beamlit"
    assert md.environment == "production"
    assert (md.source.kind, md.source.name, md.source.namespace, md.source.api_version) == (
        "Deployment",
        "my-model",
        "default",
        "apps/v1",
    )
    assert (md.service.name, md.service.namespace, md.service.target_port) == ("my-model", "default", 8080)
    assert md.offloading is not None
    assert md.offloading.behavior.percentage == 50
    (metric,) = md.offloading.metrics
    assert (metric.type, metric.name, metric.target.type, metric.target.threshold) == (
        "Resource",
        "cpu",
        "Utilization",
        90,
    )
    assert md.offloading.remote is None


def test_seed_001_policy_parses():
    policy = parse_policy(yaml.safe_load(SEED_001_POLICY))
    assert policy.meta.name == "my-policy"
    assert policy.type == "location"
    assert [(r.type, r.name) for r in policy.locations] == [("country", "us"), ("continent", "na")]


def test_seed_001_model_deployment_with_policies_parses():
    md = parse_text(SEED_001_MODEL_WITH_POLICIES)
    assert [(p.refType, p.name) for p in md.policies] == [
        ("localPolicy", "my-policy"),
        ("remotePolicy", "my-policy-on-beamlit"),
    ]
    assert md.offloading.behavior.percentage == 50


def test_seed_001_examples_as_one_multi_document_file():
    text = "---\n".join([SEED_001_MODEL, SEED_001_POLICY])
    objects, rejected = parse_documents(text, "seed-001.yaml")
    assert rejected == []
    assert [type(o) for o in objects] == [ModelDeployment, Policy]


def test_seed_002_overview_example():
    md = parse_model_deployment(model_with(SEED_002_OVERVIEW))
    (metric,) = md.offloading.metrics
    assert (metric.type, metric.name, metric.target.type, metric.target.threshold) == (
        "Resource",
        "cpu",
        "Utilization",
        50,
    )


@pytest.mark.parametrize("fragment", [SEED_002_EXTERNAL_HPA, SEED_002_EXTERNAL_NESTED], ids=["hpa", "nested"])
def test_seed_002_external_example_in_both_shapes(fragment):
    md = parse_model_deployment(model_with(fragment))
    (metric,) = md.offloading.metrics
    assert metric == MetricSpec(
        type="External",
        name="my_custom_metric_in_prom",
        target=metric.target,
        selector={"my_label": "value"},
    )
    assert (metric.target.type, metric.target.threshold) == ("Value", 10)
    assert not metric.is_promql_expression


def test_seed_002_metrics_server_example():
    metrics = yaml.safe_load(textwrap.dedent(SEED_002_METRICS_SERVER))["metrics"]
    doc = yaml.safe_load(SEED_001_MODEL)
    doc["spec"]["offloadingConfig"]["metrics"] = metrics
    (metric,) = parse_model_deployment(doc).offloading.metrics
    assert (metric.type, metric.name, metric.target.type, metric.target.threshold) == (
        "Resource",
        "cpu",
        "Utilization",
        50,
    )


def test_promql_expression_as_external_metric_name():
    doc = model_with(SEED_002_EXTERNAL_HPA)
    ext = doc["spec"]["offloadingConfig"]["metrics"][0]["external"]
    ext["metric"] = {"name": 'sum(rate(http_requests_total{job="llm"}[1m]))'}
    (metric,) = parse_model_deployment(doc).offloading.metrics
    assert metric.is_promql_expression
    assert metric.selector == {}


def test_other_hpa_metric_types_parse():
    doc = offloading(
        metrics=[
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": "inflight_requests"},
                    "target": {"type": "AverageValue", "averageValue": "500m"},
                },
            },
            {
                "type": "Object",
                "object": {
                    "metric": {"name": "queue_depth"},
                    "describedObject": {"kind": "Service", "name": "my-model", "apiVersion": "v1"},
                    "target": {"type": "Value", "value": 100},
                },
            },
            {
                "type": "ContainerResource",
                "containerResource": {
                    "name": "memory",
                    "container": "server",
                    "target": {"type": "AverageValue", "averageValue": "2Gi"},
                },
            },
        ]
    )
    pods, obj, container = parse_model_deployment(doc).offloading.metrics
    assert (pods.type, pods.target.type, pods.target.threshold) == ("Pods", "AverageValue", 0.5)
    assert obj.described_object is not None
    assert (obj.described_object.kind, obj.described_object.name) == ("Service", "my-model")
    assert (container.container, container.target.threshold) == ("server", 2 * 2**30)


# --- defaults ---


def test_defaults():
    doc = minimal(offloadingConfig={"behavior": {"percentage": 25}, "metrics": []})
    del doc["spec"]["serviceRef"]["targetPort"]
    md = parse_model_deployment(doc)
    assert md.meta.namespace == "default"
    assert md.service.namespace == "default"
    assert md.service.target_port is None
    assert md.environment == "production"
    assert md.model == "my-model"
    assert md.offloading.behavior.activation_delay_seconds == 0
    assert md.offloading.behavior.buffer_duration_seconds == 30
    assert md.offloading.behavior.percentage == 25


def test_refs_default_to_the_objects_own_namespace():
    doc = minimal(modelSourceRef={"name": "w"})
    doc["metadata"]["namespace"] = "inference"
    md = parse_model_deployment(doc)
    assert md.service.namespace == "inference"
    assert (md.source.kind, md.source.namespace) == ("Deployment", "inference")


def test_without_offloading_config_the_model_is_still_valid():
    md = parse_model_deployment(minimal())
    assert md.offloading is None


def test_quantities_are_accepted_for_numbers():
    doc = offloading(
        behavior={"percentage": "50", "activationDelaySeconds": "500m", "bufferDurationSeconds": "1k"}
    )
    doc["spec"]["offloadingConfig"]["metrics"] = [
        {
            "type": "External",
            "external": {
                "metric": {"name": "gpu_load"},
                "target": {"type": "AverageValue", "averageValue": "500m"},
            },
        }
    ]
    md = parse_model_deployment(doc)
    behavior = md.offloading.behavior
    assert (behavior.percentage, behavior.activation_delay_seconds, behavior.buffer_duration_seconds) == (
        50,
        0.5,
        1000,
    )
    assert md.offloading.metrics[0].target.threshold == pytest.approx(0.5)


# --- errors name the object and the field path ---


def test_percentage_out_of_range_names_object_and_field():
    assert errors_of(offloading(behavior={"percentage": 150})) == [
        "default/my-model: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150"
    ]


def test_invalid_object_message_is_the_same_line():
    with pytest.raises(InvalidObject) as info:
        parse_model_deployment(offloading(behavior={"percentage": 150}))
    assert str(info.value) == (
        "default/my-model: spec.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150"
    )


def test_several_errors_are_reported_at_once():
    doc = offloading(
        behavior={"percentage": 150, "bufferDurationSeconds": -5},
        remoteBackend={"host": "https://standby.example.com", "scheme": "ftp"},
    )
    doc["metadata"]["namespace"] = "inference"
    doc["spec"]["environment"] = "staging"
    doc["spec"]["offloadingConfig"]["metrics"][0]["type"] = "Custom"
    errors = errors_of(doc)
    p = "inference/my-model: spec"
    assert errors == [
        f"{p}.environment: must be production or development, got 'staging'",
        f"{p}.offloadingConfig.behavior.percentage: must be between 0 and 100, got 150",
        f"{p}.offloadingConfig.behavior.bufferDurationSeconds: must be 0 or more, got -5",
        f"{p}.offloadingConfig.metrics[0].type: must be one of Resource, ContainerResource, Pods, Object, "
        "External, got 'Custom'",
        f"{p}.offloadingConfig.remoteBackend.scheme: must be http or https, got 'ftp'",
        f"{p}.offloadingConfig.remoteBackend.host: must be a host name or IP with an optional :port "
        "(no scheme or path), got 'https://standby.example.com'",
    ]


def test_bad_metric_type():
    doc = offloading()
    doc["spec"]["offloadingConfig"]["metrics"][0]["type"] = "Memory"
    (error,) = errors_of(doc)
    assert error.startswith("default/my-model: spec.offloadingConfig.metrics[0].type: must be one of")
    assert "got 'Memory'" in error


def test_pods_metric_with_value_target_is_rejected():
    doc = offloading(
        metrics=[
            {
                "type": "Resource",
                "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 9}},
            },
            {
                "type": "Pods",
                "pods": {"metric": {"name": "inflight"}, "target": {"type": "Value", "value": 3}},
            },
        ]
    )
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.metrics[1].pods.target.type: "
        "must be AverageValue for a Pods metric, got 'Value'"
    ]


def test_resource_metric_with_value_target_is_rejected():
    doc = offloading()
    doc["spec"]["offloadingConfig"]["metrics"][0]["resource"]["target"] = {"type": "Value", "value": 3}
    (error,) = errors_of(doc)
    assert error == (
        "default/my-model: spec.offloadingConfig.metrics[0].resource.target.type: "
        "must be Utilization or AverageValue for a Resource metric, got 'Value'"
    )


def test_metric_without_its_source_block_or_target():
    doc = offloading(
        metrics=[
            {"type": "External"},
            {"type": "External", "external": {"metric": {"name": "x"}}},
            {
                "type": "Resource",
                "resource": {"name": "gpu", "target": {"type": "Utilization", "averageUtilization": 5}},
            },
        ]
    )
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.metrics[0].external: is required for type External",
        "default/my-model: spec.offloadingConfig.metrics[1].external.target: is required",
        "default/my-model: spec.offloadingConfig.metrics[2].resource.name: must be cpu or memory, got 'gpu'",
    ]


def test_target_must_be_positive():
    doc = offloading()
    doc["spec"]["offloadingConfig"]["metrics"][0]["resource"]["target"]["averageUtilization"] = 0
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.metrics[0].resource.target.averageUtilization: "
        "must be greater than 0, got 0"
    ]


def test_selector_on_a_promql_expression_is_rejected():
    doc = model_with(SEED_002_EXTERNAL_HPA)
    doc["spec"]["offloadingConfig"]["metrics"][0]["external"]["metric"]["name"] = "sum(rate(x[1m]))"
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.metrics[0].external.metric.selector.matchLabels: "
        "only applies when metric.name is a metric name, not a PromQL expression"
    ]


def test_missing_service_ref():
    doc = minimal()
    del doc["spec"]["serviceRef"]
    assert errors_of(doc) == ["default/my-model: spec.serviceRef: is required"]


def test_service_ref_without_name_and_bad_port():
    doc = minimal(serviceRef={"targetPort": 70000})
    assert errors_of(doc) == [
        "default/my-model: spec.serviceRef.targetPort: must be a port between 1 and 65535, got 70000",
        "default/my-model: spec.serviceRef.name: is required",
    ]


def test_missing_name_and_spec():
    with pytest.raises(InvalidObject) as info:
        parse_model_deployment({"apiVersion": "deployment.beamlit.com/v1alpha1", "kind": "ModelDeployment"})
    messages = [str(e) for e in info.value.errors]
    assert "metadata.name: is required" in messages
    assert "spec: is required" in messages
    assert info.value.key == "default/?"


def test_uppercase_name_is_rejected():
    doc = minimal()
    doc["metadata"]["name"] = "My_Model"
    assert errors_of(doc) == ["default/My_Model: metadata.name: must be a lowercase DNS name, got 'My_Model'"]


@pytest.mark.parametrize(
    ("remote", "error"),
    [
        (
            {"host": "https://standby.example.com"},
            "host: must be a host name or IP with an optional :port (no scheme or path), "
            "got 'https://standby.example.com'",
        ),
        (
            {"host": "standby.example.com/v1"},
            "host: must be a host name or IP with an optional :port (no scheme or path), "
            "got 'standby.example.com/v1'",
        ),
        ({"host": "standby.example.com", "scheme": "grpc"}, "scheme: must be http or https, got 'grpc'"),
        ({"host": "standby.example.com:0"}, "host: port must be between 1 and 65535, got '0'"),
        ({"host": "standby.example.com:http"}, "host: port must be between 1 and 65535, got 'http'"),
        (
            {"host": "under_score.example.com"},
            "host: must be a DNS name or IP address, got 'under_score.example.com'",
        ),
        ({}, "host: is required"),
        (
            {"host": "standby.example.com", "pathPrefix": "v1"},
            "pathPrefix: must be a path starting with '/' and without '?', '#' or spaces, got 'v1'",
        ),
        (
            {"host": "standby.example.com", "headersToAdd": [{"name": "x api key", "value": "k"}]},
            "headersToAdd: 'x api key' is not a header name that can be set",
        ),
        (
            {"host": "standby.example.com", "headersToAdd": {"Host": "evil.example.com"}},
            "headersToAdd: 'Host' is not a header name that can be set",
        ),
        (
            {"host": "standby.example.com", "headersToAdd": [{"value": "k"}]},
            "headersToAdd[0].name: is required",
        ),
    ],
)
def test_remote_backend_errors(remote, error):
    assert errors_of(offloading(remoteBackend=remote)) == [
        f"default/my-model: spec.offloadingConfig.remoteBackend.{error}"
    ]


def test_spillover_is_off_unless_enabled_and_takes_only_turned_away_codes():
    assert parse_model_deployment(offloading()).offloading.behavior.spillover == Spillover()
    on = offloading(
        behavior={"spillover": {"enabled": True, "statusCodes": [503, 429, 503], "maxRetries": "64"}}
    )
    assert parse_model_deployment(on).offloading.behavior.spillover == Spillover(
        enabled=True, status_codes=(429, 503), max_retries=64
    )
    bad = offloading(behavior={"spillover": {"enabled": 1, "statusCodes": [429, 500], "maxRetries": 0}})
    prefix = "default/my-model: spec.offloadingConfig.behavior.spillover."
    assert errors_of(bad) == [
        f"{prefix}statusCodes[1]: must be 429 or 503 (a request turned away before any work), got 500",
        f"{prefix}maxRetries: must be 1 or more, got 0",
        f"{prefix}enabled: must be true or false, got 1",
    ]


def test_negative_durations_are_rejected():
    doc = offloading(
        behavior={"percentage": 50, "activationDelaySeconds": "-1", "bufferDurationSeconds": -30}
    )
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.behavior.activationDelaySeconds: must be 0 or more, got -1",
        "default/my-model: spec.offloadingConfig.behavior.bufferDurationSeconds: must be 0 or more, got -30",
    ]


def test_non_numeric_percentage():
    assert errors_of(offloading(behavior={"percentage": "half"})) == [
        "default/my-model: spec.offloadingConfig.behavior.percentage: "
        "must be a number or quantity, got 'half'"
    ]


def test_wrong_shapes_name_the_field():
    doc = minimal(offloadingConfig={"behavior": [50], "metrics": {"type": "Resource"}})
    assert errors_of(doc) == [
        "default/my-model: spec.offloadingConfig.behavior: must be a mapping, got a list",
        "default/my-model: spec.offloadingConfig.metrics: must be a list, got a mapping",
    ]


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("behavior.bufferDurationSeconds", float("nan")),
        ("target.value", float("nan")),
        ("target.value", "NaN"),
    ],
)
def test_not_a_number_is_rejected(where, value):
    """NaN compares false with anything: as a target nothing would offload, as a buffer nothing releases."""
    doc = model_with(SEED_002_EXTERNAL_HPA)
    config = doc["spec"]["offloadingConfig"]
    if where == "behavior.bufferDurationSeconds":
        config["behavior"]["bufferDurationSeconds"] = value
    else:
        config["metrics"][0]["external"]["target"]["value"] = value
    with pytest.raises(InvalidObject) as info:
        parse_model_deployment(doc)
    assert where.split(".")[-1] in str(info.value)


def test_malformed_integer_string_is_a_field_error_not_a_crash():
    """A typo such as `targetPort: "--8080"` must be reported, not raise out of the parser."""
    text = yaml.safe_dump(minimal(serviceRef={"name": "my-model", "targetPort": "--8080"}))
    objects, rejected = parse_documents(text, "typo.yaml")
    assert objects == []
    (r,) = rejected
    assert r.errors[0].startswith("default/my-model: spec.serviceRef.targetPort: ")


# --- remoteBackend ---


def test_remote_backend_defaults_and_headers_as_list():
    doc = offloading(
        remoteBackend={
            "host": "llm.standby.example.com",
            "scheme": "https",
            "pathPrefix": "/v1/llm/",
            "headersToAdd": [{"name": "x-api-key", "value": "secret"}, {"name": "x-tenant", "value": 7}],
        }
    )
    remote = parse_model_deployment(doc).offloading.remote
    assert (remote.host, remote.port, remote.scheme, remote.path_prefix) == (
        "llm.standby.example.com",
        443,
        "https",
        "/v1/llm",
    )
    assert remote.headers_to_add == (("x-api-key", "secret"), ("x-tenant", "7"))
    assert remote.authority == "llm.standby.example.com"
    assert not remote.is_ip


def test_remote_backend_headers_as_mapping():
    doc = offloading(
        remoteBackend={"host": "10.1.2.3:8000", "headersToAdd": {"x-api-key": "secret", "x-b": "2"}}
    )
    remote = parse_model_deployment(doc).offloading.remote
    assert remote.headers_to_add == (("x-api-key", "secret"), ("x-b", "2"))
    assert (remote.host, remote.port, remote.scheme) == ("10.1.2.3", 8000, "http")
    assert remote.is_ip
    assert remote.authority == "10.1.2.3:8000"


def test_remote_backend_header_mapping_with_empty_value_is_not_the_text_none():
    """`headersToAdd: {x-debug: }` (YAML null) must not send the header value "None" to the remote."""
    doc = offloading(remoteBackend={"host": "standby.example.com", "headersToAdd": {"x-debug": None}})
    try:
        remote = parse_model_deployment(doc).offloading.remote
    except InvalidObject as exc:
        assert "headersToAdd" in str(exc)
    else:
        assert remote.headers_to_add == (("x-debug", ""),)


@pytest.mark.parametrize(
    ("host", "scheme", "expected"),
    [
        ("standby.example.com", "http", ("standby.example.com", 80, "standby.example.com")),
        ("standby.example.com:8443", "https", ("standby.example.com", 8443, "standby.example.com:8443")),
        ("[::1]:9000", "http", ("::1", 9000, "[::1]:9000")),
        ("::1", "https", ("::1", 443, "[::1]")),
    ],
)
def test_remote_host_and_port(host, scheme, expected):
    remote = parse_remote_backend({"host": host, "scheme": scheme}, "remote")
    assert (remote.host, remote.port, remote.authority) == expected


# --- Policy ---


def test_policy_errors():
    with pytest.raises(InvalidObject) as info:
        parse_policy(
            {
                "metadata": {"name": "p", "namespace": "team"},
                "spec": {"type": "location", "locations": [{"type": "planet", "name": "mars"}]},
            }
        )
    assert str(info.value) == (
        "team/p: spec.locations[0].type: must be location, country or continent, got 'planet'"
    )
    with pytest.raises(InvalidObject) as info:
        parse_policy({"metadata": {"name": "p"}, "spec": {"type": "location"}})
    assert str(info.value) == "default/p: spec.locations: is required for a location policy"


# --- the Kubernetes objects beside the CRs ---


def test_endpoint_slice_needs_its_service_label():
    with pytest.raises(InvalidObject) as info:
        parse_endpoint_slice({"metadata": {"name": "s-1"}, "endpoints": [{"addresses": ["10.0.0.1"]}]})
    assert str(info.value) == (
        "default/s-1: metadata.labels.kubernetes.io/service-name: is required to tie the slice to its Service"
    )


def test_endpoint_readiness_nil_means_ready():
    es = parse_endpoint_slice(
        {
            "metadata": {"name": "s-1", "labels": {"kubernetes.io/service-name": "s"}},
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
            ],
            "ports": [{"name": "http", "port": 8000}],
        }
    )
    assert [(e.address, e.ready) for e in es.endpoints] == [("10.0.0.1", True), ("10.0.0.2", False)]


def test_service_port_lookup():
    svc = parse_service(
        {
            "metadata": {"name": "s"},
            "spec": {
                "ports": [{"name": "http", "port": 80, "targetPort": 8000}, {"name": "m", "port": 9090}]
            },
        }
    )
    assert svc.port_for(80).name == "http"
    assert svc.port_for(8000).name == "http"  # by targetPort
    assert svc.port_for(None) is None  # several ports, none named
    assert svc.port_for(1234) is None


def test_list_documents_are_unpacked_and_foreign_kinds_ignored():
    text = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}},
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "s"},
                    "spec": {"ports": [{"port": 80}]},
                },
            ],
        }
    )
    objects, rejected = parse_documents(text, "list.yaml")
    assert rejected == []
    assert [o.key.kind for o in objects] == ["Service"]


def test_malformed_yaml_names_the_file():
    objects, rejected = parse_documents("spec: [unclosed\n", "models/bad.yaml")
    assert objects == []
    (r,) = rejected
    assert r.key is None
    assert r.errors[0].startswith("models/bad.yaml: malformed YAML")


# --- `overspill validate` ---


def test_validate_cli_reports_every_error_and_exits_1(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(offloading(behavior={"percentage": 150, "bufferDurationSeconds": -1}))
        + "---\n"
        + SEED_001_POLICY
    )
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    prefix = f"{path}: default/my-model: spec.offloadingConfig.behavior"
    assert f"{prefix}.percentage: must be between 0 and 100, got 150" in err.splitlines()
    assert f"{prefix}.bufferDurationSeconds: must be 0 or more, got -1" in err.splitlines()
    assert f"{path}: Policy default/my-policy: valid" in out.splitlines()


def test_validate_cli_accepts_the_examples(capsys):
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files, "manifests/examples/*.yaml is missing"
    assert main(["validate", *map(str, files)]) == 0
    out, err = capsys.readouterr()
    assert "ModelDeployment default/my-model: valid" in out
    assert "ModelDeployment inference/llm: valid" in out
    assert "Policy default/my-policy: valid" in out
    assert err == ""


def test_validate_cli_accepts_the_seed_examples(tmp_path, capsys):
    files = []
    for i, text in enumerate([SEED_001_MODEL, SEED_001_POLICY, SEED_001_MODEL_WITH_POLICIES]):
        files.append(tmp_path / f"seed-001-{i}.yaml")
        files[-1].write_text(text)
    for i, fragment in enumerate([SEED_002_OVERVIEW, SEED_002_EXTERNAL_HPA, SEED_002_EXTERNAL_NESTED]):
        files.append(tmp_path / f"seed-002-{i}.yaml")
        files[-1].write_text(yaml.safe_dump(model_with(fragment)))
    assert main(["validate", *map(str, files)]) == 0
    out, _ = capsys.readouterr()
    assert out.count(": valid") == 6


def test_validate_cli_malformed_yaml_names_the_file_once(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: deployment.beamlit.com/v1alpha1\nkind: [ModelDeployment\n")
    assert main(["validate", str(path)]) == 1
    _, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert "malformed YAML" in line
    assert line.startswith(f"{path}: ")
    assert line.count(str(path)) == 1, f"file name repeated: {line!r}"


def test_validate_cli_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["validate", str(path)]) == 1
    _, err = capsys.readouterr()
    assert str(path) in err
    assert "No such file" in err


def test_validate_cli_file_that_is_not_utf8(tmp_path, capsys):
    """A Latin-1 file (e.g. saved by an old editor) gets an error naming it, not a traceback."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n")
    assert main(["validate", str(path)]) == 1
    _, err = capsys.readouterr()
    assert err.startswith(f"{path}: ")


# --- Envoy load metrics (`envoy:` names) ---


def envoy(mtype: str, name: str, labels: dict | None = None, target: dict | None = None) -> dict:
    metric: dict = {"name": name}
    if labels:
        metric["selector"] = {"matchLabels": labels}
    key = mtype.lower()
    return {
        "type": mtype,
        key: {"metric": metric, "target": target or {"type": "AverageValue", "averageValue": 4}},
    }


def test_envoy_load_metrics_parse_as_external_and_pods_metrics():
    doc = offloading(
        metrics=[
            envoy("External", "envoy:requests_in_flight", target={"type": "Value", "value": 20}),
            envoy("External", "envoy:request_rate", {"side": "local"}),
            envoy(
                "Pods",
                "envoy:orca:kv_cache_usage_perc",
                target={"type": "AverageValue", "averageValue": "800m"},
            ),
        ]
    )
    in_flight, rate, orca = parse_model_deployment(doc).offloading.metrics
    assert (in_flight.type, in_flight.name, in_flight.target.type, in_flight.target.threshold) == (
        "External", "envoy:requests_in_flight", "Value", 20.0)  # fmt: skip
    assert rate.selector == {"side": "local"}
    assert (orca.type, orca.target.threshold) == ("Pods", 0.8)


AT = "spec.offloadingConfig.metrics[0]"
OBJECT = {
    "type": "Object",
    "object": {
        "metric": {"name": "envoy:errors"},
        "describedObject": {"kind": "Service", "name": "s"},
        "target": {"type": "Value", "value": 1},
    },
}


@pytest.mark.parametrize(
    ("metric", "error"),
    [
        (OBJECT, f"{AT}.object.metric.name: Envoy load metrics are External or Pods metrics, not Object"),
        (envoy("External", "envoy:queue"),
         f"{AT}.external.metric.name: unknown Envoy load metric 'envoy:queue'"),
        (envoy("External", "envoy:orca:"), "unknown Envoy load metric 'envoy:orca:'"),
        (envoy("External", "envoy:errors", {"zone": "a"}),
         f"{AT}.external.metric.selector.matchLabels: takes only side"),
        (envoy("External", "envoy:errors", {"side": "east"}),
         f"{AT}.external.metric.selector.matchLabels.side: must be local or remote, got 'east'"),
        (envoy("External", "envoy:orca:x", {"side": "remote"}),
         "ORCA metrics are reported for the local pods only"),
    ],
)  # fmt: skip
def test_bad_envoy_load_metrics_name_their_field(metric, error):
    [line] = errors_of(offloading(metrics=[metric]))
    assert error in line
