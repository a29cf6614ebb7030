"""Credentials from Secrets, end to end: real Envoy, the real control plane, remotes that check them.

The model's pods are all unready (an outage), so every request goes to its remote, which answers
401 to any request without the credential it expects. The Secret is a YAML file in the manifests
directory; rewriting it is a rotation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from e2e_stack import Model, open_loop, stack, wait_until
from pki import CertificateAuthority

from overspill.demo.sim import ModelServer
from xds.credentials import CREDENTIAL_HEADER, internal_header

OUTAGE_BUDGET = 15.0  # from start to the model routing everything to its remote


class GuardedServer(ModelServer):
    """A remote that serves only requests whose header `header` is one of `accepted`, and
    (with `ssl`) only over TLS with a client certificate its CA signed."""

    def __init__(self, name: str, header: str = "authorization", tls: ssl.SSLContext | None = None):
        super().__init__(name, None, 0.0)
        self.header = header
        self.accepted: set[str] = set()
        self.refused = 0
        self.tls = tls

    async def _serve(self, request: web.Request) -> web.Response:
        if request.headers.get(self.header) not in self.accepted:
            self.refused += 1
            return web.Response(status=401, text="credential required\n")
        return await super()._serve(request)

    async def start(self, port: int = 0) -> int:
        if self.tls is None:
            return await super().start(port)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.tls).start()
        self.port = self._runner.addresses[0][1]
        return self.port


class CredentialModel(Model):
    """A model whose remote is a `GuardedServer`, with its Secrets in its manifest file."""

    def __init__(self, name: str, remote_fields: dict, secrets: list[dict], **kw):
        self.secrets = secrets
        self.guard: GuardedServer = kw.pop("guard", None) or GuardedServer(f"{name}-remote")
        super().__init__(name, **{"ready": False, **kw}, remote_fields=remote_fields)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.remote = self.guard

    def manifests(self) -> list[dict]:
        return [*self.secrets, *super().manifests()]


def secret(name: str, namespace: str = "default", **data: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def burst(s, m: Model, seconds: float, codes: list[int], concurrency: int = 8) -> None:
    """Requests to the model, `concurrency` at a time, for `seconds`; every status code kept."""
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline:
            codes.append((await s.request(m.host))[0])

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def rendered(manifests: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "overspill", "render", str(manifests), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_header_from_a_secret_reaches_the_remote_and_a_rotation_needs_no_restart(tmp_path, delta):
    one, two = f"tok-one-{uuid.uuid4().hex}", f"tok-two-{uuid.uuid4().hex}"
    m = CredentialModel(
        "llm",
        {
            "headersToAdd": [
                {"name": "x-offloaded-by", "value": "overspill"},
                {
                    "name": "Authorization",
                    "valueFrom": {"secretKeyRef": {"name": "remote-token", "key": "token"}},
                    "valuePrefix": "Bearer ",
                },
            ]
        },
        [secret("remote-token", token=one)],
    )
    m.guard.accepted = {bearer(one)}
    async with stack(tmp_path, m, delta=delta) as s:
        await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
        envoy_pid = s.envoy.pid
        # A client's own Authorization never reaches the remote: Envoy overwrites it.
        async with s.session.post(
            f"{s.url}/v1/predict", headers={"Host": m.host, "Authorization": "Bearer client"}, data=b"{}"
        ) as resp:
            assert resp.status == 200
        assert m.guard.counts.recent[-1].headers["authorization"] == bearer(one)
        assert m.guard.counts.recent[-1].headers["x-offloaded-by"] == "overspill"

        # Rotate mid-burst: the provider accepts both tokens for a while, as providers do.
        m.guard.accepted.add(bearer(two))
        codes: list[int] = []
        load = asyncio.create_task(burst(s, m, 6.0, codes))
        await asyncio.sleep(1.5)
        m.secrets = [secret("remote-token", token=two)]
        m.write(s.manifests)
        rotated = time.monotonic()
        await wait_until(
            lambda: any(r.headers.get("authorization") == bearer(two) for r in m.guard.counts.recent),
            10,
            "a request carrying the rotated token",
        )
        print(f"rotation reached the remote {time.monotonic() - rotated:.2f}s after the Secret changed")
        await load
        assert codes and set(codes) == {200}, f"{len(codes)} requests: {sorted(set(codes))}"
        assert m.guard.refused == 0
        # From now on only the new token: the old one no longer works and nothing fails.
        m.guard.accepted = {bearer(two)}
        assert set(await s.send(m, 50)) == {200}
        assert {r.headers["authorization"] for r in list(m.guard.counts.recent)[-50:]} == {bearer(two)}
        assert s.envoy.pid == envoy_pid, "Envoy was not restarted"
        s.envoy.check_alive("after the rotation")
        stats = await s.envoy.stats()
        print(f"{len(codes)} requests in the burst, all 200; sds stats: "
              f"{ {k: v for k, v in stats.items() if 'sds' in k and 'update_success' in k} }")  # fmt: skip

        # The values are nowhere but at Envoy: not in the log, /status, `overspill status`, render.
        status = json.dumps(await s.control_plane.status())
        for text in (s.control_plane.log_text(), status, await s.overspill_status(), rendered(s.manifests)):
            for token in (one, two):
                assert token not in text
                assert base64.b64encode(token.encode()).decode() not in text
        assert "<redacted>" in rendered(s.manifests)


class TokenEndpoint:
    """An OAuth2 token endpoint: the client credentials grant, the client authenticated either way
    RFC 6749 allows (HTTP Basic, or `client_id` and `client_secret` in the form); a new token per grant."""

    def __init__(self, client_id: str, client_secret: str):
        self.client = (client_id, client_secret)
        self.expected = "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.issued: list[str] = []
        self.refused = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        basic = request.headers.get("Authorization") == self.expected
        posted = (form.get("client_id"), form.get("client_secret")) == self.client
        if not (basic or posted) or form.get("grant_type") != "client_credentials":
            self.refused += 1
            return web.json_response({"error": "invalid_client"}, status=401)
        self.issued.append(f"issued-{uuid.uuid4().hex}")
        return web.json_response(
            {"access_token": self.issued[-1], "token_type": "Bearer", "expires_in": 3600}
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/oauth/token", self.token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_oauth2_client_credentials_fetch_a_token_that_the_remote_receives(tmp_path):
    client_secret = f"client-secret-{uuid.uuid4().hex}"
    endpoint = TokenEndpoint("overspill-client", client_secret)
    await endpoint.start()
    try:
        m = CredentialModel(
            "bert",
            {
                "authConfig": {
                    "type": "oauth",
                    "oauthConfig": {
                        "clientId": "overspill-client",
                        "clientSecretRef": {"name": "oauth-client", "key": "secret"},
                        "tokenUrl": f"http://127.0.0.1:{endpoint.port}/oauth/token",
                    },
                }
            },
            [secret("oauth-client", secret=client_secret)],
        )

        class Issued(set):
            def __contains__(self, value: object) -> bool:
                return value in {bearer(t) for t in endpoint.issued}

        m.guard.accepted = Issued()
        async with stack(tmp_path, m) as s:
            await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
            await wait_until(lambda: bool(endpoint.issued), 10, "Envoy fetching a token")
            codes = await s.send(m, 40)
            assert set(codes) == {200}, codes
            assert m.guard.refused == 0
            assert {r.headers["authorization"] for r in m.guard.counts.recent} <= {
                bearer(t) for t in endpoint.issued
            }
            assert endpoint.refused == 0
            assert client_secret not in s.control_plane.log_text()
            assert client_secret not in json.dumps(await s.control_plane.status())
    finally:
        await endpoint.stop()


def tls_remote(ca: CertificateAuthority, name: str) -> tuple[GuardedServer, dict, Path]:
    """A remote serving TLS that takes only client certificates `ca` signed, and the Secret of
    one such certificate, and its key file."""
    server, client = ca.issue(name, ips=("127.0.0.1",), server=True), ca.issue(f"{name}-client")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.path))
    tls.load_cert_chain(server.cert, server.key)
    tls.verify_mode = ssl.CERT_REQUIRED
    guard = GuardedServer(name, header="x-anything", tls=tls)
    guard.accepted = {None}  # any request that got through the TLS handshake
    tls_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{name}-tls", "namespace": "default"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(client.cert.read_bytes()).decode(),
            "tls.key": base64.b64encode(client.key.read_bytes()).decode(),
        },
    }
    return guard, tls_secret, client.key


async def test_mtls_client_certificate_from_a_tls_secret(tmp_path):
    ca = CertificateAuthority(tmp_path / "pki")
    guard, tls_secret, key_file = tls_remote(ca, "whisper-remote")
    m = CredentialModel(
        "whisper",
        {"scheme": "https", "caFile": str(ca.path), "clientCertificateRef": {"name": "whisper-remote-tls"}},
        [tls_secret],
        guard=guard,
    )
    async with stack(tmp_path, m) as s:
        await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
        codes = await s.send(m, 20)
        assert set(codes) == {200}, codes
        assert guard.counts.total == 20
        key = key_file.read_text()
        assert key.splitlines()[1] not in s.control_plane.log_text()
        assert key.splitlines()[1] not in rendered(s.manifests)


async def test_a_missing_secret_holds_offloading_and_says_which(tmp_path):
    m = CredentialModel(
        "gpt",
        {
            "headersToAdd": [
                {"name": "x-api-key", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}
            ]
        },
        [],
        guard=GuardedServer("gpt-remote", header="x-api-key"),
    )
    async with stack(tmp_path, m) as s:
        deadline = time.monotonic() + OUTAGE_BUDGET
        status: dict = {}
        while time.monotonic() < deadline:
            status = await s.model_status(m)
            if status.get("errors"):
                break
            await asyncio.sleep(0.1)
        assert any(
            "remoteBackend.headersToAdd[0].valueFrom.secretKeyRef: Secret default/absent not found" in e
            for e in status["errors"]
        ), status
        assert status["remoteUsable"] is False
        assert "event=credentials_unreadable model=default/gpt" in s.control_plane.log_text()
        assert 'overspill_model_config_errors{name="gpt",namespace="default"} 1.0' in (
            await s.control_plane.metrics_text()
        )
        # The Secret appears: offloading starts with it.
        m.secrets = [secret("absent", k="now-here")]
        m.guard.accepted = {"now-here"}
        m.write(s.manifests)
        await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
        codes = await s.send(m, 10)
        assert set(codes) == {200}, codes


async def test_kubernetes_secret_referenced_by_the_model_is_watched_and_its_rotation_reaches_envoy(tmp_path):
    """`kubectl apply` of a Secret and of the model's reference to it, against the API server
    double: the referenced Secret is fetched and watched, an edit of it is a rotation."""
    import test_kubernetes as kube  # the module, so that its tests are not collected here again

    one, two = f"key-one-{uuid.uuid4().hex}", f"key-two-{uuid.uuid4().hex}"

    def key_secret(value: str) -> str:
        doc = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "remote-key", "namespace": "default"},
            "stringData": {"api-key": value},
        }
        return yaml.safe_dump(doc)

    async with asyncio.timeout(120), kube.kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        remote = {
            "host": k.remote.address,
            "headersToAdd": [
                {"name": "x-api-key", "valueFrom": {"secretKeyRef": {"name": "remote-key", "key": "api-key"}}}
            ],
        }
        patch = json.dumps({"spec": {"offloadingConfig": {"remoteBackend": remote}}})
        await k.api.kubectl("patch", "md", "my-model", "--type", "merge", "-p", patch)
        k.api.patch("endpointslices", "my-model-abcde", {"endpoints": []})

        def remote_condition() -> dict:
            found = [c for c in k.md_status().get("conditions", []) if c["type"] == "RemoteAvailable"]
            return found[0] if found else {}

        # Referred to before it exists: said on the CR's status, and nothing goes to the remote.
        await k.until(
            lambda: (
                (remote_condition().get("reason"), k.md_status().get("phase"))
                == ("CredentialsUnreadable", "RemoteUnavailable")
            ),
            15,
            "the credentials reported unreadable, and no traffic to the remote",
        )
        assert "Secret default/remote-key not found" in remote_condition()["message"]
        await k.api.kubectl("apply", "-f", "-", input=key_secret(one))
        await k.until(lambda: k.md_status().get("phase") == "Outage", 15, "Outage")
        # The status is the control plane's; Envoy takes the weight a moment later (the pods
        # are gone, so a request before it is a 503 from the local side, not a credentials fault).
        deadline = time.monotonic() + 15
        while await k.runtime_weight() != 100:
            assert time.monotonic() < deadline, "Envoy never took the outage's weight"
            await asyncio.sleep(0.05)
        while time.monotonic() < deadline:
            assert set(await k.send(8)) == {200}
            if k.remote.counts.recent and k.remote.counts.recent[-1].headers.get("x-api-key") == one:
                break
        assert k.remote.counts.recent[-1].headers.get("x-api-key") == one
        envoy_pid = k.envoy.pid

        await k.api.kubectl("apply", "-f", "-", input=key_secret(two))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert set(await k.send(8)) == {200}  # nothing fails while the key changes
            if k.remote.counts.recent[-1].headers.get("x-api-key") == two:
                break
        assert set(await k.send(16)) == {200}  # requests sent after it carry the new key only
        assert {r.headers.get("x-api-key") for r in list(k.remote.counts.recent)[-16:]} == {two}
        assert k.envoy.pid == envoy_pid
        plane = k.planes[0]
        stored = json.dumps(k.api.get("modeldeployments", "my-model"))
        for text in (plane.log_text(), stored, json.dumps(await plane.status())):
            assert one not in text and two not in text


# --- several remotes, spill-over: each remote its own credentials, and only its own ---


class GuardedRemotes(CredentialModel):
    """A model whose remotes are A (`guard`) then B (`backup`), both `GuardedServer`s, with
    `fields[i]` the i-th remote's fields."""

    def __init__(
        self, name: str, fields: list[dict], secrets: list[dict], a: GuardedServer, b: GuardedServer
    ):
        self.fields, self.backup = fields, b
        super().__init__(name, fields[0], secrets, guard=a)

    def manifests(self) -> list[dict]:
        docs = super().manifests()
        config = docs[-1]["spec"]["offloadingConfig"]
        second = {"host": self.backup.address, "scheme": "http", "pathPrefix": "/backup", **self.fields[1]}
        config["remoteBackends"] = [config.pop("remoteBackend"), second]
        return docs


