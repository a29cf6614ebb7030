"""The Envoy bootstraps in envoy/ are what `overspill bootstrap` prints, and Envoy accepts them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from e2e_stack import envoy_binary

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
