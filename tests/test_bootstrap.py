"""The Envoy bootstraps in envoy/ are what `overspill bootstrap` prints, and Envoy accepts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e_stack import envoy_binary
from pki import CertificateAuthority

from xds import runtime
from xds.render import ads_bootstrap

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
