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
from e2e_stack import Model, stack, wait_until
from pki import CertificateAuthority

from overspill.demo.sim import ModelServer

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
        super().__init__(name, ready=False, remote_fields=remote_fields, **kw)

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


async def test_mtls_client_certificate_from_a_tls_secret(tmp_path):
    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.issue("remote", ips=("127.0.0.1",), server=True)
    client = ca.issue("overspill-client")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.path))
    tls.load_cert_chain(server.cert, server.key)
    tls.verify_mode = ssl.CERT_REQUIRED
    guard = GuardedServer("whisper-remote", header="x-anything", tls=tls)
    guard.accepted = {None}  # any request that got through the TLS handshake
    tls_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "remote-client-tls", "namespace": "default"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(client.cert.read_bytes()).decode(),
            "tls.key": base64.b64encode(client.key.read_bytes()).decode(),
        },
    }
    m = CredentialModel(
        "whisper",
        {"scheme": "https", "caFile": str(ca.path), "clientCertificateRef": {"name": "remote-client-tls"}},
        [tls_secret],
        guard=guard,
    )
    async with stack(tmp_path, m) as s:
        await s.wait_phase(m, {"Outage"}, OUTAGE_BUDGET)
        codes = await s.send(m, 20)
        assert set(codes) == {200}, codes
        assert guard.counts.total == 20
        key = client.key.read_text()
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
        deadline = time.monotonic() + 15
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
