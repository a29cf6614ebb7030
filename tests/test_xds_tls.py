"""xDS over TLS and mTLS: the real `overspill serve` with real certificates, simulated Envoys on
real gRPC TLS channels, and a real Envoy started from the bootstrap `overspill bootstrap` prints.

Under mTLS a node receives what its metadata asks for within what its certificate allows; a
node asking beyond it is logged and counted. The server's certificate files are re-read when
they change, so new connections get the new certificate without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from e2e_stack import Model, missing
from pki import CertificateAuthority, Pair

from api.desired import cluster_name
from overspill.demo.procs import ComponentMissing, ControlPlaneProcess, Envoy, free_port
from overspill.sim.envoy import SimEnvoy
from xds.identity import IdentityRules
from xds.types import CLUSTER

GATEWAY_SPIFFE = "spiffe://cluster.local/ns/overspill-system/sa/overspill-gateway"


@dataclass
class Pki:
    """A CA and the certificates the tests present: the server's, a gateway's, sidecars' for
    namespace `a` (SPIFFE ID) and `b` (DNS name), and one naming no namespace."""

    ca: CertificateAuthority
    server: Pair
    gateway: Pair
    sidecar_a: Pair
    sidecar_b: Pair
    anonymous: Pair

    def credentials(self, client: Pair | None, ca: Path | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            (ca or self.ca.path).read_bytes(),
            client.key.read_bytes() if client else None,
            client.cert.read_bytes() if client else None,
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path / "pki")
    return Pki(
        ca,
        ca.issue("server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        ca.issue("gateway", uris=(GATEWAY_SPIFFE,)),
        ca.issue("sidecar-a", uris=("spiffe://cluster.local/ns/a/sa/default",)),
        ca.issue("sidecar-b", dns=("sidecar.b.svc.cluster.local",)),
        ca.issue("anonymous"),
    )


MODELS = (Model("alpha", "a"), Model("beta", "b"))


def clusters_of(*models: Model) -> set[str]:
    return {cluster_name(m.namespace, m.name, side) for m in models for side in ("local", "remote")}


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, pki: Pki, *flags: str, mutual: bool = True, client_ca: Path | None = None
) -> AsyncIterator[ControlPlaneProcess]:
    """`overspill serve` over models in namespaces a and b, its xDS port TLS (mTLS by default)."""
    manifests = tmp_path / "manifests"
    manifests.mkdir(exist_ok=True)
    started = []
    try:
        for m in MODELS:
            for server in (m.local, m.remote):
                await server.start()
                started.append(server)
            m.write(manifests)
        tls = ["--xds-tls-cert", str(pki.server.cert), "--xds-tls-key", str(pki.server.key)]
        if mutual:
            tls += [
                "--xds-client-ca",
                str(client_ca or pki.ca.path),
                "--xds-gateway-identity",
                GATEWAY_SPIFFE,
            ]
        async with ControlPlaneProcess(manifests, extra_args=(*tls, *flags)) as cp:
            yield cp
    finally:
        for server in started:
            await server.stop()


@contextlib.asynccontextmanager
async def node(cp: ControlPlaneProcess, node_id: str, credentials, **kwargs) -> AsyncIterator[SimEnvoy]:
    c = SimEnvoy(f"127.0.0.1:{cp.xds_port}", node_id=node_id, credentials=credentials, **kwargs)
    await c.start()
    try:
        yield c
    finally:
        await asyncio.wait_for(c.stop(), 10)


def took_clusters(n: SimEnvoy) -> bool:
    """Whether the node has taken a CDS response (perhaps an empty one)."""
    return any(r.type_url == CLUSTER for r in n.received)


async def metric(cp: ControlPlaneProcess, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{cp.metrics_url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def log_lines(cp: ControlPlaneProcess, event: str) -> list[str]:
    assert cp.log_path is not None
    return [line for line in cp.log_path.read_text().splitlines() if f"event={event} " in line]


# --- scope from identity (simulated Envoys) ---


async def test_a_sidecar_certificate_bounds_what_its_metadata_asks_for(tmp_path, pki):
    a, b = MODELS
    async with serving(tmp_path, pki) as cp:
        creds = pki.credentials(pki.sidecar_a)
        # Asking for a and b with a certificate for a: a's models only.
        async with node(
            cp, "sidecar-a-asks-ab", creds, metadata={"overspill": {"namespaces": ["a", "b"]}}
        ) as n:
            await n.wait(lambda n: bool(n.held[CLUSTER]))
            await asyncio.sleep(0.5)  # nothing more is coming
            assert set(n.held[CLUSTER]) == clusters_of(a)
        # Asking for b only with a certificate for a: nothing at all, not b's models.
        async with node(cp, "sidecar-a-asks-b", creds, metadata={"overspill": {"namespaces": ["b"]}}) as n:
            await n.wait(took_clusters)
            await asyncio.sleep(0.5)
            assert set(n.held[CLUSTER]) == set()
        # Asking for nothing in particular: what the certificate allows.
        async with node(cp, "sidecar-a-plain", creds) as n:
            await n.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a))
            status = await cp.status()
            (described,) = [d for d in status["nodes"] if d["id"] == "sidecar-a-plain"]
            assert described["identity"] == "spiffe://cluster.local/ns/a/sa/default"
            assert described["scope"] == "namespaces=a"
            shown = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "overspill", "status", "--url", cp.metrics_url,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out = (await asyncio.wait_for(shown.communicate(), 60))[0].decode()
            assert re.search(
                r"sidecar-a-plain +sotw +namespaces=a .*\n  identity spiffe://cluster.local/ns/a/sa/default",
                out,
            )

        denied = log_lines(cp, "scope_denied")
        assert len(denied) == 2, denied
        assert (
            "node=sidecar-a-asks-ab identity=spiffe://cluster.local/ns/a/sa/default asked=a,b granted=a"
            in (denied[0])
        )
        assert (
            "node=sidecar-a-asks-b identity=spiffe://cluster.local/ns/a/sa/default asked=b granted=-"
            in (denied[1])
        )
        assert await metric(cp, "overspill_xds_scope_denied_total") == 2


async def test_gateway_and_dns_identities_and_a_certificate_naming_no_namespace(tmp_path, pki):
    a, b = MODELS
    async with serving(tmp_path, pki) as cp:
        async with node(cp, "gateway", pki.credentials(pki.gateway)) as n:
            await n.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))
        # A DNS SAN <name>.<ns>.svc.<cluster domain> names namespace b; asking for a gets nothing of a.
        meta = {"overspill": {"namespaces": "a,b"}}
        async with node(cp, "sidecar-b", pki.credentials(pki.sidecar_b), metadata=meta) as n:
            await n.wait(lambda n: bool(n.held[CLUSTER]))
            await asyncio.sleep(0.5)
            assert set(n.held[CLUSTER]) == clusters_of(b)
        async with node(cp, "anonymous", pki.credentials(pki.anonymous)) as n:
            await n.wait(took_clusters)
            await asyncio.sleep(0.5)
            assert set(n.held[CLUSTER]) == set()
        denied = log_lines(cp, "scope_denied")
        assert [
            re.search(r"node=(\S+) identity=(\S+) asked=(\S+) granted=(\S+)", d).groups() for d in denied
        ] == [
            ("sidecar-b", "sidecar.b.svc.cluster.local", "a,b", "b"),
            ("anonymous", "CN=anonymous", "*", "-"),
        ]
        assert await metric(cp, "overspill_xds_scope_denied_total") == 2


async def test_mtls_refuses_a_client_without_a_certificate_or_with_another_ca(tmp_path, pki):
    other = CertificateAuthority(tmp_path / "other", "other-ca")
    stranger = other.issue("stranger", uris=(GATEWAY_SPIFFE,))
    async with serving(tmp_path, pki) as cp:
        for name, creds in (
            ("no-cert", pki.credentials(None)),
            ("other-ca", pki.credentials(stranger)),
            ("plaintext", None),
        ):
            async with node(cp, name, creds) as n:
                with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                    await n.wait(lambda n: bool(n.received), timeout=10)
                assert not n.held[CLUSTER]
        assert (await cp.status())["nodes"] == []


async def test_plain_tls_serves_every_node_by_its_metadata(tmp_path, pki):
    a, b = MODELS
    async with serving(tmp_path, pki, mutual=False) as cp:
        async with node(cp, "tls-gateway", pki.credentials(None)) as n:
            await n.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))
        meta = {"overspill": {"namespaces": ["b"]}}
        async with node(cp, "tls-sidecar", pki.credentials(None), metadata=meta) as n:
            await n.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(b))
        async with node(cp, "plaintext", None) as n:  # TLS is not optional once configured
            with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                await n.wait(lambda n: bool(n.received))
        assert any("xds_security=tls " in line for line in log_lines(cp, "started"))


# --- rotation ---


async def presented_certificate(port: int, ca: Path, client: Pair) -> bytes:
    """The DER certificate the server presents to a new TLS connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"), 10
    )
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