def token_header(secret_name: str) -> dict:
    ref = {"secretKeyRef": {"name": secret_name, "key": "token"}}
    return {"name": "Authorization", "valueFrom": ref, "valuePrefix": "Bearer "}


def internal_headers(server: ModelServer) -> set[str]:
    """Names of the internal headers any recent request to `server` carried (none, always)."""
    return {k for r in server.counts.recent for k in r.headers if k.lower().startswith("x-overspill")}


async def test_each_of_two_remotes_receives_its_own_token_and_never_the_others(tmp_path):
    ta, tb = f"tok-a-{uuid.uuid4().hex}", f"tok-b-{uuid.uuid4().hex}"
    a, b = GuardedServer("llm-a"), GuardedServer("llm-b")
    a.accepted, b.accepted = {bearer(ta)}, {bearer(tb)}  # B refuses A's token
    fields = [{"headersToAdd": [token_header("token-a")]}, {"headersToAdd": [token_header("token-b")]}]
    m = GuardedRemotes("llm", fields, [secret("token-a", token=ta), secret("token-b", token=tb)], a, b)
    # A client that sends the internal headers itself, to either remote's name: overwritten.
    forged = {
        "Host": m.host,
        "Authorization": "Bearer client",
        internal_header(0, "Authorization"): bearer("forged-a"),
        internal_header(1, "Authorization"): bearer("forged-b"),
    }

    async def send(s, n: int) -> list[int]:
        codes = []
        for _ in range(n):
            async with s.session.post(f"{s.url}/v1/predict", headers=forged, data=b"{}") as resp:
                codes.append(resp.status)
        return codes

    await b.start()
    try:
        async with stack(tmp_path, m) as s:
            await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
            assert set(await send(s, 20)) == {200}
            assert (a.counts.total, a.refused, b.counts.total) == (20, 0, 0)
            assert set(a.counts.header_values("authorization")) == {bearer(ta)}

            await a.stop()
            codes = await send(s, 20)
            assert set(codes) == {200}, codes  # a request that finds A down is retried on B
            assert (b.counts.total, b.refused) == (20, 0), "B got its own token on every request"
            assert set(b.counts.header_values("authorization")) == {bearer(tb)}
            assert (b.counts.recent[-1].path, b.counts.recent[-1].host) == ("/backup/v1/predict", b.address)
            assert internal_headers(a) == internal_headers(b) == set(), CREDENTIAL_HEADER
            for token in (ta, tb):
                assert token not in s.control_plane.log_text()
                assert token not in rendered(s.manifests)
    finally:
        await a.stop()
        await b.stop()


