"""The manifests users apply: the CRD schemas against the parser, every built-in object against
Kubernetes 1.32's own schemas, and the kustomize trees as `kubectl apply -k` renders them.

A CRD's `openAPIV3Schema` is what the API server checks at `kubectl apply`; `api.crd` is what
`overspill validate` and the controller check. They are held against each other here: the seed
documents and the examples pass both, a table of documents gets the same verdict from both, and
the few rules a structural schema cannot say are listed in `KNOWN_DIFFERENCES`, each pinned.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
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
    MODEL_API,
    POLICY_API,
    InvalidObject,
    format_time,
    parse_model_deployment,
    parse_policy,
)
from api.status import MetricStatus, ModelStatus, Phase
from reconciler.offload import OffloadMachine
from reconciler.status_writer import desired_status

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
CRDS = {
    "ModelDeployment": MANIFESTS / "crds" / "modeldeployments.yaml",
    "Policy": MANIFESTS / "crds" / "policies.yaml",
}
INSTALL = MANIFESTS / "install"
INSTALL_EXAMPLES = INSTALL / "examples"
GATEWAY_BOOTSTRAP = INSTALL / "base" / "gateway" / "bootstrap.yaml"
# The flags the gateway's bootstrap ConfigMap was printed with (manifests/install/base/kustomization.yaml).
BOOTSTRAP_FLAGS = [
    "--xds-host",
    "overspill.overspill-system.svc.cluster.local",
    "--xds-port",
    "18000",
    "--node-id",
    "overspill-gateway",
    "--stats-port",
    "15090",
]
# The Kubernetes release whose built-in schemas the objects must pass (kubernetes-validate ships them).
KUBERNETES_VERSION = "1.32.0"
KUBECTL_TIMEOUT = 60
# Kinds kubernetes-validate has no schema for, being no built-ins: the Prometheus Operator's
# ServiceMonitor, PodMonitor and PrometheusRule (their CRDs are not ours to check) and our own
# kinds, checked against our CRDs instead.
OUR_KINDS = {"ModelDeployment", "Policy"}
OTHER_CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


SEED_DOCUMENTS = {
    "001-model": yaml.safe_load(SEED_001_MODEL),
    "001-policy": yaml.safe_load(SEED_001_POLICY),
    "001-model-with-policies": yaml.safe_load(SEED_001_MODEL_WITH_POLICIES),
    "002-overview": model_with(SEED_002_OVERVIEW),
    "002-prometheus-target-under-metric": model_with(SEED_002_EXTERNAL_NESTED),
    "002-prometheus-hpa-shape": model_with(SEED_002_EXTERNAL_HPA),
    "002-metrics-server": model_with("offloadingConfig:\n" + SEED_002_METRICS_SERVER),
}


# --- The CRD schemas, as JSON Schema ---


def load_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.cache
def crd(kind: str) -> dict:
    (doc,) = load_documents(CRDS[kind])
    return doc


def openapi_schema(kind: str) -> dict:
    (version,) = crd(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema, judging a document as the API server does.

    `nullable` admits null; `x-kubernetes-int-or-string` is an integer or a string; other
    `x-kubernetes-*` extensions and annotations (default, format, description) do not
    validate. An object with `properties` takes no other field, as the API server's strict
    field validation (kubectl's default `--validate=strict`) rejects unknown fields, unless
    it is marked `x-kubernetes-preserve-unknown-fields`.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "format", "description"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out = {"allOf": [{"anyOf": [{"type": "integer"}, {"type": "string"}]}, out]}
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def prune_nulls(value: Any, schema: dict) -> Any:
    """Drop `field: null` where the schema does not make it nullable, as the API server does."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        result = {}
        for key, item in value.items():
            sub = props.get(key, {})
            if item is None and not sub.get("nullable"):
                continue
            result[key] = prune_nulls(item, sub)
        return result
    if isinstance(value, list):
        return [prune_nulls(item, schema.get("items", {})) for item in value]
    return value


