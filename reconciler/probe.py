"""Remote reachability: a remote that refuses connections gets no traffic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from api.crd import RemoteBackend
from reconciler.logs import some

log = logging.getLogger("overspill.reconciler")
Target = tuple[str, int]
STALLED = "stalled"  # a probe whose answer this process was too busy to see in time
STALL_SLACK = 0.5  # a timeout firing later than this share of itself was a stalled loop


class RemoteProbe:
    """A TCP connect per distinct remote; `failures_to_down` in a row mark it down.

    Remotes that traffic goes to, or may soon (`hot`), are probed every round; the others are
    swept `sweep` a round (every remote each round up to 40 of them; at 10,000, each one about
    every 20 minutes), so idle remotes cost a few connects a second, not 10,000 a round. At
    most `concurrency` connects are in flight, and a round logs a few remotes by name and the
    rest as a count.
    """

    def __init__(
        self, timeout: float = 1.0, failures_to_down: int = 2, concurrency: int = 64, sweep: int = 40
    ):
        self.timeout = timeout
        self.failures_to_down = failures_to_down
        self.concurrency = concurrency
        self.sweep = sweep
        self._failures: dict[Target, int] = {}
        self._cursor: Target | None = None  # where the sweep goes on next round

    def due(self, targets: set[Target], hot: set[Target]) -> set[Target]:
        """This round's remotes: the hot ones, and the sweep's next `sweep` of the others."""
        for gone in self._failures.keys() - targets:
            del self._failures[gone]
        cold = sorted(targets - hot)
        start = 0 if self._cursor is None else next((i for i, t in enumerate(cold) if t > self._cursor), 0)
        swept = (cold[start:] + cold[:start])[: self.sweep]
        self._cursor = swept[-1] if swept else None
        return hot | set(swept)

    def assume_down(self, remote: RemoteBackend) -> None:
        """Count a remote as down until a probe reaches it (one found down before a restart)."""
        self._failures[(remote.host, remote.port)] = self.failures_to_down

    def usable(self, remote: RemoteBackend) -> bool:
        return self._failures.get((remote.host, remote.port), 0) < self.failures_to_down

    @property
    def down(self) -> int:
        """Remotes now counted as down."""
        return sum(1 for n in self._failures.values() if n >= self.failures_to_down)

    async def check_all(self, remotes: Iterable[RemoteBackend]) -> set[Target]:
        """Probe each remote once; the targets whose usability changed."""
        targets = {(r.host, r.port) for r in remotes}
        slots = asyncio.Semaphore(self.concurrency)

        async def one(target: Target) -> tuple[Target, str | None]:
            async with slots:
                return target, await self._connect(target)

        stalled = 0

        changed: dict[str, list[str]] = {"down": [], "up": []}
        moved = set()
        for target, error in await asyncio.gather(*(one(t) for t in sorted(targets))):
            if error is STALLED:
                stalled += 1
                continue  # says nothing of the remote: neither a failure nor a success
            failures = self._failures.get(target, 0)
            if error is None:
                self._failures[target] = 0
                if failures >= self.failures_to_down:
                    changed["up"].append(f"{target[0]}:{target[1]}")
                    moved.add(target)
                continue
            self._failures[target] = failures + 1
            if failures + 1 == self.failures_to_down:
                changed["down"].append(f"{target[0]}:{target[1]} ({error})")
                moved.add(target)
        if stalled:
            log.warning(
                "event=remote_probes_unjudged count=%d reason='event loop busy past the timeout'", stalled
            )
        for direction, names in changed.items():
            if names:
                level = logging.WARNING if direction == "down" else logging.INFO
                log.log(level, "event=remote_%s %s", direction, some(names))
        return moved

    async def _connect(self, target: Target) -> str | None:
        """None when the remote accepted, else why not; STALLED when the timeout fired late.

        A busy event loop (10,000 models loading) can run a connect's timeout in the same turn
        as the connect's own completion, which the kernel finished long before: a timeout
        that fires well past its time measures this process, not the remote."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*target), self.timeout)
        except TimeoutError:
            late = loop.time() - started - self.timeout
            return STALLED if late > STALL_SLACK * self.timeout else "TimeoutError"
        except OSError as exc:
            return str(exc) or type(exc).__name__
        writer.close()
        return None
