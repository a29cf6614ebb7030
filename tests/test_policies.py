"""Policies enforced: which remotes a model's Policies allow, and what a user sees when one is refused."""

from __future__ import annotations

import asyncio
import logging

import pytest
import yaml
from seeds import SEED_001_MODEL_WITH_POLICIES, SEED_001_POLICY
from test_store_and_directory import (
    FakeInformer,
    make_controller,
    model_doc,
    routes_by_name,
    service_docs,
    text,
)

from api.crd import Flavor, Location, ObjectKey, RemoteBackend, parse_model_deployment, parse_policy
from api.status import Phase
from overspill.cli import parser
from reconciler.directory import DirectorySource
from reconciler.documents import parse_documents
from reconciler.policy import (
    REMOTE_POLICIES_HEADER,
    Resolved,
    Unresolved,
    allowed_remotes,
    with_remote_policies,
)
from reconciler.status_writer import desired_status
from reconciler.store import ObjectStore


def policy_doc(name: str, spec: dict, namespace: str = "default") -> dict:
    return {
        "apiVersion": "authorization.beamlit.com/v1alpha1",
        "kind": "Policy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def located(
    host: str = "r.example.com", flavor: tuple[str, str] | None = None, **where: str
) -> RemoteBackend:
    return RemoteBackend(
        host, 80, location=Location(**where) if where else None, flavor=Flavor(*flavor) if flavor else None
    )


SEED_POLICY = parse_policy(yaml.safe_load(SEED_001_POLICY))  # country us or continent na
EU = parse_policy(policy_doc("eu", {"type": "location", "locations": [{"type": "continent", "name": "eu"}]}))
L4 = parse_policy(policy_doc("l4", {"type": "flavor", "flavors": [{"type": "gpu", "name": "nvidia-l4"}]}))


def verdict(remotes, *policies, unresolved=()):
    return allowed_remotes(remotes, Resolved(tuple(policies), tuple(unresolved)))


# --- the rules ---


def test_a_location_policy_allows_a_remote_at_any_listed_place_case_insensitively():
    us, canada, upper = located(country="us"), located(country="ca", continent="na"), located(country="US")
    assert verdict([us, canada, upper], SEED_POLICY).allowed == (us, canada, upper)


def test_a_remote_elsewhere_or_without_a_location_is_refused_naming_the_policy_and_the_rule():
    germany, nowhere = located("de.example.com", country="de", continent="eu"), located("x.example.com")
    v = verdict([germany, nowhere], SEED_POLICY)
    assert v.allowed == ()
    assert [(r.remote, r.policy, r.reason) for r in v.refused] == [
        ("http://de.example.com", "default/my-policy", "PolicyViolation"),
        ("http://x.example.com", "default/my-policy", "PolicyViolation"),
    ]
    assert v.refused[0].message == (
        "remote http://de.example.com does not satisfy Policy default/my-policy: location country=us or "
        "continent=na required, remote is at country=de, continent=eu"
    )
    assert "remote is at no declared location" in v.refused[1].message


def test_every_attached_policy_must_be_met():
    eu_cpu = located(country="de", continent="eu", flavor=("cpu", "epyc"))
    eu_l4 = located("l4.example.com", country="fr", continent="EU", flavor=("GPU", "NVIDIA-L4"))
    v = verdict([eu_cpu, eu_l4], EU, L4)
    assert v.allowed == (eu_l4,)
    (refusal,) = v.refused  # met the location Policy, not the flavor one
    assert refusal.policy == "default/l4"
    assert refusal.message.endswith("flavor gpu/nvidia-l4 required, remote runs cpu/epyc")
    assert verdict([eu_cpu], L4).refused[0].message.endswith("runs cpu/epyc")
    assert "runs no declared flavor" in verdict([located(country="de")], L4).refused[0].message


def test_upstream_shapes_named_locations_and_both_kinds_in_one_policy():
    named = parse_policy(
        policy_doc(
            "p",
            {
                "type": "location",
                "locations": [{"type": "location", "name": "eu-west"}],
                "flavors": [{"type": "tpu", "name": "v5e"}],  # free text upstream
            },
        )
    )
    both = located(name="EU-West", flavor=("tpu", "v5e"))
    wrong_flavor = located(name="eu-west", flavor=("gpu", "h100"))
    wrong_place = located(country="eu-west", flavor=("tpu", "v5e"))  # a country is not a named location
    v = verdict([both, wrong_flavor, wrong_place], named)
    assert v.allowed == (both,)
    assert [r.reason for r in v.refused] == ["PolicyViolation", "PolicyViolation"]


def test_a_policy_that_cannot_be_read_allows_no_remote():
    missing = Unresolved("default/eu", "PolicyNotFound", "Policy default/eu not found")
    v = verdict([located(continent="eu"), located("b.example.com", continent="eu")], EU, unresolved=[missing])
    assert v.allowed == ()
    assert {(r.remote, r.reason) for r in v.refused} == {
        ("http://r.example.com", "PolicyNotFound"),
        ("http://b.example.com", "PolicyNotFound"),
    }
    assert verdict([located()]).allowed == (located(),)  # no Policy: no constraint


