"""The offload state a restart resumes from, and where a manifests directory keeps it.

Both modes save the same fields: phase, remote share, and the state machine's timers as
wall-clock timestamps. In Kubernetes mode they are part of each ModelDeployment's status
(`status_writer`); with a manifests directory they go to one JSON file under `--state-dir`
(`StateFile`). Either way they are read back (`api.crd.parse_observed_status`) before the
first decision, so a restart neither flips a model to local and back nor restarts a delay
or a buffer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from api.crd import ObjectKey, ObservedStatus, format_time, parse_observed_status
from api.status import ModelStatus, Phase
from reconciler.logs import some
from reconciler.offload import OffloadMachine

log = logging.getLogger("overspill.state")
FILE_NAME = "offload-state.json"
FORMAT = 1
MAX_BYTES = 16 << 20  # a bigger file is no state file of ours: about 100,000 offloading models


def saved_fields(
    status: ModelStatus, machine: OffloadMachine | None, to_wall: Callable[[float], float]
) -> dict:
    """The status fields a restart resumes from (times as RFC 3339, microseconds)."""

    def when(t: float | None) -> str | None:
        return None if t is None else format_time(to_wall(t), micro=True)

    return {
        "phase": status.phase.value,
        "remotePercent": status.remote_percent,
        "triggeredAt": when(machine.triggered_at) if machine and machine.triggered else None,
        "overSince": when(machine.over_since) if machine else None,
        "underSince": when(machine.under_since) if machine else None,
        "lastTransitionTime": when(status.last_transition),
    }


def worth_saving(status: ModelStatus, machine: OffloadMachine | None) -> bool:
    """Whether a restart would decide otherwise without it: offloading, an activation delay
    running, or a remote known to be down. A model at rest (most of them) needs no entry."""
    if status.phase == Phase.REMOTE_DOWN:
        return True
    return machine is not None and (machine.triggered or machine.over_since is not None)


class StateFile:
    """`DIR/offload-state.json`: the models worth saving, replaced whole (temp file, fsync,
    rename) when one of them changes, never per evaluation. Unreadable or corrupt, it is
    logged and ignored: the control plane starts as if it had none."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / FILE_NAME
        self._entries: dict[str, dict] = {}  # what the file holds ("ns/name" -> fields)
        self.writes = 0
        self.errors = {"read": 0, "write": 0}  # failures, counted for /metrics
        self.error: str | None = None  # the last load or write error, for /status

    def load(self, present: Iterable[ObjectKey]) -> dict[ObjectKey, ObservedStatus]:
        """The saved state of the models in `present`; entries of other models are dropped."""
        raw = self._read()
        if raw is None:
            return {}
        present = {f"{k.namespace}/{k.name}": k for k in present}
        restored: dict[ObjectKey, ObservedStatus] = {}
        stale, bad = [], []
        for name, fields in raw.items():
            key = present.get(name)
            seen = parse_observed_status(fields) if isinstance(name, str) else None
            if seen is None:
                bad.append(str(name))
            elif key is None:
                stale.append(name)
            else:
                restored[key] = seen
                self._entries[name] = fields
        if bad:
            log.warning("event=state_entries_ignored path=%s reason='no phase' %s", self.path, some(bad))
        if stale:
            log.info("event=state_entries_dropped reason='no such model' %s", some(stale))
        if restored:
            log.info("event=state_loaded path=%s %s", self.path, some(sorted(restored)))
        if stale or bad:
            self._write()  # the file holds only what was restored
        return restored

    def _read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._unreadable(f"cannot read: {exc}")
        if len(data) > MAX_BYTES:
            return self._unreadable(f"larger than {MAX_BYTES} bytes")
        try:
            doc = json.loads(data)
        except ValueError as exc:  # bad JSON or bad UTF-8
            return self._unreadable(f"not JSON: {exc}")
        models = doc.get("models") if isinstance(doc, dict) else None
        if not isinstance(models, dict) or doc.get("format") != FORMAT:
            want = f'{{"format": {FORMAT}, "models": {{...}}}}'
            return self._unreadable(f"not an offload state file: want {want}")
        return models

    def _unreadable(self, why: str) -> None:
        self.errors["read"] += 1
        self.error = f"{self.path}: {why}; starting without saved state"
        log.warning("event=state_unreadable path=%s error=%r", self.path, why)
        return None

    def update(
        self, entries: Iterable[tuple[ObjectKey, dict | None]], removed: Iterable[ObjectKey] = ()
    ) -> bool:
        """Take each model's fields (None: nothing worth saving) and drop `removed`; rewrite the
        file if what it holds changed. False when nothing changed or the write failed."""
        changed = False
        for key, fields in [*entries, *((k, None) for k in removed)]:
            name = f"{key.namespace}/{key.name}"
            if fields is None:
                changed |= self._entries.pop(name, None) is not None
            elif self._entries.get(name) != fields:
                self._entries[name] = fields
                changed = True
        return changed and self._write()

    def _write(self) -> bool:
        body = json.dumps({"format": FORMAT, "models": self._entries}, sort_keys=True, indent=1).encode()
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except OSError as exc:
            self.errors["write"] += 1
            self.error = f"{self.path}: cannot write: {exc}"
            log.warning("event=state_write_error path=%s error=%r", self.path, str(exc))
            tmp.unlink(missing_ok=True)
            return False
        self.writes += 1
        self.error = None
        return True
