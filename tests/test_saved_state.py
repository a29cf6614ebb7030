"""The offload state a restart resumes from: the state file of `--state-dir`, and a controller that
takes it up (timers on the wall clock, the decision it had, a remote it found down)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from test_store_and_directory import Clock, FakeInformer, load, model_doc, service_docs, text

from api.crd import ObjectKey, parse_observed_status
from reconciler import saved
from reconciler.controller import Controller
from reconciler.saved import StateFile, saved_fields, worth_saving
from reconciler.store import ObjectStore
from xds.snapshot import Translator

MODEL = ObjectKey("ModelDeployment", "default", "m")
OTHER = ObjectKey("ModelDeployment", "default", "other")
ENTRY = {
    "phase": "Releasing",
    "remotePercent": 50.0,
    "triggeredAt": "2026-11-28T10:00:00.000000Z",
    "overSince": None,
    "underSince": "2026-11-28T10:00:30.500000Z",
    "lastTransitionTime": "2026-11-28T10:00:30.500000Z",
}


def test_the_file_holds_what_a_restart_needs_and_is_rewritten_only_when_that_changes(tmp_path):
    state = StateFile(tmp_path)
    assert state.update([(MODEL, ENTRY), (OTHER, None)])
    assert state.writes == 1
    assert not state.update([(MODEL, dict(ENTRY)), (OTHER, None)])  # the same: no write
    assert state.writes == 1
    doc = json.loads(state.path.read_text())
    assert doc == {"format": 1, "models": {"default/m": ENTRY}}
    assert [p.name for p in tmp_path.iterdir()] == ["offload-state.json"]  # no temp file left

    restored = StateFile(tmp_path).load([MODEL])
    seen = restored[MODEL]
    assert (seen.phase, seen.remote_percent, seen.triggered) == ("Releasing", 50.0, True)
    assert seen.under_since == pytest.approx(1795860030.5)
    assert seen.last_transition == pytest.approx(1795860030.5)

    assert state.update([], removed=[MODEL])  # a deleted model leaves the file
    assert json.loads(state.path.read_text())["models"] == {}


def test_entries_of_models_no_longer_present_are_dropped(tmp_path, caplog):
    state = StateFile(tmp_path)
    state.update([(MODEL, ENTRY), (OTHER, ENTRY)])
    with caplog.at_level(logging.INFO, "overspill.state"):
        restored = StateFile(tmp_path).load([MODEL])
    assert list(restored) == [MODEL]
    assert "event=state_entries_dropped reason='no such model' count=1 names='default/other'" in caplog.text
    assert list(json.loads(state.path.read_text())["models"]) == ["default/m"]


@pytest.mark.parametrize(
    "body, error",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"[1, 2]", "not an offload state file"),
        (b'{"format": 99, "models": {}}', "not an offload state file"),
        (b'{"format": 1, "models": []}', "not an offload state file"),
        (b"", "not JSON"),
    ],
)
def test_a_corrupt_file_is_logged_and_ignored(tmp_path, caplog, body, error):
    (tmp_path / saved.FILE_NAME).write_bytes(body)
    state = StateFile(tmp_path)
    with caplog.at_level(logging.WARNING, "overspill.state"):
        assert state.load([MODEL]) == {}
    assert "event=state_unreadable" in caplog.text and error in caplog.text
    assert state.error is not None and error in state.error and "starting without saved state" in state.error
    assert state.errors == {"read": 1, "write": 0}  # /metrics: overspill_state_file_errors_total
    assert state.update([(MODEL, ENTRY)])  # and the next decision replaces it with a good one
    assert StateFile(tmp_path).load([MODEL])[MODEL].phase == "Releasing"


def test_entries_without_a_phase_are_skipped_and_the_others_kept(tmp_path, caplog):
    models = {"default/m": ENTRY, "default/other": {"remotePercent": "x"}, "default/third": 7}
    (tmp_path / saved.FILE_NAME).write_text(json.dumps({"format": 1, "models": models}))
    third = ObjectKey("ModelDeployment", "default", "third")
    with caplog.at_level(logging.WARNING, "overspill.state"):
        restored = StateFile(tmp_path).load([MODEL, OTHER, third])
    assert list(restored) == [MODEL]
    assert "event=state_entries_ignored" in caplog.text and "count=2" in caplog.text


def test_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(saved, "MAX_BYTES", 100)
    (tmp_path / saved.FILE_NAME).write_text(json.dumps({"format": 1, "models": {"default/m": ENTRY}}))
    state = StateFile(tmp_path)
    assert state.load([MODEL]) == {}
    assert "larger than 100 bytes" in state.error


def test_a_write_that_fails_is_logged_and_serving_goes_on(tmp_path, caplog):
    state = StateFile(tmp_path / "gone")  # the directory does not exist
    with caplog.at_level(logging.WARNING, "overspill.state"):
        assert not state.update([(MODEL, ENTRY)])
    assert "event=state_write_error" in caplog.text and "cannot write" in state.error
    assert state.errors == {"read": 0, "write": 1}


# --- a controller taking up saved state ---


class Process:
    """One control-plane process over the same manifests: its own store and monotonic clock (any
    base), the wall clock shared with the processes before it."""

    def __init__(self, manifests: str, informer: FakeInformer, wall: float, restored=None):
        self.store = ObjectStore()
        load(self.store, "a.yaml", manifests)
        self.clock = Clock()
        base = self.clock.now = 5.0 if restored else 1000.0
        self.controller = Controller(
            self.store,
            Translator("127.0.0.1", 10000).apply,
            informer=informer,
            clock=self.clock,
            wall=lambda: wall + self.clock.now - base,
        )
        self.controller.restored = dict(restored or {})
        self.controller.reconcile()  # the first decision, before any reading (as `serve` starts)

    @property
    def status(self):
        return self.controller.status[MODEL]

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    def fields(self) -> dict | None:
        machine = self.controller.machines.get(MODEL)
        return (
            saved_fields(self.status, machine, self.controller.to_wall)
            if worth_saving(self.status, machine)
            else None
        )

    async def evaluate(self) -> tuple[str, float]:
        await asyncio.wait_for(self.controller.evaluate(), 5)
        return self.status.phase.value, self.status.remote_percent


WALL = 1_800_000_000.0


async def test_a_restart_during_the_buffer_releases_when_the_saved_buffer_ends(tmp_path):
    manifests = text(model_doc(percentage=50, buffer=30), *service_docs())
    informer = FakeInformer(queue_depth=20)
    state = StateFile(tmp_path)
    first = Process(manifests, informer, WALL)
    assert await first.evaluate() == ("Offloading", 50.0)
    state.update([(MODEL, first.fields())])
    informer.values["queue_depth"] = 2
    first.advance(5)
    assert await first.evaluate() == ("Releasing", 50.0)  # the buffer starts now (wall +5)
    state.update([(MODEL, first.fields())])
    writes = state.writes
    for _ in range(5):  # evaluations that change nothing write nothing
        first.advance(1)
        await first.evaluate()
        state.update([(MODEL, first.fields())])
    assert state.writes == writes

    # Killed at wall +10; back at wall +20, on another monotonic clock: 15 s of the buffer are left.
    second = Process(manifests, informer, WALL + 20, restored=StateFile(tmp_path).load([MODEL]))
    assert (second.status.phase.value, second.status.remote_percent) == ("Releasing", 50.0)
    assert "releasing in 15s" in second.status.reason
    assert second.status.transitions["Releasing"] == 0  # the same decision again is no transition
    assert second.controller.routes[0].remote_percent == 50.0  # what Envoy is first sent
    second.advance(1)
    assert await second.evaluate() == ("Releasing", 50.0)
    second.advance(13.9)
    assert await second.evaluate() == ("Releasing", 50.0)
    second.advance(0.2)  # wall +35.1: 30 s after the metric went under, not 30 s after the restart
    assert await second.evaluate() == ("Standby", 0.0)


async def test_without_saved_state_a_restart_starts_all_local():
    """What the restore prevents: the same restart with nothing saved flips the model to local."""
    manifests = text(model_doc(percentage=50, buffer=30), *service_docs())
    second = Process(manifests, FakeInformer(queue_depth=2), WALL + 20)
    assert (second.status.phase.value, second.controller.routes[0].remote_percent) == ("Standby", 0.0)


async def test_a_restart_during_the_activation_delay_keeps_counting_it():
    doc = model_doc(percentage=40)
    doc["spec"]["offloadingConfig"]["behavior"]["activationDelaySeconds"] = 10
    manifests = text(doc, *service_docs())
    informer = FakeInformer(queue_depth=20)
    first = Process(manifests, informer, WALL)
    assert (await first.evaluate())[0] == "Activating"
    entry = first.fields()
    assert entry is not None and entry["overSince"]

    second = Process(manifests, informer, WALL + 6, restored={MODEL: parse_observed_status(entry)})
    assert await second.evaluate() == ("Activating", 0.0)
    second.advance(4.1)
    assert await second.evaluate() == ("Offloading", 40.0)


def test_a_remote_found_down_before_a_restart_gets_no_traffic_until_a_probe_reaches_it():
    manifests = text(model_doc(percentage=50, remote="127.0.0.1:1"), *service_docs())
    entry = dict(ENTRY, phase="RemoteUnavailable", remotePercent=0.0, underSince=None)
    second = Process(
        manifests, FakeInformer(queue_depth=20), WALL, restored={MODEL: parse_observed_status(entry)}
    )
    assert (second.status.phase.value, second.status.remote_percent) == ("RemoteUnavailable", 0.0)
    assert second.controller.routes[0].remote_percent == 0.0