async def test_spilled_requests_carry_the_remotes_token_and_the_pods_never_see_it(tmp_path):
    """Pods that shed past 6 requests at once take a burst: what they turn away Envoy retries on
    the remote (through the composite cluster), with the remote's token; the pods' own requests,
    shed ones included, go as the client sent them. A second model with spill-over on is in an
    outage: its weighted remote route names the remote's own cluster, whose filters inject."""
    token = f"tok-{uuid.uuid4().hex}"
    fields = {"headersToAdd": [token_header("token")]}
    spill = CredentialModel(
        "spill", fields, [secret("token", token=token)], ready=True, spillover={"enabled": True}
    )
    spill.local.shed_limit = 6
    spill.local.service_time = spill.guard.service_time = 0.1
    spill.guard.accepted = {bearer(token)}
    out = CredentialModel("out", fields, [secret("token", token=token)], spillover={"enabled": True})
    out.guard.accepted = {bearer(token)}
    async with stack(tmp_path, spill, out) as s:
        await s.wait_phase(out, {"Outage"}, OUTAGE_BUDGET)
        assert (await s.model_status(spill))["spillover"] is True
        # Served by a pod: the client's own Authorization reaches it as it came.
        async with s.session.post(
            f"{s.url}/v1/predict", headers={"Host": spill.host, "Authorization": "Bearer client"}, data=b"{}"
        ) as resp:
            assert resp.status == 200
        assert spill.local.counts.recent[-1].headers["authorization"] == "Bearer client"

        codes = await open_loop(s, spill, 100, 2.0)
        assert set(codes) == {200}, sorted(set(codes))
        assert spill.local.counts.shed > 0 and spill.guard.counts.total == spill.local.counts.shed
        assert spill.guard.refused == 0
        assert set(spill.guard.counts.header_values("authorization")) == {bearer(token)}
        assert bearer(token) not in spill.local.counts.header_values("authorization")
        assert internal_headers(spill.local) == internal_headers(spill.guard) == set()

        assert set(await s.send(out, 10)) == {200}
        assert (out.guard.counts.total, out.guard.refused) == (10, 0)
        assert set(out.guard.counts.header_values("authorization")) == {bearer(token)}


async def test_two_remotes_each_with_its_own_client_certificate(tmp_path):
    """A and B trust different CAs: B's handshake fails with A's certificate, so B serving after
    A is gone shows each remote's cluster presented its own."""
    ca_a, ca_b = CertificateAuthority(tmp_path / "pki-a"), CertificateAuthority(tmp_path / "pki-b")
    (a, secret_a, _), (b, secret_b, _) = tls_remote(ca_a, "remote-a"), tls_remote(ca_b, "remote-b")
    fields = [
        {"scheme": "https", "caFile": str(ca.path), "clientCertificateRef": {"name": f"{g.name}-tls"}}
        for ca, g in ((ca_a, a), (ca_b, b))
    ]
    m = GuardedRemotes("whisper", fields, [secret_a, secret_b], a, b)
    await b.start()
    try:
        async with stack(tmp_path, m) as s:
            await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
            assert set(await s.send(m, 20)) == {200}
            assert (a.counts.total, b.counts.total) == (20, 0)
            await a.stop()
            codes = [(await s.request(m.host))[0] for _ in range(20)]
            assert set(codes) == {200}, codes
            assert b.counts.total == 20
    finally:
        await a.stop()
        await b.stop()
