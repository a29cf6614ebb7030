"""The alerts (manifests/prometheus/overspill-rules.yaml) as Prometheus runs them: `promtool check
rules` accepts them, `promtool test rules` fires each on its situation and keeps it quiet beside
it, the PrometheusRule carries the same groups, and every metric they read is one we export.

Run as a script, it prints the PrometheusRule for the rules file:
    .venv/bin/python tests/test_alert_rules.py > manifests/install/base/prometheusrule.yaml
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from e2e_stack import missing
from prometheus_client import generate_latest

from metrics.instruments import Instruments
from overspill.demo.procs import PROMETHEUS_HINT, ComponentMissing, find_binary

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "manifests" / "prometheus" / "overspill-rules.yaml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "overspill-rules-test.yaml"
PROMETHEUS_RULE = ROOT / "manifests" / "install" / "base" / "prometheusrule.yaml"
HEADER = """\
# Prometheus Operator: Overspill's alerts (README, "Alerts"). spec.groups is exactly
# manifests/prometheus/overspill-rules.yaml's groups (tests/test_alert_rules.py checks it); after
# changing the rules file, regenerate this one with:
#   .venv/bin/python tests/test_alert_rules.py > manifests/install/base/prometheusrule.yaml
# Your Prometheus picks it up if its ruleSelector matches these labels (kube-prometheus-stack
# selects `release: <its release name>` by default: add that label here or in an overlay).
"""
# Envoy's names the alerts read (tests/test_e2e_observability.py sees them in a real Envoy's output).
ENVOY_METRICS = {"envoy_cluster_upstream_rq_total"}


def prometheus_rule() -> str:
    """The PrometheusRule object carrying the rules file's groups, as committed."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None  # expressions stay readable
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "overspill",
            "namespace": "overspill-system",
            "labels": {"app.kubernetes.io/name": "overspill", "app.kubernetes.io/component": "controller"},
        },
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }
    return HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=120)


def promtool() -> str:
    try:
        return find_binary("promtool", PROMETHEUS_HINT, after=[Path("/usr/bin/promtool")])
    except ComponentMissing as exc:
        missing(exc)  # fails under CI, skips elsewhere
        raise


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_accepts_the_rules():
    result = run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_each_alert_fires_on_its_situation_and_stays_quiet_beside_it():
    result = run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert is tested both ways: some case expects it firing, some case expects it quiet.
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    names = [a["alert"] for a in alerts()]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == set(names) and quiet == set(names), (set(names) - fired, set(names) - quiet)
    assert len(names) == len(set(names))


def test_a_broken_expectation_fails(tmp_path):
    """promtool really compares: the same tests against rules that never fire fail."""
    quiet = yaml.safe_load(RULES.read_text())
    for rule in quiet["groups"][0]["rules"]:
        rule["expr"] = "vector(1) == 0"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(quiet))
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = run("test", "rules", str(tmp_path / "test.yaml"))
    assert result.returncode != 0
    assert result.stdout.count("FAILED") + result.stderr.count("FAILED") >= 1


def test_the_prometheus_rule_carries_the_same_groups():
    committed = PROMETHEUS_RULE.read_text()
    assert committed == prometheus_rule(), (
        "stale: regenerate with `.venv/bin/python tests/test_alert_rules.py > "
        "manifests/install/base/prometheusrule.yaml`"
    )
    assert yaml.safe_load(committed)["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def exported_names() -> set[str]:
    """Every sample name the control plane's /metrics can show (families print even when empty)."""
    instruments = Instruments()
    instruments.watch_controller(lambda: [], lambda: 0)
    instruments.watch_load(lambda: {}, lambda: 0)
    instruments.watch_origins(lambda: {})
    names = set()
    for line in generate_latest(instruments.registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {"counter": ["", "_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
            names |= {name + s for s in suffixes}
    return names


def test_every_metric_the_alerts_read_is_exported():
    exported = exported_names() | ENVOY_METRICS
    for alert in alerts():
        used = set(re.findall(r"\b(?:overspill|envoy)_[a-z0-9_]+\b", alert["expr"]))
        assert used <= exported, (alert["alert"], used - exported)


if __name__ == "__main__":
    sys.stdout.write(prometheus_rule())