def test_references_default_to_remote_policies_as_upstream_and_remotes_declare_where_they_are():
    doc = yaml.safe_load(SEED_001_MODEL_WITH_POLICIES)
    doc["spec"]["policies"].append({"name": "no-ref-type"})
    doc["spec"]["offloadingConfig"]["remoteBackend"] = {
        "host": "standby.example.com",
        "location": {"country": "DE", "continent": "eu"},
        "flavor": {"type": "gpu", "name": "nvidia-l4"},
    }
    model = parse_model_deployment(doc)
    assert [(p.refType, p.name) for p in model.policies] == [
        ("localPolicy", "my-policy"),
        ("remotePolicy", "my-policy-on-beamlit"),
        ("remotePolicy", "no-ref-type"),
    ]
    remote = model.offloading.remote
    assert (remote.location, remote.flavor) == (Location("DE", "eu"), Flavor("gpu", "nvidia-l4"))
    headed = with_remote_policies(remote, ["a", "b"])
    assert headed.headers_to_add[-1] == (REMOTE_POLICIES_HEADER, "a,b")
    assert with_remote_policies(remote, []) is remote


# --- directory mode: what a user sees ---

MODEL = ObjectKey("ModelDeployment", "default", "m")
REMOTE = "standby.eu.example:8443"  # never probed here: a remote is usable until probes find it down


def eu_model(remote: str) -> dict:
    doc = model_doc(percentage=40, remote=remote)
    doc["spec"]["offloadingConfig"]["remoteBackend"]["location"] = {"country": "de", "continent": "eu"}
    doc["spec"]["policies"] = [
        {"refType": "localPolicy", "name": "eu-only"},
        {"refType": "remotePolicy", "name": "gdpr-on-remote"},
    ]
    return doc


def eu_only(*locations: tuple[str, str]) -> dict:
    rules = [{"type": t, "name": n} for t, n in locations]
    return policy_doc("eu-only", {"type": "location", "locations": rules})


async def test_directory_mode_holds_offloading_until_the_policy_exists_and_enforces_its_edits(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="overspill.reconciler")
    (tmp_path / "m.yaml").write_text(text(eu_model(REMOTE), *service_docs()))
    # A model beside it, with no Policy: a Policy's changes never decide it.
    (tmp_path / "other.yaml").write_text(text(model_doc(name="other", service="s2"), *service_docs("s2")))
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    source.sync()
    controller, _, clock = make_controller(store, FakeInformer(queue_depth=50))  # over its target of 10
    decided: list[list[str]] = []
    controller.on_reconciled = lambda items, removed: decided.append([m.key.name for m, _, _ in items])
    registry = controller.instruments.registry
    refused_metric = {
        "namespace": "default",
        "name": "m",
        "remote": f"http://{REMOTE}",
        "policy": "default/eu-only",
    }

    def condition() -> dict:
        status = controller.status[MODEL]
        doc = desired_status(store.get(MODEL), status, controller.machines.get(MODEL), controller.to_wall)
        return {c["type"]: c for c in doc["conditions"]}["RemoteAllowed"]

    # The Policy does not exist yet: an error naming it, and no traffic to the remote.
    await asyncio.wait_for(controller.evaluate(), 5)
    status = controller.status[MODEL]
    assert status.phase == Phase.REMOTE_DOWN and status.remote_percent == 0
    assert status.reason.endswith(
        "the remote is unavailable: refused by Policy default/eu-only (PolicyNotFound)"
    )
    assert status.errors == ["default/m: spec.policies: Policy default/eu-only not found"]
    route = routes_by_name(controller)["m"]
    assert (route.remote, route.remote_percent) == (None, 0.0)
    assert routes_by_name(controller)["other"].remote_percent == 50  # unbound, offloading beside it
    cond = condition()
    assert (cond["status"], cond["reason"]) == ("False", "PolicyNotFound")
    assert "Policy default/eu-only not found" in cond["message"]
    assert cond["message"].endswith("enforced by the remote: gdpr-on-remote")
    assert (
        registry.get_sample_value(
            "overspill_model_remote_refused", {**refused_metric, "reason": "PolicyNotFound"}
        )
        == 1
    )
    assert (
        registry.get_sample_value("overspill_model_config_errors", {"namespace": "default", "name": "m"}) == 1
    )
    assert (
        "event=remote_refused policy=default/eu-only reason=PolicyNotFound count=1 names='default/m'"
        in caplog.text
    )
    doc = status.to_dict()
    assert doc["policies"]["enforcedRemotely"] == ["gdpr-on-remote"]
    assert doc["policies"]["refused"][0]["reason"] == "PolicyNotFound"

    # The Policy file appears: the model is decided again at once, and offloads.
    (tmp_path / "policy.yaml").write_text(text(eu_only(("continent", "eu"))))
    decided.clear()
    source.sync()
    controller.reconcile()
    assert decided == [["m"]]  # only the model naming it
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent, status.errors) == (Phase.OFFLOADING, 40.0, [])
    route = routes_by_name(controller)["m"]
    assert route.remote.port == 8443 and route.remote_percent == 40.0
    assert (REMOTE_POLICIES_HEADER, "gdpr-on-remote") in route.remote.headers_to_add
    assert (condition()["status"], condition()["reason"]) == ("True", "PoliciesMet")
    assert (
        registry.get_sample_value(
            "overspill_model_remote_refused", {**refused_metric, "reason": "PolicyNotFound"}
        )
        is None
    )
    assert "event=remote_refusal_ended policy=default/eu-only reason=PolicyNotFound" in caplog.text

    # The Policy is edited to the US only: the German remote is refused, with the rule it misses.
    (tmp_path / "policy.yaml").write_text(text(eu_only(("country", "us"))))
    source.sync()
    controller.reconcile()
    status = controller.status[MODEL]
    assert (status.phase, status.remote_percent) == (Phase.REMOTE_DOWN, 0.0)
    assert routes_by_name(controller)["m"].remote is None
    cond = condition()
    assert (cond["status"], cond["reason"]) == ("False", "PolicyViolation")
    assert "location country=us required, remote is at country=de, continent=eu" in cond["message"]
    assert (
        registry.get_sample_value(
            "overspill_model_remote_refused", {**refused_metric, "reason": "PolicyViolation"}
        )
        == 1
    )

    assert caplog.text.count("event=remote_refusal_ended") == 1  # not for an edit that still refuses
    (tmp_path / "policy.yaml").write_text(text(eu_only(("country", "fr"))))  # another refusing edit
    source.sync()
    controller.reconcile()
    assert caplog.text.count("event=remote_refusal_ended") == 1
    assert "location country=fr required" in caplog.text.splitlines()[-1]

    # Deleted: held off again.
    (tmp_path / "policy.yaml").unlink()
    source.sync()
    controller.reconcile()
    assert condition()["reason"] == "PolicyNotFound"
    assert routes_by_name(controller)["m"].remote is None
    clock.now += 1
    assert routes_by_name(controller)["other"].remote_percent == 50