async def test_rotated_server_certificate_reaches_new_connections_without_restart(tmp_path, pki):
    a, b = MODELS
    new_ca = CertificateAuthority(tmp_path / "new", "new-ca")
    both = tmp_path / "both-cas.pem"  # clients trust the old and the new CA during a rotation
    both.write_bytes(pki.ca.path.read_bytes() + new_ca.path.read_bytes())
    async with serving(tmp_path, pki) as cp:
        pid = cp.proc.pid
        assert await presented_certificate(cp.xds_port, both, pki.gateway) == pki.server.der
        async with node(cp, "before", pki.credentials(pki.gateway)) as before:
            await before.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))

            # Half a rotation: a new certificate with the old key. Not taken; the old one stays.
            half = new_ca.issue("server-new", dns=("localhost",), ips=("127.0.0.1",), server=True)
            pki.server.cert.write_bytes(half.cert.read_bytes())
            assert await presented_certificate(cp.xds_port, both, pki.gateway) == pki.server.der
            assert len(log_lines(cp, "xds_tls_reload_failed")) == 1

            # The whole rotation, written in place as a Secret update lands.
            rotated = new_ca.issue(
                "server", dns=("localhost",), ips=("127.0.0.1",), server=True,
                cert_path=pki.server.cert, key_path=pki.server.key,
            )  # fmt: skip
            assert await presented_certificate(cp.xds_port, both, pki.gateway) == rotated.der
            # A node trusting only the new CA gets its config; one trusting only the old is refused.
            async with node(cp, "after", pki.credentials(pki.gateway, ca=new_ca.path)) as after:
                await after.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))
            async with node(cp, "stale", pki.credentials(pki.gateway)) as stale:
                with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                    await stale.wait(lambda n: bool(n.received))
            # The stream opened before the rotation is still served.
            assert not before.ended
            assert "before" in {d["id"] for d in (await cp.status())["nodes"]}
        assert cp.proc.pid == pid and cp.proc.returncode is None
        assert len(log_lines(cp, "xds_tls_reloaded")) == 1