def apply_defaults(value: Any, schema: dict) -> Any:
    """Fill in schema defaults as the API server does on create: missing fields, then inside them."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, sub in props.items():
            if key in value:
                apply_defaults(value[key], sub)
    elif isinstance(value, list):
        for item in value:
            apply_defaults(item, schema.get("items", {}))
    return value


@functools.cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = to_json_schema(openapi_schema(kind))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: dict) -> list[str]:
    """Why the API server would reject `doc` by its CRD's schema; empty when it accepts it."""
    kind = doc["kind"]
    pruned = prune_nulls(doc, openapi_schema(kind))
    errors = sorted(validator(kind).iter_errors(pruned), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def parser_errors(doc: dict) -> list[str]:
    """Why `overspill validate` rejects `doc`; empty when it accepts it."""
    parse = parse_model_deployment if doc["kind"] == "ModelDeployment" else parse_policy
    try:
        parse(copy.deepcopy(doc))
    except InvalidObject as exc:
        return [str(e) for e in exc.errors]
    return []


# --- (a) the seed documents and the examples pass the CRD schemas ---


@pytest.mark.parametrize("name", list(SEED_DOCUMENTS))
def test_seed_documents_validate_against_the_crds(name):
    doc = SEED_DOCUMENTS[name]
    assert schema_errors(doc) == []
    assert parser_errors(doc) == []


def example_custom_resources() -> list[tuple[str, dict]]:
    paths = sorted((MANIFESTS / "examples").glob("*.yaml")) + sorted(
        p for p in INSTALL_EXAMPLES.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    return [
        (f"{p.relative_to(MANIFESTS)}:{d['kind']}/{d['metadata']['name']}", d)
        for p in paths
        for d in load_documents(p)
        if d.get("kind") in OUR_KINDS
    ]


def test_example_custom_resources_validate_against_the_crds():
    found = example_custom_resources()
    names = [name for name, _ in found]
    # 2 in model-deployment.yaml, 1 in prometheus-model.yaml, 1 in install/examples/model.yaml
    assert len(found) >= 4, names
    assert any(name.startswith("install/examples/") for name in names), names
    for name, doc in found:
        assert schema_errors(doc) == [], name
        assert parser_errors(doc) == [], name


def test_schema_defaults_mean_what_the_parser_assumes():
    """The API server stores defaults in the object; the parser must read it the same way."""
    docs = [*SEED_DOCUMENTS.values(), *(d for _, d in example_custom_resources())]
    docs += [doc for _, doc, valid in AGREEMENT if valid]
    for doc in docs:
        defaulted = apply_defaults(copy.deepcopy(doc), openapi_schema(doc["kind"]))
        assert schema_errors(defaulted) == []
        parse = parse_model_deployment if doc["kind"] == "ModelDeployment" else parse_policy
        assert parse(defaulted) == parse(copy.deepcopy(doc)), doc


# --- (b) bad documents: the schema rejects them, and agrees with the parser ---


def model(**spec: Any) -> dict:
    doc = {
        "apiVersion": MODEL_API,
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"serviceRef": {"name": "m", "targetPort": 8080}},
    }
    doc["spec"].update(spec)
    return doc


def offload(
    *metrics: dict, behavior: dict | None = None, remote: dict | None = None, remotes: list | None = None
) -> dict:
    config: dict[str, Any] = {"metrics": list(metrics)}
    if behavior is not None:
        config["behavior"] = behavior
    if remote is not None:
        config["remoteBackend"] = remote
    if remotes is not None:
        config["remoteBackends"] = remotes
    return model(offloadingConfig=config)


def metric(mtype: str, source: dict) -> dict:
    key = {"ContainerResource": "containerResource"}.get(mtype, mtype.lower())
    return {"type": mtype, key: source}


def resource(target: dict, name: str = "cpu") -> dict:
    return metric("Resource", {"name": name, "target": target})


def external(beside: dict | None, name: str = "queue_depth", **metric_fields: Any) -> dict:
    """An External metric with its target `beside` the metric (HPA) and/or in `metric_fields` (seed 002)."""
    source: dict[str, Any] = {"metric": {"name": name, **metric_fields}}
    if beside is not None:
        source["target"] = beside
    return metric("External", source)


def value(v: Any) -> dict:
    return {"type": "Value", "value": v}


def average(v: Any) -> dict:
    return {"type": "AverageValue", "averageValue": v}


def utilization(v: Any) -> dict:
    return {"type": "Utilization", "averageUtilization": v}


def remote(**fields: Any) -> dict:
    return offload(remote={"host": "standby.example.com", **fields})


def remotes(*items: dict) -> dict:
    return offload(remotes=list(items))


def policy(**spec: Any) -> dict:
    return {
        "apiVersion": POLICY_API,
        "kind": "Policy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": spec,
    }


def without(doc: dict, *path: str) -> dict:
    node = doc
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(offload(resource(utilization(90)), behavior={"percentage": 150}), id="percentage-150"),
        pytest.param(offload({"type": "Custom", "custom": {"name": "x"}}), id="unknown-metric-type"),
        pytest.param(remote(scheme="ftp"), id="scheme-ftp"),
        pytest.param(without(model(), "spec", "serviceRef"), id="missing-serviceRef"),
    ],
)
def test_bad_documents_are_rejected_by_the_schema(doc):
    assert schema_errors(doc), "the schema accepted it"
    assert parser_errors(doc), "the parser accepted it"


# (id, document, valid): the schema's verdict and the parser's must both be `valid`.
FROM_SECRET = {
    "name": "Authorization",
    "valueFrom": {"secretKeyRef": {"name": "remote-token", "key": "token"}},
}
OAUTH = {
    "clientId": "overspill",
    "clientSecretRef": {"name": "oauth", "key": "client-secret"},
    "tokenUrl": "https://auth.example.com/oauth/token",
    "scopes": ["inference"],
}


def oauth_without(key: str, **extra) -> dict:
    return {k: v for k, v in OAUTH.items() if k != key} | extra


