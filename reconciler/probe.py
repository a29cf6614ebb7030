"""Remote reachability: a remote that refuses connections gets no traffic."""

from __future__ import annotations

import asyncio
import logging

from api.crd import RemoteBackend

log = logging.getLogger("overspill.reconciler")


class RemoteProbe:
    """A TCP connect per remote per evaluation; `failures_to_down` in a row mark it down."""

    def __init__(self, timeout: float = 1.0, failures_to_down: int = 2):
        self.timeout = timeout
        self.failures_to_down = failures_to_down
        self._failures: dict[tuple[str, int], int] = {}

    def usable(self, remote: RemoteBackend) -> bool:
        return self._failures.get((remote.host, remote.port), 0) < self.failures_to_down

    async def check(self, remote: RemoteBackend) -> None:
        target = (remote.host, remote.port)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*target), self.timeout)
            writer.close()
            was_down = not self.usable(remote)
            self._failures[target] = 0
            if was_down:
                log.info("event=remote_up remote=%s:%d", *target)
        except (TimeoutError, OSError) as exc:
            self._failures[target] = self._failures.get(target, 0) + 1
            if self._failures[target] == self.failures_to_down:
                log.warning(
                    "event=remote_down remote=%s:%d error=%r", *target, str(exc) or type(exc).__name__
                )
