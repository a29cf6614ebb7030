"""The CR status writer keeps a model's writes in order: the last status decided is the one on the CR."""

from __future__ import annotations

import asyncio

from api.crd import parse_model_deployment
from reconciler.status_writer import StatusWriter


class SlowFirstApi:
    """The API side of status writes: records each patch as it lands; the first one is slow (a
    busy API server), so a write sent after it would land first if writes of a model overlapped."""

    def __init__(self) -> None:
        self.landed: list[str] = []
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def merge_patch(self, path: str, body: dict) -> dict:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.2 if self.calls == 1 else 0.0)
        self.landed.append(body["status"]["phase"])
        self.in_flight -= 1
        return body

    async def create(self, path: str, body: dict) -> dict:  # Events
        return {"metadata": {"name": "e"}}


def status(phase: str) -> dict:
    return {
        "phase": phase,
        "remotePercent": 0,
        "remote": None,
        "errors": [],
        "conditions": [{"type": "Ready", "status": "True", "reason": phase}],
    }


async def test_a_newer_status_decided_while_one_is_in_flight_lands_after_it():
    model = parse_model_deployment(
        {
            "apiVersion": "deployment.beamlit.com/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "default", "uid": "u1"},
            "spec": {"serviceRef": {"name": "m"}},
        }
    )
    api = SlowFirstApi()
    writer = StatusWriter(api)  # type: ignore[arg-type]
    writer.sync([(model, status("Standby"))])
    await asyncio.sleep(0.05)  # the first write is on its way
    writer.sync([(model, status("Outage"))])
    writer.sync([(model, status("RemoteUnavailable"))])  # replaces the one not yet sent
    await writer.drain()
    assert api.landed == ["Standby", "RemoteUnavailable"]
    assert api.most_in_flight == 1
    writer.sync([(model, status("RemoteUnavailable"))])  # what the CR shows: nothing to write
    await writer.drain()
    assert api.landed == ["Standby", "RemoteUnavailable"]