AGREEMENT: list[tuple[str, dict, bool]] = [
    # ModelDeployment: spec and references
    ("minimal", model(), True),
    ("no-spec", without(model(), "spec"), False),
    ("serviceRef-without-name", model(serviceRef={"targetPort": 8080}), False),
    ("serviceRef-without-targetPort", model(serviceRef={"name": "m"}), True),
    ("targetPort-0", model(serviceRef={"name": "m", "targetPort": 0}), False),
    ("targetPort-70000", model(serviceRef={"name": "m", "targetPort": 70000}), False),
    ("environment-development", model(environment="development"), True),
    ("environment-staging", model(environment="staging"), False),
    ("source-statefulset", model(modelSourceRef={"kind": "StatefulSet", "name": "m"}), True),
    ("source-kind-pod", model(modelSourceRef={"kind": "Pod", "name": "m"}), False),
    ("source-without-name", model(modelSourceRef={"kind": "Deployment"}), False),
    ("policy-ref-default-type", model(policies=[{"name": "p"}]), True),
    ("policy-ref-type-other", model(policies=[{"refType": "clusterPolicy", "name": "p"}]), False),
    ("policy-ref-without-name", model(policies=[{"refType": "localPolicy"}]), False),
    ("offloadingConfig-not-a-mapping", model(offloadingConfig="on"), False),
    ("offloadingConfig-empty", model(offloadingConfig={}), True),
    ("metrics-not-a-list", model(offloadingConfig={"metrics": {"type": "Resource"}}), False),
    ("nulls-are-unset", model(model=None, offloadingConfig={"behavior": None, "metrics": None}), True),
    # behavior
    ("percentage-0", offload(behavior={"percentage": 0}), True),
    ("percentage-12.5", offload(behavior={"percentage": 12.5}), True),
    ("percentage-100", offload(behavior={"percentage": 100}), True),
    ("percentage-minus-1", offload(behavior={"percentage": -1}), False),
    ("percentage-150", offload(behavior={"percentage": 150}), False),
    ("activation-delay-10", offload(behavior={"activationDelaySeconds": 10}), True),
    ("activation-delay-negative", offload(behavior={"activationDelaySeconds": -1}), False),
    ("buffer-0", offload(behavior={"bufferDurationSeconds": 0}), True),
    ("buffer-negative", offload(behavior={"bufferDurationSeconds": -0.5}), False),
    ("mode-proportional", offload(behavior={"mode": "Proportional", "metricMeasures": "Demand"}), True),
    ("mode-fixed", offload(behavior={"mode": "Fixed", "metricMeasures": "Local"}), True),
    ("mode-unknown", offload(behavior={"mode": "proportional"}), False),
    ("metric-measures-unknown", offload(behavior={"metricMeasures": "Remote"}), False),
    ("tolerance-0", offload(behavior={"tolerance": 0, "smoothingSeconds": 0}), True),
    ("tolerance-1", offload(behavior={"tolerance": 1}), False),
    ("tolerance-negative", offload(behavior={"tolerance": -0.1}), False),
    ("smoothing-negative", offload(behavior={"smoothingSeconds": -1}), False),
    ("stale-local", offload(behavior={"metricStaleAfterSeconds": 20, "onStaleMetric": "local"}), True),
    ("stale-offload", offload(behavior={"metricStaleAfterSeconds": 0, "onStaleMetric": "offload"}), True),
    ("stale-unknown-action", offload(behavior={"onStaleMetric": "drop"}), False),
    ("stale-negative", offload(behavior={"metricStaleAfterSeconds": -5}), False),
    # metrics: types and sources
    ("resource-cpu-utilization", offload(resource(utilization(80))), True),
    ("resource-memory-average", offload(resource(average("2Gi"), name="memory")), True),
    ("resource-gpu", offload(resource(utilization(80), name="nvidia.com/gpu")), False),
    ("resource-value-target", offload(resource(value(10))), False),
    ("resource-without-source", offload({"type": "Resource"}), False),
    ("resource-without-target", offload(metric("Resource", {"name": "cpu"})), False),
    ("unknown-metric-type", offload({"type": "Custom"}), False),
    ("metric-without-type", offload({"resource": {"name": "cpu", "target": utilization(80)}}), False),
    (
        "container-resource",
        offload(
            metric("ContainerResource", {"name": "cpu", "container": "server", "target": utilization(70)})
        ),
        True,
    ),
    (
        "container-resource-without-container",
        offload(metric("ContainerResource", {"name": "cpu", "target": utilization(70)})),
        False,
    ),
    (
        "pods-average",
        offload(metric("Pods", {"metric": {"name": "inflight"}, "target": average("500m")})),
        True,
    ),
    (
        "pods-value-target",
        offload(metric("Pods", {"metric": {"name": "inflight"}, "target": value(5)})),
        False,
    ),
    (
        "pods-utilization-target",
        offload(metric("Pods", {"metric": {"name": "inflight"}, "target": utilization(50)})),
        False,
    ),
    (
        "object-value",
        offload(
            metric(
                "Object",
                {
                    "describedObject": {"apiVersion": "v1", "kind": "Service", "name": "m"},
                    "metric": {"name": "requests_per_second"},
                    "target": value(100),
                },
            )
        ),
        True,
    ),
    (
        "object-without-describedObject",
        offload(metric("Object", {"metric": {"name": "rps"}, "target": value(100)})),
        False,
    ),
    (
        "object-describedObject-without-kind",
        offload(
            metric(
                "Object", {"describedObject": {"name": "m"}, "metric": {"name": "rps"}, "target": value(1)}
            )
        ),
        False,
    ),
    ("external-value", offload(external(value(10))), True),
    ("external-average", offload(external(average(3))), True),
    ("external-utilization-target", offload(external(utilization(50))), False),
    ("external-target-under-metric", offload(external(None, target=value(10))), True),
    ("external-without-target", offload(external(None)), False),
    ("external-without-metric-name", offload(metric("External", {"metric": {}, "target": value(1)})), False),
    ("external-without-metric", offload(metric("External", {"target": value(1)})), False),
    ("external-selector", offload(external(value(1), selector={"matchLabels": {"model": "m"}})), True),
    ("promql-expression", offload(external(value(8), name="sum(rate(http_requests_total[1m]))")), True),
    (
        "promql-expression-with-matchLabels",
        offload(external(value(8), name="sum(up)", selector={"matchLabels": {"job": "m"}})),
        False,
    ),
    (
        "promql-expression-empty-matchLabels",
        offload(external(value(8), name="sum(up)", selector={"matchLabels": {}})),
        True,
    ),
    # targets and quantities
    ("target-type-without-its-key", offload(external({"type": "Value", "averageValue": 3})), False),
    ("target-without-type", offload(external({"value": 3})), False),
    ("utilization-0", offload(resource(utilization(0))), False),
    ("value-0", offload(external(value(0))), False),
    ("value-negative", offload(external(value(-5))), False),
    ("value-string-0", offload(external(value("0"))), False),
    ("value-0m", offload(external(value("0m"))), False),
    ("value-minus-string", offload(external(value("-5"))), False),
    ("value-500m", offload(external(value("500m"))), True),
    ("value-1.5Gi", offload(external(value("1.5Gi"))), True),
    ("value-point-5", offload(external(value(".5"))), True),
    ("value-plus-3", offload(external(value("+3"))), True),
    ("value-exponent", offload(external(value("1e3"))), True),
    ("value-word", offload(external(value("ten"))), False),
    ("value-bad-suffix", offload(external(value("10Xi"))), False),
    ("value-boolean", offload(external(value(True))), False),
    # remoteBackend
    ("remote-host", remote(), True),
    ("remote-without-host", offload(remote={"scheme": "https"}), False),
    ("remote-host-port", remote(host="standby.example.com:8443"), True),
    ("remote-ipv4", remote(host="10.0.0.7"), True),
    ("remote-ipv4-port", remote(host="10.0.0.7:8080"), True),
    ("remote-ipv6", remote(host="2001:db8::1"), True),
    ("remote-ipv6-port", remote(host="[2001:db8::1]:8443"), True),
    ("remote-host-with-scheme", remote(host="https://standby.example.com"), False),
    ("remote-host-with-path", remote(host="standby.example.com/v1"), False),
    ("remote-port-0", remote(host="standby.example.com:0"), False),
    ("remote-port-70000", remote(host="standby.example.com:70000"), False),
    ("remote-port-word", remote(host="standby.example.com:https"), False),
    ("remote-host-underscore", remote(host="stand_by.example.com"), False),
    ("remote-https", remote(scheme="https"), True),
    ("remote-scheme-ftp", remote(scheme="ftp"), False),
    ("remote-path-prefix", remote(pathPrefix="/v1/llm"), True),
    ("remote-path-prefix-empty", remote(pathPrefix=""), True),
    ("remote-path-prefix-relative", remote(pathPrefix="v1"), False),
    ("remote-path-prefix-query", remote(pathPrefix="/v1?key=x"), False),
    ("remote-path-prefix-space", remote(pathPrefix="/v 1"), False),
    (
        "remote-headers",
        remote(headersToAdd=[{"name": "x-api-key", "value": "k"}, {"name": "X-Tenant"}]),
        True,
    ),
    ("remote-header-host", remote(headersToAdd=[{"name": "Host", "value": "x"}]), False),
    ("remote-header-space", remote(headersToAdd=[{"name": "x api key", "value": "k"}]), False),
    ("remote-header-without-name", remote(headersToAdd=[{"value": "k"}]), False),
    ("remote-tls-options", remote(scheme="https", caFile="/etc/ca.pem", insecureSkipVerify=True), True),
    # credentials from Secrets
    ("remote-header-from-secret", remote(headersToAdd=[FROM_SECRET | {"valuePrefix": "Bearer "}]), True),
    ("remote-header-value-and-from", remote(headersToAdd=[FROM_SECRET | {"value": "k"}]), False),
    ("remote-header-from-nothing", remote(headersToAdd=[{"name": "a", "valueFrom": {}}]), False),
    (
        "remote-header-from-secret-without-key",
        remote(headersToAdd=[{"name": "a", "valueFrom": {"secretKeyRef": {"name": "s"}}}]),
        False,
    ),
    (
        "remote-header-from-secret-bad-name",
        remote(headersToAdd=[{"name": "a", "valueFrom": {"secretKeyRef": {"name": "S_1", "key": "k"}}}]),
        False,
    ),
    ("remote-oauth", remote(authConfig={"type": "oauth", "oauthConfig": OAUTH}), True),
    (
        "remote-oauth-inline-secret",
        remote(authConfig={"oauthConfig": oauth_without("clientSecretRef", clientSecret="s")}),
        True,
    ),
    (
        "remote-oauth-without-secret",
        remote(authConfig={"oauthConfig": oauth_without("clientSecretRef")}),
        False,
    ),
    ("remote-oauth-both-secrets", remote(authConfig={"oauthConfig": OAUTH | {"clientSecret": "s"}}), False),
    ("remote-oauth-ftp", remote(authConfig={"oauthConfig": OAUTH | {"tokenUrl": "ftp://a/t"}}), False),
    ("remote-oauth-type-basic", remote(authConfig={"type": "basic", "oauthConfig": OAUTH}), False),
    ("remote-oauth-without-client-id", remote(authConfig={"oauthConfig": oauth_without("clientId")}), False),
    ("remote-client-certificate", remote(scheme="https", clientCertificateRef={"name": "client-tls"}), True),
    ("remote-client-certificate-no-name", remote(scheme="https", clientCertificateRef={}), False),
    ("remote-insecure-string", remote(insecureSkipVerify="yes"), False),
    ("spillover-on", offload(behavior={"spillover": {"enabled": True}}), True),
    (
        "spillover-429-only",
        offload(behavior={"spillover": {"enabled": True, "statusCodes": [429], "maxRetries": 50}}),
        True,
    ),
    ("spillover-on-500", offload(behavior={"spillover": {"enabled": True, "statusCodes": [500]}}), False),
    ("spillover-max-retries-0", offload(behavior={"spillover": {"enabled": True, "maxRetries": 0}}), False),
    ("spillover-enabled-string", offload(behavior={"spillover": {"enabled": "yes"}}), False),
    (
        "spillover-max-request-bytes-0",
        offload(behavior={"spillover": {"enabled": True, "maxRequestBytes": 0}}),
        False,
    ),
    (
        "spillover-max-request-bytes",
        offload(behavior={"spillover": {"enabled": True, "maxRequestBytes": 65536}}),
        True,
    ),
    # remoteBackends
    (
        "remotes-headers-from-secrets-and-client-certificates",
        remotes(
            {
                "host": "a.example.com",
                "scheme": "https",
                "headersToAdd": [FROM_SECRET],
                "clientCertificateRef": {"name": "a"},
            },
            {
                "host": "b.example.com",
                "scheme": "https",
                "headersToAdd": [FROM_SECRET],
                "clientCertificateRef": {"name": "b"},
            },
        ),
        True,
    ),
    (
        "spillover-header-from-secret",
        offload(
            behavior={"spillover": {"enabled": True}},
            remote={"host": "a.example.com", "headersToAdd": [FROM_SECRET]},
        ),
        True,
    ),
    ("remotes", remotes({"host": "a.example.com"}, {"host": "10.0.0.7:8080", "pathPrefix": "/v1"}), True),
    ("remotes-empty", remotes(), False),
    ("remotes-nine", remotes(*({"host": f"r{i}.example.com"} for i in range(9))), False),
    ("remotes-item-without-host", remotes({"host": "a.example.com"}, {"scheme": "https"}), False),
    ("remotes-item-bad-scheme", remotes({"host": "a.example.com", "scheme": "ftp"}), False),
    (
        "remotes-and-remote",
        offload(remote={"host": "a.example.com"}, remotes=[{"host": "b.example.com"}]),
        False,
    ),
    # Policy
    ("policy-location", policy(type="location", locations=[{"type": "continent", "name": "eu"}]), True),
    (
        "policy-location-upstream",
        policy(type="location", locations=[{"type": "location", "name": "eu-west"}]),
        True,
    ),
    ("policy-flavor", policy(type="flavor", flavors=[{"type": "gpu", "name": "nvidia-l4"}]), True),
    ("policy-no-spec", without(policy(), "spec"), False),
    ("policy-without-type", policy(locations=[{"type": "country", "name": "us"}]), False),
    ("policy-type-region", policy(type="region", locations=[{"type": "country", "name": "us"}]), False),
    ("policy-location-without-locations", policy(type="location"), False),
    ("policy-location-empty-locations", policy(type="location", locations=[]), False),
    (
        "policy-location-with-only-flavors",
        policy(type="location", flavors=[{"type": "cpu", "name": "x"}]),
        False,
    ),
    ("policy-flavor-without-flavors", policy(type="flavor"), False),
    (
        "policy-location-type-planet",
        policy(type="location", locations=[{"type": "planet", "name": "x"}]),
        False,
    ),
    ("policy-location-without-name", policy(type="location", locations=[{"type": "country"}]), False),
    # A flavor's type is free text in the upstream CRD.
    ("policy-flavor-type-tpu", policy(type="flavor", flavors=[{"type": "tpu", "name": "v5"}]), True),
    ("policy-flavor-empty-type", policy(type="flavor", flavors=[{"type": "", "name": "v5"}]), False),
    # Where a remote is and what it runs, for the Policies.
    (
        "remote-location-and-flavor",
        remote(location={"country": "de", "continent": "eu"}, flavor={"type": "gpu", "name": "nvidia-l4"}),
        True,
    ),
    ("remote-location-named", remote(location={"name": "eu-west"}), True),
    ("remote-location-empty", remote(location={}), False),
    ("remote-location-not-a-mapping", remote(location="eu"), False),
    ("remote-flavor-without-name", remote(flavor={"type": "gpu"}), False),
    ("policy-ref-remote", model(policies=[{"refType": "remotePolicy", "name": "p"}]), True),
]


