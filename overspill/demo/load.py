"""An open-loop HTTP load generator with per-second accounting.

Open loop: requests go out at rate(t) whether or not earlier ones have answered, as independent
clients would send them, so a saturated backend shows up as queueing and errors instead of as a
politely slowed-down client. Each request is accounted to the whole second in which it started.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger(__name__)

SERVED_BY_HEADER = "x-served-by"
# A second is reported once all its requests are answered, or this long after it ended at most.
REPORT_LAG = 2.0


@dataclass
class SecondStats:
    """Outcomes of the requests started in one whole second of the run."""

    second: int
    offered: int = 0  # due by the rate function, sent or not
    sent: int = 0
    ok: int = 0  # 2xx
    errors: int = 0  # non-2xx, exceptions, or not sent because `concurrency` requests were in flight
    status_codes: Counter[str] = field(default_factory=Counter)  # error kind -> count
    served_by: Counter[str] = field(default_factory=Counter)  # x-served-by of every response ('-' if absent)
    latencies: list[float] = field(default_factory=list)  # seconds, 2xx only

    @property
    def pending(self) -> int:
        return self.offered - self.ok - self.errors

    def share(self, server: str) -> float:
        """Fraction of this second's responses served by `server` (0 when there were none)."""
        answered = sum(self.served_by.values())
        return self.served_by[server] / answered if answered else 0.0

    def latency_quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[
            min(98, max(0, round(q * 100) - 1))
        ]


@dataclass
class LoadResult:
    """Per-second stats of a whole run, with totals."""

    seconds: list[SecondStats]
    duration: float

    @property
    def offered(self) -> int:
        return sum(s.offered for s in self.seconds)

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.seconds)

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.seconds)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.seconds)

    @property
    def status_codes(self) -> Counter[str]:
        return sum((s.status_codes for s in self.seconds), Counter())

    @property
    def served_by(self) -> Counter[str]:
        return sum((s.served_by for s in self.seconds), Counter())


async def run_load(
    url: str,
    host: str,
    rate: Callable[[float], float],
    duration: float,
    on_second: Callable[[SecondStats], None] | None = None,
    *,
    method: str = "POST",
    body: bytes = b'{"inputs": "hello"}',
    headers: dict[str, str] | None = None,
    concurrency: int = 512,
    request_timeout: float = 10.0,
    tick: float = 0.01,
) -> LoadResult:
    """Send requests to `url` with Host `host` at rate(t)/s for `duration` s; t counts from the start.

    `on_second` gets each second's stats in order, once its requests are answered (or REPORT_LAG s
    after the second ended; late answers still land in the same object). Returns only after every
    request it started has finished.
    """
    loop = asyncio.get_running_loop()
    seconds = [SecondStats(i) for i in range(max(1, math.ceil(duration)))]
    inflight: set[asyncio.Task[None]] = set()
    req_headers = {"Host": host, "Content-Type": "application/json", **(headers or {})}
    reported = 0

    def report(now: float, final: bool = False) -> None:
        nonlocal reported
        while reported < len(seconds):
            stats = seconds[reported]
            ended = now >= stats.second + 1
            if not (final or (ended and (stats.pending == 0 or now >= stats.second + 1 + REPORT_LAG))):
                return
            reported += 1
            if on_second is not None:
                on_second(stats)

    async def one(session: aiohttp.ClientSession, stats: SecondStats) -> None:
        started = loop.time()
        stats.sent += 1
        try:
            async with session.request(method, url, headers=req_headers, data=body) as resp:
                await resp.read()
                stats.served_by[resp.headers.get(SERVED_BY_HEADER, "-")] += 1
                if 200 <= resp.status < 300:
                    stats.ok += 1
                    stats.latencies.append(loop.time() - started)
                else:
                    stats.errors += 1
                    stats.status_codes[str(resp.status)] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is a counted outcome, not a crash
            stats.errors += 1
            stats.status_codes[type(exc).__name__] += 1

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = loop.time()
        due, last_t = 0.0, 0.0
        try:
            while (t := loop.time() - start) < duration:
                due += max(0.0, rate((last_t + t) / 2)) * (t - last_t)  # midpoint rule over the tick
                last_t = t
                stats = seconds[int(t)]
                while due >= 1.0:
                    due -= 1.0
                    stats.offered += 1
                    if len(inflight) >= concurrency:
                        stats.errors += 1
                        stats.status_codes["client-limit"] += 1
                        continue
                    task = asyncio.create_task(one(session, stats))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                report(t)
                await asyncio.sleep(tick)
            while inflight:
                await asyncio.wait(set(inflight), timeout=0.25)
                report(loop.time() - start)
            report(loop.time() - start, final=True)
        finally:
            # Cancelled or failed: still leave nothing in flight.
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
    result = LoadResult(seconds, duration)
    log.info(
        "load finished url=%s offered=%s ok=%s errors=%s served_by=%s",
        url, result.offered, result.ok, result.errors, dict(result.served_by),
    )  # fmt: skip
    return result