def test_an_invalid_policy_is_named_as_invalid_and_holds_offloading():
    store = ObjectStore()
    bad = policy_doc("eu-only", {"type": "location", "locations": [{"type": "planet", "name": "earth"}]})
    body = text(eu_model(REMOTE), *service_docs(), bad)
    store.replace_origin("a.yaml", *parse_documents(body, "a.yaml"))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    status = controller.status[MODEL]
    (refusal,) = status.refused
    assert refusal.reason == "PolicyInvalid"
    assert "Policy default/eu-only is invalid: " in refusal.message and "planet" in refusal.message
    assert routes_by_name(controller)["m"].remote is None


@pytest.mark.parametrize("refs", [[], [{"refType": "remotePolicy", "name": "only-remote"}]])
def test_without_local_policies_the_remote_is_used_as_before(refs):
    store = ObjectStore()
    doc = model_doc(remote=REMOTE)
    doc["spec"]["policies"] = refs
    store.replace_origin("a.yaml", *parse_documents(text(doc, *service_docs()), "a.yaml"))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    status = controller.status[MODEL]
    assert status.refused == [] and status.errors == []
    assert routes_by_name(controller)["m"].remote is not None


def serve_default_remote(url: str) -> RemoteBackend | None:
    return parser().parse_args(["serve", "--kubernetes", "--default-remote", url]).default_remote


def test_the_default_remote_url_can_say_where_it_is_and_what_it_runs(capsys):
    remote = serve_default_remote(
        "https://standby.example:8443/v1?country=DE&continent=eu&flavor=gpu/nvidia-l4"
    )
    assert (remote.url, remote.location, remote.flavor) == (
        "https://standby.example:8443/v1",
        Location("DE", "eu"),
        Flavor("gpu", "nvidia-l4"),
    )
    assert verdict([remote], EU, L4).allowed == (remote,)
    assert serve_default_remote("http://h.example").location is None
    for bad, why in (
        ("http://h.example?planet=mars", "unknown query planet"),
        ("http://h.example?flavor=gpu", "--default-remote.flavor.name: is required"),
    ):
        with pytest.raises(SystemExit):
            serve_default_remote(bad)
        assert why in capsys.readouterr().err


@pytest.mark.parametrize("rule,spills", [(("continent", "eu"), True), (("country", "us"), False)])
def test_a_remote_a_policy_refuses_gets_no_spill_overs_either(rule, spills):
    doc = eu_model(REMOTE)
    doc["spec"]["offloadingConfig"]["behavior"]["spillover"] = {"enabled": True}
    store = ObjectStore()
    store.replace_origin("a.yaml", *parse_documents(text(doc, *service_docs(), eu_only(rule)), "a.yaml"))
    controller, _, _ = make_controller(store)
    controller.reconcile()
    route = routes_by_name(controller)["m"]
    assert (route.spillover is not None, controller.status[MODEL].to_dict()["spillover"]) == (spills, spills)
    if spills:  # the remote policies it passes on reach spilled requests too (see xds.spillover)
        assert (REMOTE_POLICIES_HEADER, "gdpr-on-remote") in route.remote.headers_to_add