@pytest.mark.parametrize("doc,valid", [pytest.param(d, v, id=i) for i, d, v in AGREEMENT])
def test_schema_and_parser_agree(doc, valid):
    schema, parser = schema_errors(doc), parser_errors(doc)
    assert (not schema) == valid, f"schema: {schema or 'accepted'}"
    assert (not parser) == valid, f"parser: {parser or 'accepted'}"


# What a structural schema cannot say as the parser does, each pinned so a change on either
# side shows up here: (id, document, schema accepts, parser accepts, why).
KNOWN_DIFFERENCES: list[tuple[str, dict, bool, bool, str]] = [
    (
        "oauth-with-several-remotes",
        remotes({"host": "a.example.com"}, {"host": "b.example.com", "authConfig": {"oauthConfig": OAUTH}}),
        True,
        False,
        "OAuth2 with one remote and spill-over off only: a rule across fields, beyond a schema without CEL",
    ),
    (
        "oauth-with-spillover",
        offload(
            behavior={"spillover": {"enabled": True}},
            remote={"host": "a.example.com", "authConfig": {"oauthConfig": OAUTH}},
        ),
        True,
        False,
        "OAuth2 with one remote and spill-over off only: a rule across fields, beyond a schema without CEL",
    ),
    (
        "client-certificate-over-http",
        remote(clientCertificateRef={"name": "client-tls"}),
        True,
        False,
        "a client certificate needs scheme https: a rule across two fields, beyond a schema without CEL",
    ),
    (
        "headers-as-a-map",
        remote(headersToAdd={"x-api-key": "k"}),
        False,
        True,
        "one field cannot be a list or a map in a structural schema; the CRD takes the list form",
    ),
    (
        "number-as-a-string",
        offload(behavior={"percentage": "50"}),
        False,
        True,
        "the parser reads numbers from quantity strings too; the CRD types them as numbers",
    ),
    (
        "quantity-as-a-yaml-float",
        offload(external(value(0.5))),
        False,
        True,
        'a quantity is int-or-string in a CRD (write "500m" or "0.5"); the parser takes any number',
    ),
    (
        "quantity-with-spaces",
        offload(external(value(" 10 "))),
        False,
        True,
        "the parser strips a quantity string; the CRD's quantity pattern does not",
    ),
    (
        "integer-as-a-string",
        offload(resource(utilization("90"))),
        False,
        True,
        "the parser reads integers from digit strings too",
    ),
    (
        "integral-float-as-integer",
        offload(resource(utilization(90.0))),
        True,
        False,
        "JSON Schema (and the API server) count 90.0 as an integer; the parser wants a YAML int",
    ),
    (
        "number-as-a-string-field",
        model(serviceRef={"name": 123}),
        False,
        True,
        "the parser turns a number into a string where it wants one; the CRD wants a string",
    ),
    (
        "empty-string-enum",
        model(environment=""),
        False,
        True,
        "the parser treats an empty string as unset (then its default); an enum has no empty value",
    ),
    (
        "unknown-field",
        model(enabled=True),
        False,
        True,
        "the parser ignores fields it does not know; the API server rejects them (kubectl --validate=strict)",
    ),
    (
        "selector-matchExpressions",
        offload(external(value(1), selector={"matchExpressions": [{"key": "a", "operator": "Exists"}]})),
        False,
        True,
        "the parser reads matchLabels only, ignoring matchExpressions; the CRD rejects what would be ignored",
    ),
    (
        "empty-header-name",
        remote(headersToAdd=[{"name": "", "value": "k"}]),
        False,
        True,
        "the parser skips a header with an empty name; the CRD's header-name pattern needs one character",
    ),
    (
        "host-not-an-ipv6-address",
        remote(host="a:b:c"),
        True,
        False,
        "the CRD checks only the characters of an IPv6 literal; the parser parses the address",
    ),
    (
        "host-name-over-253-characters",
        remote(host=".".join(["a" * 60] * 5)),
        True,
        False,
        "the parser limits a host name to 253 characters; the CRD's pattern does not (RE2: no lookahead)",
    ),
    (
        "bad-target-under-metric-beside-a-good-one",
        offload(external(value(1), target=value(-1))),
        False,
        True,
        "with `target` both beside and under `metric` the parser reads the one beside; the CRD checks both",
    ),
]


