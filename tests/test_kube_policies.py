"""Policies in Kubernetes mode: `kubectl apply` of a ModelDeployment naming a Policy that does not
exist yet, then of the Policy, then of an edit to it; what the CR's status says and what reaches
the remote (real kubectl, the kube-apiserver double, the real control plane and a real Envoy)."""

from __future__ import annotations

import asyncio

import yaml
from seeds import SEED_001_MODEL
from test_kubernetes import kube_stack


def remote_allowed(status: dict) -> dict:
    return {c["type"]: c for c in status.get("conditions", [])}.get("RemoteAllowed", {})


def policy(*locations: tuple[str, str]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "authorization.beamlit.com/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "eu-only", "namespace": "default"},
            "spec": {"type": "location", "locations": [{"type": t, "name": n} for t, n in locations]},
        }
    )


async def test_a_missing_policy_holds_offloading_until_kubectl_applies_it_and_edits_are_enforced(tmp_path):
    async with asyncio.timeout(120), kube_stack(tmp_path) as k:
        await k.until(lambda: k.md_status().get("phase") == "Standby", 15, "Standby")
        bound = yaml.safe_load(SEED_001_MODEL)
        bound["spec"]["policies"] = [
            {"refType": "localPolicy", "name": "eu-only"},
            {"name": "gdpr-on-remote"},  # refType defaults to remotePolicy, as upstream
        ]
        bound["spec"]["offloadingConfig"]["remoteBackend"] = {
            "host": k.remote.address,
            "location": {"country": "de", "continent": "eu"},
        }
        await k.api.kubectl("apply", "-f", "-", input=yaml.safe_dump(bound))
        await k.until(
            lambda: remote_allowed(k.md_status()).get("reason") == "PolicyNotFound", 10, "PolicyNotFound"
        )
        status = k.md_status()
        assert remote_allowed(status)["status"] == "False"
        assert "Policy default/eu-only not found" in remote_allowed(status)["message"]
        assert "default/my-model: spec.policies: Policy default/eu-only not found" in status["errors"]
        assert status["policies"]["enforcedRemotely"] == ["gdpr-on-remote"]

        # A burst: offloading is wanted but held off, nothing reaches the remote.
        k.cpu(480)
        await k.until(lambda: k.md_status().get("phase") == "RemoteUnavailable", 15, "held off")
        assert set(await k.send(100)) == {200}
        assert k.remote.counts.total == 0

        # kubectl apply of the Policy: the model offloads, no restart.
        await k.api.kubectl("apply", "-f", "-", input=policy(("continent", "eu")))
        await k.until(lambda: k.md_status().get("phase") == "Offloading", 15, "Offloading")
        assert remote_allowed(k.md_status())["reason"] == "PoliciesMet"
        await asyncio.sleep(1.0)  # the route reaches Envoy
        assert set(await k.send(200)) == {200}
        assert k.remote.counts.total > 40
        headers = k.remote.counts.recent[-1].headers
        assert headers.get("x-overspill-remote-policies") == "gdpr-on-remote"

        # An edit that excludes the remote: refused again, with the rule it misses.
        await k.api.kubectl("apply", "-f", "-", input=policy(("country", "us")))
        await k.until(
            lambda: remote_allowed(k.md_status()).get("reason") == "PolicyViolation", 10, "violation"
        )
        message = remote_allowed(k.md_status())["message"]
        assert "does not satisfy Policy default/eu-only: location country=us required" in message
        await k.until(lambda: k.md_status().get("phase") == "RemoteUnavailable", 10, "held off again")
        await asyncio.sleep(1.0)
        before = k.remote.counts.total
        assert set(await k.send(100)) == {200}
        assert k.remote.counts.total == before

        _, described, _ = await k.api.kubectl("describe", "md", "my-model")
        events = described.split("Events:")[-1]
        assert "PolicyNotFound" in events and "PolicyViolation" in events

        # Deleted: not found again.
        await k.api.kubectl("delete", "policy", "eu-only")
        await k.until(lambda: remote_allowed(k.md_status()).get("reason") == "PolicyNotFound", 10, "deleted")
