"""Policies end to end: real Envoy, real Prometheus, the real control plane in directory mode;
what reaches each remote is counted at the remote."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from e2e_stack import SWITCH_BUDGET, Model, delta, stack, totals, wait_until

pytestmark = pytest.mark.e2e

IN_THE_US = {"location": {"country": "us", "continent": "na"}}


def eu_only(*continents: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "authorization.beamlit.com/v1alpha1",
            "kind": "Policy",
            "metadata": {"name": "eu-only", "namespace": "default"},
            "spec": {"type": "location", "locations": [{"type": "continent", "name": c} for c in continents]},
        }
    )


async def test_an_eu_bound_model_sends_nothing_to_a_us_remote_under_burst_while_its_neighbour_offloads(
    tmp_path,
):
    policies = [{"refType": "localPolicy", "name": "eu-only"}, {"refType": "remotePolicy", "name": "gdpr"}]
    bound = Model("eu-llm", percentage=50, policies=policies, remote_fields=IN_THE_US)
    free = Model("free-llm", percentage=50, remote_fields=IN_THE_US)
    async with stack(tmp_path, bound, free) as s:
        (s.manifests / "eu-only.yaml").write_text(eu_only("eu"))

        async def refused() -> list[dict]:
            return ((await s.model_status(bound)).get("policies") or {}).get("refused") or []

        deadline = asyncio.get_running_loop().time() + 10
        while [r["reason"] for r in await refused()] != ["PolicyViolation"]:
            assert asyncio.get_running_loop().time() < deadline, await s.model_status(bound)
            await asyncio.sleep(0.1)

        # A burst on both: the metric goes over its target for each.
        s.knob.set(bound.name, 50)
        s.knob.set(free.name, 50)
        await s.wait_phase(free, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await s.wait_phase(bound, {"RemoteUnavailable"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)  # the routes are in Envoy
        before = {m.name: totals(m) for m in (bound, free)}
        bound_codes, free_codes = await asyncio.gather(s.send(bound, 600), s.send(free, 600))
        assert bound_codes.count(200) == 600 and free_codes.count(200) == 600
        bound_local, bound_remote = delta(bound, before[bound.name])
        free_local, free_remote = delta(free, before[free.name])
        print(
            f"burst: EU-bound model {bound_remote}/600 to its US remote, "
            f"unbound model {free_remote}/600 to its remote"
        )
        assert (bound_local, bound_remote) == (600, 0)
        assert bound.remote.counts.total == 0, "nothing ever reached the US remote"
        assert 0.35 <= free_remote / 600 <= 0.65

        # What the user sees: the CLI, /metrics and the log name the Policy and the rule.
        out = await s.overspill_status()
        assert (
            f"PolicyViolation: remote http://{bound.remote.address}/standby does not satisfy Policy "
            "default/eu-only: location continent=eu required, remote is at country=us, continent=na"
        ) in out
        assert "enforced by the remote: gdpr" in out
        metrics = await s.control_plane.metrics_text()
        assert (
            'overspill_model_remote_refused{name="eu-llm",namespace="default",policy="default/eu-only",'
            f'reason="PolicyViolation",remote="http://{bound.remote.address}/standby"}} 1.0'
        ) in metrics
        assert (
            "event=remote_refused policy=default/eu-only reason=PolicyViolation" in s.control_plane.log_text()
        )

        # The Policy now allows North America too: the model offloads without a restart, and the
        # remote is told which of its own policies apply.
        (s.manifests / "eu-only.yaml").write_text(eu_only("eu", "na"))
        await s.wait_phase(bound, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)
        before_bound = totals(bound)
        codes = await s.send(bound, 400)
        assert codes.count(200) == 400
        _, remote = delta(bound, before_bound)
        assert 0.35 <= remote / 400 <= 0.65, remote
        await wait_until(lambda: bool(bound.remote.counts.recent), 2, "a request at the remote")
        assert bound.remote.counts.recent[-1].headers.get("x-overspill-remote-policies") == "gdpr"
        assert "x-overspill-remote-policies" not in free.remote.counts.recent[-1].headers