async def test_a_rotated_client_ca_decides_which_client_certificates_new_connections_accept(tmp_path, pki):
    a, b = MODELS
    new_ca = CertificateAuthority(tmp_path / "new", "new-clients-ca")
    new_gateway = new_ca.issue("new-gateway", uris=(GATEWAY_SPIFFE,))
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(pki.ca.path.read_bytes())
    async with serving(tmp_path, pki, client_ca=client_ca) as cp:
        async with node(cp, "old-client", pki.credentials(pki.gateway)) as n:
            await n.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))
            with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                async with node(cp, "new-client-early", pki.credentials(new_gateway)) as early:
                    await early.wait(lambda n: bool(n.received))

            client_ca.write_bytes(new_ca.path.read_bytes())  # the client CA is now only the new one
            async with node(cp, "new-client", pki.credentials(new_gateway)) as fresh:
                await fresh.wait(lambda n: set(n.held[CLUSTER]) == clusters_of(a, b))
            async with node(cp, "old-client-again", pki.credentials(pki.gateway)) as again:
                with pytest.raises(ConnectionError, match="UNAVAILABLE"):
                    await again.wait(lambda n: bool(n.received))
            assert not n.ended  # the stream opened before keeps being served


def test_serve_refuses_unusable_tls_files_naming_them(tmp_path, pki):
    missing_key = tmp_path / "nope.key"
    result = subprocess.run(
        [sys.executable, "-m", "overspill", "serve", "--manifests", str(tmp_path), "--xds-port", "0",
         "--metrics-port", str(free_port()), "--xds-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
         "--xds-tls-cert", str(pki.server.cert), "--xds-tls-key", str(missing_key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"{missing_key}: No such file or directory" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "overspill", "serve", "--manifests", str(tmp_path),
         "--xds-client-ca", str(pki.ca.path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--xds-client-ca needs --xds-tls-cert and --xds-tls-key" in result.stderr


# --- identity rules ---


def test_identity_rules_read_spiffe_ids_and_service_dns_names():
    rules = IdentityRules(gateways=("spiffe://*/ns/overspill-system/sa/overspill-gateway",))

    def identify(uris=(), dns=(), cn=b"x"):
        auth = {"x509_pem_cert": [b"-"], "x509_common_name": [cn]}
        auth["peer_uri"] = [u.encode() for u in uris]
        auth["peer_dns"] = [d.encode() for d in dns]
        return rules.identify(auth)

    assert rules.identify({"transport_security_type": [b"ssl"]}) is None  # no client certificate
    assert identify([GATEWAY_SPIFFE]).namespaces is None
    assert identify(["spiffe://td/ns/team-a/sa/x"]).namespaces == {"team-a"}
    assert identify(dns=["pod.team-b.svc", "pod.team-c.svc.cluster.local"]).namespaces == {"team-b", "team-c"}
    # Not namespaces: another path layout, another scheme, a bare service name, an invalid name.
    assert (
        identify(["spiffe://td/sa/x", "https://td/ns/a", "spiffe://td/ns/Bad_Name/sa/x"]).namespaces == set()
    )
    assert identify(dns=["svc.cluster.local", "a.svc", "x.team-a.svc.example.org"]).namespaces == set()
    assert identify(cn=b"gateway").name == "CN=gateway"


# --- a real Envoy over mTLS, from `overspill bootstrap` ---


def printed_bootstrap(path: Path, *flags: str) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "overspill", "bootstrap", *flags], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    path.write_text(out.stdout)
    return path


@pytest.mark.e2e
async def test_real_envoys_over_mtls_gateway_gets_all_sidecar_only_its_namespace(tmp_path, pki):
    a, b = MODELS
    tls = ["--xds-ca", str(pki.ca.path), "--xds-server-name", "127.0.0.1"]
    gateway_boot = printed_bootstrap(
        tmp_path / "gateway.yaml", *tls, "--xds-client-cert", str(pki.gateway.cert),
        "--xds-client-key", str(pki.gateway.key),
    )  # fmt: skip
    sidecar_port = free_port()
    sidecar_boot = printed_bootstrap(
        tmp_path / "sidecar.yaml", *tls, "--xds-client-cert", str(pki.sidecar_a.cert),
        "--xds-client-key", str(pki.sidecar_a.key), "--node-id", "sidecar-a", "--namespaces", "a,b",
        "--listener-port", str(sidecar_port),
    )  # fmt: skip
    assert yaml.safe_load(gateway_boot.read_text())["static_resources"]["clusters"][0]["transport_socket"]
    async with serving(tmp_path, pki) as cp, contextlib.AsyncExitStack() as es:
        try:
            gateway = await es.enter_async_context(
                Envoy(cp.xds_port, bootstrap=gateway_boot, node_id="gateway")
            )
            sidecar = await es.enter_async_context(
                Envoy(cp.xds_port, bootstrap=sidecar_boot, node_id="sidecar-a")
            )
        except ComponentMissing as exc:
            missing(exc)
        await gateway.wait_listener(cp.listener_port)
        await sidecar.wait_listener(sidecar_port)
        session = await es.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))

        async def call(port: int, m: Model) -> int:
            url = f"http://127.0.0.1:{port}/v1/predict"
            async with session.post(url, headers={"Host": m.host}, data=b"{}") as resp:
                return resp.status

        for m in (a, b):
            before = m.local.counts.total
            assert [await call(cp.listener_port, m) for _ in range(5)] == [200] * 5
            assert m.local.counts.total - before == 5
        before = a.local.counts.total, b.local.counts.total
        assert await call(sidecar_port, a) == 200
        assert await call(sidecar_port, b) == 404  # b's routes never reached the sidecar
        assert (a.local.counts.total - before[0], b.local.counts.total - before[1]) == (1, 0)

        def active(text: str) -> set[str]:
            return {line.split("::")[0] for line in text.splitlines() if "::" in line} & clusters_of(a, b)

        assert active(await gateway.admin_get("/clusters")) == clusters_of(a, b)
        assert active(await sidecar.admin_get("/clusters")) == clusters_of(a)
        ssl_stats = await gateway.admin_get("/stats?filter=cluster.xds_cluster.ssl.handshake")
        assert re.search(r"ssl\.handshake: [1-9]", ssl_stats), ssl_stats
        denied = log_lines(cp, "scope_denied")
        assert len(denied) == 1 and "node=sidecar-a " in denied[0] and "asked=a,b granted=a" in denied[0]
