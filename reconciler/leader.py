"""Leader election on a `coordination.k8s.io/v1` Lease: one replica decides, every replica serves.

A small loop of our own on the API (the client's bundled helper has open bugs): the
holder renews the Lease every `renew_every`; another replica takes it over only once it
has gone unrenewed for `lease_seconds`, with a PUT carrying the resourceVersion it read,
so two candidates cannot both win (the loser gets 409). A leader that cannot renew within
`lease_seconds` steps down before anyone else may take over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from api.crd import format_time, parse_time
from reconciler.kubeapi import ApiError, KubeApi

log = logging.getLogger("overspill.leader")


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15.0,
        renew_every: float = 2.0,
        on_lead: Callable[[], object] | None = None,
        on_follow: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.api = api
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_every = lease_seconds, renew_every
        self.on_lead, self.on_follow = on_lead, on_follow
        self.clock = clock
        self.leading = False
        self.holder = ""
        self.transitions = 0
        self._renewed_at = 0.0  # when this replica last renewed, as the leader

    async def run(self) -> None:
        try:
            while True:
                await self.try_once()
                await asyncio.sleep(self.renew_every)
        finally:
            if self.leading:
                await self._release()

    async def try_once(self) -> bool:
        """One round: acquire or renew. Returns whether this replica leads afterwards."""
        now = self.clock()
        try:
            won = await self._acquire_or_renew(now)
        except ApiError as exc:
            log.warning("event=lease_error lease=%s/%s error=%r", self.namespace, self.name, str(exc))
            won = self.leading and now - self._renewed_at < self.lease_seconds  # keep leading until it lapses
        self._set(won, now)
        return won

    async def _acquire_or_renew(self, now: float) -> bool:
        try:
            lease = await self.api.get(f"{self.path}/{self.name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            try:
                await self.api.create(self.path, self._lease(now, None, transitions=0))
            except ApiError as create_error:
                if create_error.status == 409:
                    return False  # another replica created it first
                raise
            self.holder = self.identity
            return True
        spec = lease.get("spec") or {}
        self.holder = str(spec.get("holderIdentity") or "")
        renewed = parse_time(spec.get("renewTime")) or 0.0
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        mine = self.holder == self.identity
        if not mine and self.holder and now - renewed < duration:
            return False  # held, and fresh
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        body = self._lease(now, lease, transitions, acquired=None if mine else now)
        try:
            await self.api.replace(f"{self.path}/{self.name}", body)
        except ApiError as exc:
            if exc.status == 409:
                return False  # someone else wrote it since we read it
            raise
        self.holder = self.identity
        return True

    def _lease(
        self, now: float, current: dict | None, transitions: int, acquired: float | None = None
    ) -> dict:
        spec = dict((current or {}).get("spec") or {})
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=int(self.lease_seconds),
            renewTime=format_time(now, micro=True),
            leaseTransitions=transitions,
        )
        if acquired is not None or current is None:
            spec["acquireTime"] = format_time(acquired or now, micro=True)
        metadata = dict((current or {}).get("metadata") or {"name": self.name, "namespace": self.namespace})
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _set(self, won: bool, now: float) -> None:
        if won:
            self._renewed_at = now
        if won == self.leading:
            return
        self.leading = won
        self.transitions += 1
        if won:
            log.info("event=leading lease=%s/%s identity=%s", self.namespace, self.name, self.identity)
            if self.on_lead:
                self.on_lead()
        else:
            log.info(
                "event=following lease=%s/%s identity=%s holder=%s",
                self.namespace,
                self.name,
                self.identity,
                self.holder or "-",
            )
            if self.on_follow:
                self.on_follow()

    async def _release(self) -> None:
        """On a clean shutdown, hand the lease over at once instead of letting it lapse."""
        try:
            lease = await self.api.get(f"{self.path}/{self.name}")
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                lease["spec"] = dict(spec, holderIdentity="", renewTime=format_time(0, micro=True))
                await self.api.replace(f"{self.path}/{self.name}", lease)
                log.info("event=lease_released lease=%s/%s", self.namespace, self.name)
        except ApiError as exc:
            log.warning("event=lease_release_error error=%r", str(exc))
