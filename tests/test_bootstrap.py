"""The Envoy bootstraps in envoy/ are what `overspill bootstrap` prints, and Envoy accepts them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from e2e_stack import envoy_binary, missing
from pki import CertificateAuthority

from overspill.demo.procs import ComponentMissing, Envoy, free_port
from overspill.demo.sim import ModelServer
from xds import runtime
from xds.render import ads_bootstrap
from xds.stats import HCM, ROUTER

ENVOY_DIR = Path(__file__).resolve().parent.parent / "envoy"
CASES = {
    "bootstrap.yaml": {},
    "sidecar.yaml": dict(node_id="sidecar", node_cluster="team-a", admin_port=9902, delta=True,
                         namespaces=["team-a"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_checked_in_bootstrap_is_the_generated_one(name):
    assert yaml.safe_load((ENVOY_DIR / name).read_text()) == ads_bootstrap(**CASES[name])


def test_bootstrap_lists_every_weight_layer_then_the_admin_layer():
    layers = ads_bootstrap()["layered_runtime"]["layers"]
    assert [layer["name"] for layer in layers] == [*runtime.layer_names(), "admin"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_envoy_accepts_the_bootstrap(name):
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_DIR / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_tls_bootstrap_names_the_ca_the_client_certificate_and_the_server_name(tmp_path):
    ca = CertificateAuthority(tmp_path)
    client = ca.issue("sidecar", uris=("spiffe://cluster.local/ns/team-a/sa/default",))
    flags = [
        "--xds-ca",
        str(ca.path),
        "--xds-client-cert",
        str(client.cert),
        "--xds-client-key",
        str(client.key),
    ]
    printed = tmp_path / "bootstrap.yaml"
    printed.write_text(bootstrap_output(["--xds-host", "overspill.overspill-system.svc", *flags]))
    socket = yaml.safe_load(printed.read_text())["static_resources"]["clusters"][0]["transport_socket"]
    context = socket["typed_config"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert context["sni"] == "overspill.overspill-system.svc"
    common = context["common_tls_context"]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": str(ca.path)},
        "match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": "overspill.overspill-system.svc"}}
        ],
    }
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": str(client.cert)}, "private_key": {"filename": str(client.key)}}
    ]
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(printed)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # An address is matched as an IP SAN, and sent as no SNI; without client files, TLS only.
    doc = yaml.safe_load(bootstrap_output(["--xds-ca", str(ca.path)]))
    context = doc["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
    assert "sni" not in context and "tls_certificates" not in context["common_tls_context"]
    assert context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}
    ]


def test_default_bootstrap_has_no_tls_and_half_tls_flags_are_refused():
    assert "transport_socket" not in bootstrap_output([])
    for flags, error in (
        (["--xds-ca", "ca.pem", "--xds-client-cert", "c.pem"], "--xds-client-cert and --xds-client-key go"),
        (["--xds-client-cert", "c.pem", "--xds-client-key", "k.pem"], "TLS flags need --xds-ca"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "overspill", "bootstrap", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and error in result.stderr, result.stderr


def bootstrap_output(flags: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "overspill", "bootstrap", *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# Model cluster names -> the labels their stats carry: a dotted model name, one of several remotes
# (xds.failover), and a kind of cluster that does not exist yet.
ODD_CLUSTERS = {
    "overspill/team-a/llama.v2/local": 'namespace="team-a",model="llama.v2",side="local"}',
    "overspill/team-b/m/remote/1": 'namespace="team-b",model="m",side="remote",remote_index="1"}',
    "overspill/team-a/llama/spill-0": 'namespace="team-a",model="llama",side="spill-0"}',
}


def odd_bootstrap(path: Path, backend: int, listener: int, stats: int) -> Path:
    """The gateway bootstrap with `--stats-port`, plus a static listener routing /0, /1, /2 to
    clusters named as in ODD_CLUSTERS (the control plane's own are as in test_e2e_observability)."""
    doc = ads_bootstrap(stats_port=stats)
    # No control plane here: without its xDS parts Envoy starts at once (they would wait 15 s each).
    for part in ("dynamic_resources", "cluster_manager", "layered_runtime"):
        del doc[part]
    doc["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = (
        "127.0.0.1"  # loopback only
    )
    names = list(ODD_CLUSTERS)
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": f"type.googleapis.com/{ROUTER}"}}
    routes = [
        {"match": {"prefix": f"/{i}"}, "route": {"cluster": n, "prefix_rewrite": "/"}}
        for i, n in enumerate(names)
    ]
    hcm = {
        "@type": f"type.googleapis.com/{HCM}",
        "stat_prefix": "odd",
        "http_filters": [router],
        "route_config": {"virtual_hosts": [{"name": "odd", "domains": ["*"], "routes": routes}]},
    }
    doc["static_resources"]["listeners"].append(
        {
            "name": "odd",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
            ],
        }
    )
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend}}}
    doc["static_resources"]["clusters"] += [
        {"name": n, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": n, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]}}
        for n in names
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_envoy_labels_any_model_cluster_and_the_stats_port_serves_only_its_page(tmp_path):
    backend = ModelServer("backend", None, 0.0)
    await backend.start()
    listener, stats = free_port(), free_port()
    try:
        async with (
            aiohttp.ClientSession() as session,
            Envoy(
                free_port(), bootstrap=odd_bootstrap(tmp_path / "b.yaml", backend.port, listener, stats)
            ) as envoy,
        ):
            for i in range(len(ODD_CLUSTERS)):
                for _ in range(i + 1):
                    async with session.get(f"http://127.0.0.1:{listener}/{i}") as resp:
                        assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{stats}/stats/prometheus") as resp:
                assert resp.status == 200
                page = await resp.text()
            for i, labels in enumerate(ODD_CLUSTERS.values()):
                # Envoy's own cluster name label (cut at the first dot), then exactly ours.
                name = r'^envoy_cluster_upstream_rq_total\{envoy_cluster_name="[^"]*",'
                series = rf"{name}{re.escape(labels)} {i + 1}$"
                assert re.search(series, page, re.M), [line for line in page.splitlines() if labels in line]
            # A model cluster's pre-traffic stats are left out (each one would cost Envoy a
            # std::regex run per tag); its traffic stats and other clusters' stats are kept.
            for kept in ("envoy_cluster_upstream_rq_xx{", "envoy_cluster_upstream_rq_time_bucket{"):
                assert any(line.startswith(kept) and 'model="llama"' in line for line in page.splitlines()), (
                    kept
                )
            for quiet in ("circuit_breakers", "lb_healthy_panic", "update_success", "max_host_weight",
                          "membership"):  # fmt: skip
                ours = [line for line in page.splitlines() if quiet in line and 'model="' in line]
                assert ours == [], ours
            for other in ("lb_healthy_panic", "membership_healthy"):
                assert f'envoy_cluster_{other}{{envoy_cluster_name="overspill_admin"}}' in page, other
            # The admin's other endpoints are not on the stats port; the admin itself still has them.
            for method, path in (
                ("GET", "/quitquitquit"),
                ("POST", "/quitquitquit"),
                ("POST", "/runtime_modify?a=1"),
                ("POST", "/stats/prometheus"),
                ("GET", "/stats"),
            ):
                async with session.request(method, f"http://127.0.0.1:{stats}{path}") as resp:
                    assert resp.status == 404, (method, path)
            assert "envoy_server_live" in await envoy.admin_get("/stats/prometheus")
    except ComponentMissing as exc:
        missing(exc)
    finally:
        await backend.stop()