@pytest.mark.parametrize(
    "doc,schema_ok,parser_ok", [pytest.param(d, s, p, id=i) for i, d, s, p, _ in KNOWN_DIFFERENCES]
)
def test_known_differences_between_schema_and_parser(doc, schema_ok, parser_ok):
    assert (not schema_errors(doc)) == schema_ok, schema_errors(doc)
    assert (not parser_errors(doc)) == parser_ok, parser_errors(doc)


# --- The CRDs themselves: structural, as the API server requires ---

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# What a structural schema may not set inside allOf/anyOf/oneOf/not.
NOT_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable", "format")


def structural_problems(node: dict, path: str = "") -> list[str]:
    """The rules of a structural schema (apiextensions.k8s.io/v1), as far as JSON can show them."""
    problems = []
    special = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not node.get("type") and not special:
        problems.append(f"{path or '<root>'}: no type")
    if node.get("x-kubernetes-int-or-string") and "type" in node:
        problems.append(f"{path}: x-kubernetes-int-or-string with a type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: both properties and additionalProperties")
    if "default" in node:
        default_schema = to_json_schema({k: v for k, v in node.items() if k != "default"})
        for error in jsonschema.Draft202012Validator(default_schema).iter_errors(node["default"]):
            problems.append(f"{path}: default {node['default']!r} is invalid: {error.message}")
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            defaulted = "default" in item.get("properties", {}).get(key, {})
            if key not in item.get("required", []) and not defaulted:
                problems.append(f"{path}: list-map key {key} is neither required nor defaulted")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    for junctor in JUNCTORS:
        for sub in [node[junctor]] if junctor == "not" and junctor in node else node.get(junctor, []):
            problems += junctor_problems(sub, node, f"{path}/{junctor}")
    return problems


