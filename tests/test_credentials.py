"""Credentials from Secrets: parsing, resolution, redaction, and which nodes receive them.

What a user would notice: the errors naming the field and the Secret; no value in any repr,
error or rendered document; a node scoped to one namespace never receiving another's secret
over a real ADS stream.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

import grpc
import pytest
import yaml
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.core.v3 import Node
from envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3 import CredentialInjector
from envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3 import Generic
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret as SdsSecret
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptions
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest, DiscoveryResponse
from envoy_data_plane.google.protobuf import Any as ProtoAny
from envoy_data_plane.google.protobuf import Struct

from api.crd import InvalidObject, Spillover, parse_model_deployment, parse_remote_backend
from api.credentials import SecretValue
from api.desired import ModelRoute, model_of, service_domains, side_of
from overspill.cli import main
from reconciler.credentials import resolve
from reconciler.documents import parse_documents
from reconciler.kube import parse_secret
from reconciler.store import ObjectStore
from xds.render import served_documents
from xds.scope import Scope
from xds.server import XdsServer, start_server
from xds.snapshot import Translator
from xds.types import CLUSTER, HTTP_OPTIONS, SECRET

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
TOKEN = "tok-3f1c9a7e5b"


def remote(**fields) -> dict:
    return {"host": "standby.example.com", "scheme": "https", **fields}


def header_from(name: str = "remote-token", key: str = "token", **extra) -> dict:
    return {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}, **extra}


def secret_doc(name: str, namespace: str = "default", **data: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


# --- parsing the references ---


# A remote with every kind of credential (the fuzzed ModelDeployment of test_bad_manifests too).
CREDENTIALS = {
    "headersToAdd": [
        {"name": "x-tenant", "value": "t1"},
        {
            "name": "Authorization",
            "valueFrom": {"secretKeyRef": {"name": "remote-token", "key": "token"}},
            "valuePrefix": "Bearer ",
        },
    ],
    "authConfig": {
        "type": "oauth",
        "oauthConfig": {
            "clientId": "me",
            "clientSecretRef": {"name": "oauth", "key": "secret"},
            "tokenUrl": "https://auth.example.com/oauth/token",
            "scopes": ["infer"],
        },
    },
    "clientCertificateRef": {"name": "client-tls"},
}


def test_header_from_a_secret_oauth_and_client_certificate_parse():
    r = parse_remote_backend(remote(**CREDENTIALS), "remoteBackend")
    assert r.headers_to_add == (("x-tenant", "t1"),)  # the plain header is unchanged
    [h] = r.secret_headers
    assert (h.name, h.ref.name, h.ref.key, h.prefix) == ("Authorization", "remote-token", "token", "Bearer ")
    assert r.oauth is not None and r.oauth.client_id == "me" and r.oauth.scopes == ("infer",)
    assert r.oauth.token_host_port == ("auth.example.com", 443)
    assert [str(ref) for ref in r.secret_refs()] == [
        "remote-token/token",
        "oauth/secret",
        "client-tls/tls.crt",
        "client-tls/tls.key",
    ]


def test_the_upstream_inline_client_secret_is_taken_and_never_shown():
    doc = {"clientId": "me", "clientSecret": TOKEN, "tokenUrl": "http://127.0.0.1:9/token"}
    r = parse_remote_backend(remote(authConfig={"oauthConfig": doc}), "remoteBackend")
    assert r.oauth is not None and r.oauth.inline_secret == SecretValue(TOKEN.encode())
    assert TOKEN not in repr(r) and TOKEN not in str(r.oauth.inline_secret)
    assert r.secret_refs() == ()  # nothing to read from a Secret


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"headersToAdd": [header_from() | {"value": "x"}]},
            "remoteBackend.headersToAdd[0].value: cannot be given with valueFrom",
        ),
        (
            {"headersToAdd": [{"name": "a", "valueFrom": {}}]},
            "headersToAdd[0].valueFrom.secretKeyRef: is required",
        ),
        ({"headersToAdd": [header_from(key="a b")]}, "secretKeyRef.key: must be a Secret key"),
        ({"headersToAdd": [header_from(name="Bad_Name")]}, "secretKeyRef.name: must be a Secret name"),
        ({"headersToAdd": [header_from() | {"name": "Host"}]}, "'Host' is not a header name that can be set"),
        ({"authConfig": {"type": "basic"}}, "remoteBackend.authConfig.type: must be oauth, got 'basic'"),
        (
            {"authConfig": {"type": "oauth"}},
            "remoteBackend.authConfig.oauthConfig: is required for type oauth",
        ),
        (
            {"authConfig": {"oauthConfig": {"clientId": "c", "tokenUrl": "ftp://x/t"}}},
            "oauthConfig.tokenUrl: must be an http or https URL with a host name or IP, got 'ftp://x/t'",
        ),
        (
            {
                "authConfig": {
                    "oauthConfig": {"clientId": "c", "clientSecret": "s", "tokenUrl": "http://[::1"}
                }
            },
            "oauthConfig.tokenUrl: must be an http or https URL with a host name or IP, got 'http://[::1'",
        ),
        (
            {
                "authConfig": {
                    "oauthConfig": {"clientId": "c", "clientSecret": "s", "tokenUrl": "http://a:99999/t"}
                }
            },
            "got 'http://a:99999/t'",
        ),
        (
            {"authConfig": {"oauthConfig": {"clientId": "c", "tokenUrl": "https://a.example/t"}}},
            "oauthConfig.clientSecretRef: is required (or the upstream clientSecret)",
        ),
        (
            {"scheme": "http", "clientCertificateRef": {"name": "tls"}},
            "remoteBackend.clientCertificateRef: needs scheme https",
        ),
    ],
)
def test_bad_references_name_the_field(fields, error):
    with pytest.raises(InvalidObject) as exc:
        parse_remote_backend(remote(**fields), "remoteBackend")
    assert error in str(exc.value)


def test_the_field_path_of_a_reference_is_the_models():
    doc = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "team-a"},
        "spec": {
            "serviceRef": {"name": "m"},
            "offloadingConfig": {"remoteBackend": remote(headersToAdd=[header_from()])},
        },
    }
    model = parse_model_deployment(doc)
    [ref] = model.offloading.remote.secret_refs()
    assert ref.path == "spec.offloadingConfig.remoteBackend.headersToAdd[0].valueFrom.secretKeyRef"


# --- Secrets: parsed, resolved, never printed ---


def test_a_secret_reads_data_and_string_data_and_errors_name_the_key_only():
    s = parse_secret(secret_doc("s", token=TOKEN) | {"stringData": {"plain": "p-value"}})
    assert s.get("token") == SecretValue(TOKEN.encode()) and s.get("plain") == SecretValue(b"p-value")
    assert TOKEN not in repr(s) and "p-value" not in repr(s)
    objects, rejected = parse_documents(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {token: 'not base64 at all!'}\n", "f.yaml"
    )
    assert objects == [] and [r.errors for r in rejected] == [("default/s: data.token: is not base64",)]


def test_resolve_reads_only_the_models_namespace_and_names_what_is_missing():
    store = ObjectStore()
    store.replace_origin(
        "f",
        [
            parse_secret(secret_doc("remote-token", "team-b", token=TOKEN)),
            parse_secret(secret_doc("other", "team-a")),
        ],
    )
    r = parse_remote_backend(
        remote(headersToAdd=[header_from(), header_from("other", "k") | {"name": "x-k"}]), "remoteBackend"
    )
    resolved, errors = resolve(store, "team-a", r)
    assert resolved.secrets == ()
    assert errors == [
        "remoteBackend.headersToAdd[0].valueFrom.secretKeyRef: Secret team-a/remote-token not found",
        "remoteBackend.headersToAdd[1].valueFrom.secretKeyRef: Secret team-a/other has no key 'k'",
    ]
    resolved, errors = resolve(store, "team-b", r)
    assert resolved.secret("remote-token", "token") == SecretValue(TOKEN.encode())
    assert TOKEN not in repr(resolved)


def test_secret_and_token_cluster_names_lead_back_to_the_model():
    assert model_of("overspill/ns/m/remote/header/authorization") == ("ns", "m")
    assert model_of("overspill/ns/m/remote/token") == ("ns", "m")
    assert model_of("overspill/ns/m/routes/x") is None
    assert side_of("overspill/ns/m/remote/token") is None  # not a side: no load is counted on it


# --- served over SDS, to the nodes of the model's scope only ---


def route(namespace: str, token: str) -> ModelRoute:
    r = parse_remote_backend(remote(headersToAdd=[header_from(valuePrefix="Bearer ")]), "remoteBackend")
    r = replace(r, secrets=((("remote-token", "token"), SecretValue(token.encode())),))
    return ModelRoute(namespace, "llm", service_domains("llm", namespace, 80), (("10.0.0.1", 80),), (r,), 0.0)


def test_rotation_is_a_new_secret_version_and_the_cluster_is_untouched():
    t = Translator("127.0.0.1", 10000)
    t.publish([route("a", "one")])
    view = t.cache.view(Scope())
    name = "overspill/a/llm/remote/header/authorization"
    before_secret, before_cluster = (
        view.resources[SECRET][name],
        view.resources[CLUSTER]["overspill/a/llm/remote"],
    )
    t.publish([route("a", "two")])
    view = t.cache.view(Scope())
    assert view.resources[SECRET][name].version != before_secret.version
    assert view.resources[CLUSTER]["overspill/a/llm/remote"] is before_cluster
    assert (
        SdsSecret.FromString(wire_body(view.resources[SECRET][name].any)).generic_secret.secret.inline_bytes
        == b"two"
    )
    docs = served_documents(view)
    assert docs[SECRET] == [{"name": name, "genericSecret": {"secret": {"inlineBytes": "<redacted>"}}}]


def wire_body(any_bytes: bytes) -> bytes:
    return ProtoAny.FromString(any_bytes).value


async def test_a_node_of_namespace_a_never_receives_namespace_bs_secret():
    t = Translator("127.0.0.1", 10000)
    t.publish([route("a", "secret-of-a"), route("b", "secret-of-b")])
    server, port = await start_server(XdsServer(t.cache), "127.0.0.1", 0)
    names = ["overspill/a/llm/remote/header/authorization", "overspill/b/llm/remote/header/authorization"]

    async def secrets_for(metadata: dict) -> dict[str, bytes]:
        node = Node(id="sidecar", cluster="c", metadata=Struct.from_dict(metadata))
        request = DiscoveryRequest(node=node, type_url=SECRET, resource_names=names)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                ADS, request_serializer=bytes, response_deserializer=DiscoveryResponse.FromString
            )(iter([request]))
            response = await asyncio.wait_for(call.read(), 10)
            call.cancel()
        return {
            m.name: m.generic_secret.secret.inline_bytes
            for m in (SdsSecret.FromString(r.value) for r in response.resources)
        }

    try:
        assert await secrets_for({"overspill": {"namespaces": ["a"]}}) == {names[0]: b"secret-of-a"}
        assert await secrets_for({"overspill": {"namespaces": ["b"]}}) == {names[1]: b"secret-of-b"}
        assert set(await secrets_for({})) == set(names)  # an unscoped gateway serves both models
    finally:
        await server.stop(None)


def test_behind_an_aggregate_or_composite_each_remote_has_its_secret_and_injectors_come_before_the_script():
    """Several remotes, spill-over on: each remote's secret is named after its own cluster (so
    it is the model's); the cluster the route names injects every remote's header into internal
    names, then the script moves the chosen one's; the single remote keeps its own filters for
    the weighted route."""
    one = route("a", "one")
    two = replace(
        one.remotes[0], host="second.example.com", secrets=((("remote-token", "token"), SecretValue(b"two")),)
    )
    routes = [
        replace(one, remotes=(one.remotes[0], two)),
        replace(one, namespace="b", spillover=Spillover(enabled=True)),
    ]
    t = Translator("127.0.0.1", 10000)
    t.publish(routes)
    view = t.cache.view(Scope())
    names = [f"overspill/a/llm/remote/{i}/header/authorization" for i in (0, 1)]
    assert {n: model_of(n) for n in names} == dict.fromkeys(names, ("a", "llm"))
    values = {
        n: SdsSecret.FromString(wire_body(view.resources[SECRET][n].any)).generic_secret.secret.inline_bytes
        for n in names
    }
    assert values == dict(zip(names, (b"one", b"two"), strict=True))

    def filters(cluster: str) -> list[tuple[str, str]]:
        c = Cluster.FromString(wire_body(view.resources[CLUSTER][cluster].any))
        options = c.typed_extension_protocol_options.get(HTTP_OPTIONS)
        if options is None:
            return []
        out = []
        for f in HttpProtocolOptions.FromString(options.value).http_filters:
            kind = f.name
            if f.name == "envoy.filters.http.credential_injector":
                generic = Generic.FromString(
                    CredentialInjector.FromString(f.typed_config.value).credential.typed_config.value
                )
                kind = f"{generic.header} <- {generic.credential.name}"
            out.append(kind)
        return out

    lua = ["envoy.filters.http.lua", "envoy.filters.http.upstream_codec"]
    assert filters("overspill/a/llm/remote") == [
        "envoy.filters.http.header_mutation",
        f"x-overspill-credential-0-authorization <- {names[0]}",
        f"x-overspill-credential-1-authorization <- {names[1]}",
        *lua,
    ]
    assert filters("overspill/a/llm/remote/0") == filters("overspill/a/llm/remote/1") == []
    single = "overspill/b/llm/remote/header/authorization"
    assert filters("overspill/b/llm/spillover") == [
        "envoy.filters.http.header_mutation",
        f"x-overspill-credential-0-authorization <- {single}",
        *lua,
    ]
    assert filters("overspill/b/llm/remote") == [f"Authorization <- {single}", lua[1]]


def test_a_static_bootstrap_leaves_credentials_out_and_says_so(tmp_path, capsys):
    model = {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {
            "serviceRef": {"name": "m", "targetPort": 80},
            "offloadingConfig": {"remoteBackend": remote(headersToAdd=[header_from()])},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"ports": [{"port": 80}]},
    }
    (tmp_path / "m.yaml").write_text(
        yaml.safe_dump_all([model, service, secret_doc("remote-token", token=TOKEN)])
    )
    assert main(["render", str(tmp_path), "--bootstrap"]) == 0
    out, err = capsys.readouterr()
    assert "default/m: the remote's credentials are served over SDS only" in err
    assert "credential_injector" not in out and "sdsConfig" not in out and TOKEN not in out
    assert "overspill/default/m/remote" in out


OAUTH = {"oauthConfig": CREDENTIALS["authConfig"]["oauthConfig"]}


def model_doc(offloading: dict) -> dict:
    return {
        "apiVersion": "deployment.beamlit.com/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"serviceRef": {"name": "m"}, "offloadingConfig": offloading},
    }


@pytest.mark.parametrize(
    ("offloading", "field"),
    [
        (
            {"remoteBackends": [remote(host="first.example.com"), remote(authConfig=OAUTH)]},
            "spec.offloadingConfig.remoteBackends[1].authConfig",
        ),
        (
            {"remoteBackend": remote(authConfig=OAUTH), "behavior": {"spillover": {"enabled": True}}},
            "spec.offloadingConfig.remoteBackend.authConfig",
        ),
    ],
    ids=["several-remotes", "spillover"],
)
def test_oauth2_with_several_remotes_or_spillover_is_refused_naming_the_field(offloading, field):
    """The OAuth2 injector writes Authorization itself: on the aggregate or the composite (whose
    upstream filters are the ones Envoy runs) every attempt, another remote's or a pod's, would
    carry the token."""
    with pytest.raises(InvalidObject) as exc:
        parse_model_deployment(model_doc(offloading))
    assert f"{field}: OAuth2 client credentials are taken with one remote and spill-over off only" in str(
        exc.value
    )


@pytest.mark.parametrize(
    "offloading",
    [
        {
            "remoteBackends": [
                remote(headersToAdd=[header_from()], clientCertificateRef={"name": "tls"}),
                remote(host="second.example.com", headersToAdd=[header_from("other-token")]),
            ]
        },
        {
            "remoteBackend": remote(headersToAdd=[header_from()], clientCertificateRef={"name": "tls"}),
            "behavior": {"spillover": {"enabled": True}},
        },
    ],
    ids=["several-remotes", "spillover"],
)
def test_headers_and_client_certificates_are_taken_with_several_remotes_or_spillover(offloading):
    model = parse_model_deployment(model_doc(offloading))
    assert model.offloading is not None
    assert all(r.secret_headers for r in model.offloading.remotes)