def junctor_problems(sub: dict, outer: dict, path: str) -> list[str]:
    """Inside a junctor: value validations only, on fields the schema around it specifies."""
    problems = [f"{path}: sets {key}" for key in NOT_IN_JUNCTORS if key in sub]
    for name, psub in sub.get("properties", {}).items():
        if name not in outer.get("properties", {}):
            problems.append(f"{path}: {name} is not specified outside the junctor")
        else:
            problems += junctor_problems(psub, outer["properties"][name], f"{path}.{name}")
    if "items" in sub:
        if "items" not in outer:
            problems.append(f"{path}: items not specified outside the junctor")
        else:
            problems += junctor_problems(sub["items"], outer["items"], f"{path}[]")
    for junctor in JUNCTORS:
        for inner in [sub[junctor]] if junctor == "not" and junctor in sub else sub.get(junctor, []):
            problems += junctor_problems(inner, outer, f"{path}/{junctor}")
    return problems


@pytest.mark.parametrize("kind", list(CRDS))
def test_crd_schema_is_structural(kind):
    schema = openapi_schema(kind)
    assert structural_problems(schema) == []
    # metadata may only be restricted in name and generateName; we leave it to the API server.
    assert schema["properties"]["metadata"] == {"type": "object"}
    status = schema["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert status["properties"], "status must be spelled out"


@pytest.mark.parametrize("kind", list(CRDS))
def test_crd_names_and_columns(kind):
    spec = crd(kind)["spec"]
    plural, group, short = {
        "ModelDeployment": ("modeldeployments", "deployment.beamlit.com", ["md"]),
        "Policy": ("policies", "authorization.beamlit.com", ["pol"]),
    }[kind]
    assert crd(kind)["metadata"]["name"] == f"{plural}.{group}"
    assert (spec["group"], spec["scope"]) == (group, "Namespaced")
    assert spec["names"]["kind"] == kind
    assert (spec["names"]["plural"], spec["names"]["shortNames"]) == (plural, short)
    assert spec["names"]["categories"] == ["overspill"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            assert column["type"] == "date"
            continue
        node = schema
        for key in path:
            node = node["properties"][key]
        allowed = {"number": ("number", "integer"), "integer": ("integer",), "string": ("string",)}
        assert node["type"] in allowed[column["type"]], column


def test_model_deployment_columns():
    (version,) = crd("ModelDeployment")["spec"]["versions"]
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in version["additionalPrinterColumns"]
    ]
    assert columns == [
        ("PHASE", "string", ".status.phase", 0),
        ("REMOTE%", "number", ".status.remotePercent", 0),
        ("METRIC", "string", ".status.metric", 0),
        ("READY", "integer", ".status.readyEndpoints", 0),
        ("AGE", "date", ".metadata.creationTimestamp", 0),
        ("MODEL", "string", ".spec.model", 1),
    ]


def test_model_deployment_status_takes_what_the_controller_writes():
    doc = yaml.safe_load(SEED_001_MODEL)
    doc["status"] = {
        "phase": "Offloading",
        "offloadingStatus": True,
        "remotePercent": 50,
        "readyEndpoints": 2,
        "metric": "12/8",
        "metrics": [
            {
                "name": "External/inflight",
                "type": "External",
                "current": 12.0,
                "target": 8,
                "targetType": "Value",
                "over": True,
                "error": "",
            },
            {"name": "Resource/cpu", "type": "Resource", "current": None, "target": 90, "over": None},
        ],
        "remote": "https://llm.standby.example.com:443/v1",
        "observedGeneration": 3,
        "overSince": "2026-11-28T10:00:00Z",
        "underSince": None,
        "triggeredAt": "2026-11-28T10:00:02.123456Z",
        "lastTransitionTime": "2026-11-28T10:00:02Z",
        "errors": [],
        "conditions": [
            {
                "type": "Offloading",
                "status": "True",
                "reason": "MetricOverTarget",
                "message": "External/inflight 12 > 8",
                "lastTransitionTime": "2026-11-28T10:00:02Z",
                "observedGeneration": 3,
            }
        ],
    }
    assert schema_errors(doc) == []
    doc["status"]["conditions"][0]["status"] = "Maybe"
    doc["status"]["extra"] = 1
    assert len(schema_errors(doc)) == 2


def test_status_written_by_the_controller_validates_against_the_crd():
    """What reconciler.status_writer patches onto status passes the CRD's status schema."""
    doc = copy.deepcopy(SEED_DOCUMENTS["002-prometheus-target-under-metric"])
    md = parse_model_deployment(copy.deepcopy(doc))
    assert md.offloading is not None
    spec = md.offloading.metrics[0]
    statuses = [
        ModelStatus(md.key),
        ModelStatus(
            md.key,
            phase=Phase.OFFLOADING,
            remote_percent=50.0,
            reason="External/my_custom_metric_in_prom 12 > 10",
            ready_endpoints=2,
            remote="https://standby.example.com:443",
            remote_usable=True,
            metrics=[MetricStatus(spec, 12.0, True)],
            last_transition=100.0,
        ),
        ModelStatus(
            md.key,
            phase=Phase.INVALID,
            errors=["default/my-model: Service default/my-model not found"],
            metrics=[MetricStatus(spec, None, None, "no series")],
        ),
    ]
    machines = [None, OffloadMachine(triggered=True, triggered_at=90.0, over_since=80.0, under_since=None)]
    for status in statuses:
        for machine in machines:
            written = desired_status(md, status, machine, to_wall=lambda t: 1_800_000_000 + t)
            for condition in written["conditions"]:  # the writer stamps these when it patches
                condition["lastTransitionTime"] = format_time(1_800_000_000, micro=True)
            assert schema_errors({**doc, "status": written}) == [], (status.phase, machine)


# --- (c) every built-in object validates against Kubernetes 1.32 ---


def kube_errors(obj: dict) -> list[str]:
    """Why Kubernetes 1.32's own schema (strict: no unknown fields) rejects `obj`."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def check_object(obj: dict) -> list[str]:
    """Every object the way it can be checked: ours by our CRDs (and the parser), built-ins by Kubernetes."""
    if obj["kind"] in OUR_KINDS:
        return schema_errors(obj) + parser_errors(obj)
    if obj["kind"] in OTHER_CUSTOM_KINDS:
        return []  # not a built-in kind: no schema to check it against here
    return kube_errors(obj)


def label(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def source_files() -> list[Path]:
    """Every YAML file of Kubernetes objects in the repository (kustomizations and the bootstrap aside)."""
    files = [*sorted((MANIFESTS / "examples").glob("*.yaml")), *CRDS.values()]
    files += sorted(
        p for p in INSTALL.rglob("*.yaml") if p.name != "kustomization.yaml" and p != GATEWAY_BOOTSTRAP
    )
    return files


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_object_in_the_manifest_files_validates(path):
    objects = load_documents(path)
    assert objects
    for obj in objects:
        assert check_object(obj) == [], label(obj)


def test_crds_validate_as_built_in_apiextensions_objects():
    for path in CRDS.values():
        (obj,) = load_documents(path)
        assert kube_errors(obj) == []


def test_kubernetes_validate_catches_a_deployment_without_selector():
    """The check above is real: the examples' old Deployments (no selector, no template) fail it."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "my-model", "namespace": "default"},
        "spec": {"replicas": 2},
        "status": {"replicas": 2, "readyReplicas": 2},
    }
    assert kube_errors(deployment)
    assert kube_errors({**deployment, "spec": {"replicas": 2, "bogus": 1}})


# --- (d) the kustomize trees render, and what they render is valid and consistent ---


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl (with kustomize) is needed to render manifests/install and is not installed")
        pytest.skip("kubectl is not installed")
    return path


def render(kubectl: str, directory: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def printed_bootstrap() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "overspill", "bootstrap", *BOOTSTRAP_FLAGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    return result.stdout


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module")
def install(kubectl) -> list[dict]:
    return render(kubectl, INSTALL)


def test_install_renders_and_every_object_validates(install):
    objects = by_kind(install)
    assert set(objects) == {
        ("Namespace", "overspill-system"),
        ("CustomResourceDefinition", "modeldeployments.deployment.beamlit.com"),
        ("CustomResourceDefinition", "policies.authorization.beamlit.com"),
        ("ServiceAccount", "overspill"),
        ("ClusterRole", "overspill"),
        ("ClusterRoleBinding", "overspill"),
        ("Role", "overspill-leader-election"),
        ("RoleBinding", "overspill-leader-election"),
        ("Deployment", "overspill"),
        ("PodDisruptionBudget", "overspill"),
        ("Service", "overspill"),
        ("Deployment", "overspill-gateway"),
        ("Service", "overspill-gateway"),
        ("ConfigMap", "overspill-gateway-bootstrap"),
        ("ServiceMonitor", "overspill"),
        ("PodMonitor", "overspill-gateway"),
        ("PrometheusRule", "overspill"),
    }
    for obj in install:
        assert check_object(obj) == [], label(obj)
        if obj["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "overspill-system", label(obj)


def test_gateway_bootstrap_is_what_overspill_bootstrap_prints(install):
    configmap = by_kind(install)[("ConfigMap", "overspill-gateway-bootstrap")]
    printed = printed_bootstrap()
    assert configmap["data"] == {"bootstrap.yaml": printed}, (
        "stale: regenerate manifests/install/base/gateway/bootstrap.yaml with "
        f"`overspill bootstrap {' '.join(BOOTSTRAP_FLAGS)}`"
    )
    # ... and it points at the control plane's Service.
    service = by_kind(install)[("Service", "overspill")]
    xds = next(p for p in service["spec"]["ports"] if p["name"] == "xds")
    cluster = yaml.safe_load(printed)["static_resources"]["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert address["socket_address"] == {"address": host, "port_value": xds["port"]}


def test_install_references_resolve(install):
    """Selectors select, ports named exist, bindings name the ServiceAccount, volumes their ConfigMap."""
    objects = by_kind(install)
    controller, gateway = objects[("Deployment", "overspill")], objects[("Deployment", "overspill-gateway")]

    def pod_labels(deployment: dict) -> dict:
        return deployment["spec"]["template"]["metadata"]["labels"]

    def port_names(deployment: dict) -> set[str]:
        return {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}

    for deployment in (controller, gateway):
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    services = {"overspill": controller, "overspill-gateway": gateway}
    for service, deployment in ((objects[("Service", name)], d) for name, d in services.items()):
        assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names(deployment), port
    assert objects[("PodDisruptionBudget", "overspill")]["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels(controller).items()
    )
    monitor = objects[("ServiceMonitor", "overspill")]
    service = objects[("Service", "overspill")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # Each gateway pod's stats port, which the bootstrap's stats listener serves.
    pods = objects[("PodMonitor", "overspill-gateway")]
    assert pods["spec"]["selector"]["matchLabels"].items() <= pod_labels(gateway).items()
    (endpoint,) = pods["spec"]["podMetricsEndpoints"]
    stats_port = next(p for c in gateway["spec"]["template"]["spec"]["containers"] for p in c["ports"]
                      if p["name"] == endpoint["port"])  # fmt: skip
    bootstrap = yaml.safe_load(
        objects[("ConfigMap", "overspill-gateway-bootstrap")]["data"]["bootstrap.yaml"]
    )
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == stats_port["containerPort"]
    assert endpoint["path"] == "/stats/prometheus"
    # Per-model series keep the model's namespace label (not exported_namespace).
    assert endpoint["honorLabels"] is True and all(e["honorLabels"] for e in monitor["spec"]["endpoints"])

    account = {"kind": "ServiceAccount", "name": "overspill", "namespace": "overspill-system"}
    for kind, name in (("ClusterRoleBinding", "overspill"), ("RoleBinding", "overspill-leader-election")):
        binding = objects[(kind, name)]
        assert binding["subjects"] == [account]
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in objects
    assert controller["spec"]["template"]["spec"]["serviceAccountName"] == "overspill"
    volumes = gateway["spec"]["template"]["spec"]["volumes"]
    assert {"name": "bootstrap", "configMap": {"name": "overspill-gateway-bootstrap"}} in volumes

    container = controller["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "serve", "--kubernetes", "--xds-port", "18000", "--metrics-port", "9102", "--leader-elect",
    ]  # fmt: skip
    assert {p["containerPort"] for p in container["ports"]} == {18000, 9102}


def test_controller_rbac_is_least_privilege(install):
    rules = by_kind(install)[("ClusterRole", "overspill")]["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    writes = {g for g in granted if g[2] not in ("get", "list", "watch")}
    assert writes == {
        ("deployment.beamlit.com", "modeldeployments/status", "patch"),
        ("deployment.beamlit.com", "modeldeployments/status", "update"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    }
    # Secrets are read (a remote's credentials), never written.
    assert {verb for group, resource, verb in granted if resource == "secrets"} == {"get", "list", "watch"}
    assert not any("*" in (group, verb) for group, _, verb in granted)
    role = by_kind(install)[("Role", "overspill-leader-election")]
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]}
    ]


def test_examples_overlay_renders_and_every_object_validates(kubectl, install):
    objects = render(kubectl, INSTALL_EXAMPLES)
    extra = [o for o in objects if o not in install]
    assert sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in extra) == [
        ("Deployment", "default", "my-model"),
        ("ModelDeployment", "default", "my-model"),
        ("Service", "default", "my-model"),
    ]
    for obj in objects:
        assert check_object(obj) == [], label(obj)
    model_deployment = parse_model_deployment(next(o for o in extra if o["kind"] == "ModelDeployment"))
    deployment = next(o for o in extra if o["kind"] == "Deployment")
    service = next(o for o in extra if o["kind"] == "Service")
    assert model_deployment.service.target_port in {p["port"] for p in service["spec"]["ports"]}
    assert model_deployment.source is not None
    assert model_deployment.source.name == deployment["metadata"]["name"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
