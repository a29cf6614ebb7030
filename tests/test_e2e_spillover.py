"""Spill-over inside Envoy, end to end: a real Envoy retries on the remote what the local pods
turn away before any work, and nothing else. Counted at the backends and at the client.

The local pods shed at a concurrency limit (429 before any work), as an inference server's
admission control does. No metric crosses its target, so the steady remote share stays 0: every
request the remote sees was spilled over by Envoy itself. Run with `-s` to see the figures.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from e2e_stack import Model, Stack, open_loop, stack
from test_e2e_remotes import ODD_KEY, TwoRemotes

pytestmark = pytest.mark.e2e

# A burst of 100 requests a second for 2 s, each arriving on time (clients do not slow down
# because others wait) at pods that take 6 at once for 0.1 s each: room for about 60 a second.
RATE, SECONDS = 100, 2.0
BURST = round(RATE * SECONDS)
SHED_LIMIT = 6
SERVICE_TIME = 0.1  # seconds per request, local and remote


def shedding(model: Model) -> Model:
    model.local.shed_limit = SHED_LIMIT
    model.local.service_time = model.remote.service_time = SERVICE_TIME
    return model


async def routed(s: Stack, model: Model) -> None:
    """Until Envoy routes the model (a Host no model claims gets 404)."""
    codes: list[int] = []
    for _ in range(200):
        codes.append((await s.request(model.host))[0])
        if codes[-1] != 404:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model.name} never routed: {Counter(codes)}")


async def composite_stats(s: Stack, model: Model) -> dict[str, int]:
    prefix = f"cluster.overspill/{model.namespace}/{model.name}/spillover."
    return {k.removeprefix(prefix): v for k, v in (await s.envoy.stats()).items() if k.startswith(prefix)}


async def test_a_burst_spills_over_with_no_errors_and_without_spill_over_it_fails(tmp_path):
    """Two models whose pods shed past 6 requests at once take the same burst (100 requests a
    second for 2 s, about 60 a second of room): with spill-over every request succeeds and what
    the pods shed was served by the remote (each shed request retried once, on the remote, with
    the remote's rewrites); without it the client gets the pods' 429s."""
    on = shedding(Model("spill", spillover={"enabled": True}))
    off = shedding(Model("nospill"))
    # Envoy's own default budget: 3 retries in flight at once; past it a retry is an error.
    low = shedding(Model("lowbudget", spillover={"enabled": True, "maxRetries": 3}))
    async with stack(tmp_path, on, off, low) as s:
        for model in (on, off, low):
            await routed(s, model)
        assert [(await s.model_status(m))["spillover"] for m in (on, off, low)] == [True, False, True]
        base = {
            m.name: (m.local.counts.total, m.local.counts.shed, m.remote.counts.total) for m in (on, off, low)
        }
        stats_before = await composite_stats(s, on)

        answers: list[tuple[float, str]] = []
        codes_on = Counter(await open_loop(s, on, RATE, SECONDS, answers))
        codes_off = Counter(await open_loop(s, off, RATE, SECONDS))
        codes_low = Counter(await open_loop(s, low, RATE, SECONDS))

        def since(m: Model) -> tuple[int, int, int]:
            local, shed, remote = base[m.name]
            return m.local.counts.total - local, m.local.counts.shed - shed, m.remote.counts.total - remote

        local_on, shed_on, remote_on = since(on)
        local_off, shed_off, remote_off = since(off)
        _, shed_low, remote_low = since(low)
        overflow_low = (await composite_stats(s, low)).get("upstream_rq_retry_overflow", 0)
        stats = await composite_stats(s, on)
        by = {
            side: sorted(t for t, body in answers if f'"{on.name}-{side}"' in body)
            for side in ("local", "remote")
        }
        p50 = {side: 1000 * times[len(times) // 2] for side, times in by.items() if times}
        retries = stats.get("upstream_rq_retry", 0) - stats_before.get("upstream_rq_retry", 0)
        print(
            f"\nspill-over on : {BURST} requests ({RATE}/s for {SECONDS:g} s), pods shed past {SHED_LIMIT} "
            f"at once ({SERVICE_TIME:g} s each): "
            f"client {dict(codes_on)}; local served {local_on - shed_on}, shed {shed_on}; "
            f"remote served {remote_on} ({100 * remote_on / BURST:.0f} % spilled); Envoy retries {retries}, "
            f"retry overflows {stats.get('upstream_rq_retry_overflow', 0)}; client p50 ms: served locally "
            f"{p50.get('local', 0):.0f}, spilled {p50.get('remote', 0):.0f}"
            f"\nspill-over off: {BURST} requests: client {dict(codes_off)}; local served "
            f"{local_off - shed_off}, shed {shed_off}; remote {remote_off}"
            f"\nmaxRetries 3  : {BURST} requests: client {dict(codes_low)}; shed {shed_low}, "
            f"remote served {remote_low}, retry overflows {overflow_low}"
        )
        assert codes_on == {200: BURST}, codes_on
        assert shed_on > 0 and remote_on == shed_on == retries, (shed_on, remote_on, retries)
        assert local_on - shed_on + remote_on == BURST
        assert (len(by["local"]), len(by["remote"])) == (local_on - shed_on, remote_on)
        assert stats.get("upstream_rq_retry_overflow", 0) == 0
        # The spilled requests reached the remote as the weighted remote route sends them.
        seen = list(on.remote.counts.recent)[-remote_on:]
        assert {r.path for r in seen} == {"/standby/v1/predict"}
        assert {r.host for r in seen} == {on.remote.address}
        assert {r.headers.get("x-offloaded-by") for r in seen} == {"overspill"}
        assert set(on.local.counts.header_values("x-offloaded-by")) == {""}

        assert codes_off == {200: BURST - shed_off, 429: shed_off}, codes_off
        assert shed_off > 0 and remote_off == 0

        # Past the budget, Envoy answers the shed request's 429 itself instead of retrying.
        assert overflow_low > 0 and codes_low[429] == overflow_low == shed_low - remote_low, codes_low


async def test_a_generic_server_error_or_a_reset_after_sending_is_not_retried_on_the_remote(tmp_path):
    """A 500 from the local pods, or the connection dropped after the request was sent (the work
    may have run either way), reaches the client as a failure: the remote sees none of them."""
    model = Model("fails", spillover={"enabled": True})
    async with stack(tmp_path, model) as s:
        await routed(s, model)
        # (the server attribute, its failing value, its normal value, what the client gets)
        for failure, bad, good, expected in (
            ("status", 500, 200, 500),
            ("reset_after_work", True, False, 503),
        ):
            setattr(model.local, failure, bad)
            before = (model.local.counts.total, model.remote.counts.total)
            stats_before = await composite_stats(s, model)
            codes = Counter(await s.send(model, 40, 8))
            local, remote = model.local.counts.total - before[0], model.remote.counts.total - before[1]
            stats = await composite_stats(s, model)
            retries = stats.get("upstream_rq_retry", 0) - stats_before.get("upstream_rq_retry", 0)
            print(f"\n{failure}: client {dict(codes)}; local {local}, remote {remote}, retries {retries}")
            assert codes == {expected: 40}
            assert local == 40 and remote == 0 and retries == 0
            setattr(model.local, failure, good)


async def test_spill_over_onto_several_remotes_goes_to_the_preferred_one_with_its_own_rewrites(tmp_path):
    """With remotes A then B, the composite's retry goes to the remote side's aggregate: to A while
    it is healthy, with A's path prefix and headers, and B's never."""
    model = shedding(TwoRemotes("two", spillover={"enabled": True}))
    await model.backup.start()
    try:
        async with stack(tmp_path, model) as s:
            await routed(s, model)
            codes = Counter(await open_loop(s, model, RATE, SECONDS))
            shed, a, b = model.local.counts.shed, model.remote.counts.total, model.backup.counts.total
            print(f"\ntwo remotes: client {dict(codes)}; shed {shed}; A {a}, B {b}")
            assert codes == {200: BURST} and shed > 0
            assert (a, b) == (shed, 0)
            seen = list(model.remote.counts.recent)[-a:]
            assert {(r.path, r.host) for r in seen} == {("/standby/v1/predict", model.remote.address)}
            assert {(r.headers["x-api-key"], r.headers["x-offloaded-by"]) for r in seen} == {
                (ODD_KEY, "overspill")
            }
    finally:
        await model.backup.stop()


async def test_a_large_request_spills_over_up_to_max_request_bytes_and_passes_through_beyond(tmp_path):
    """Envoy keeps a body for the retry only up to `maxRequestBytes` (its own default, 1 MiB, is
    short of image or long-context inputs): an 8 MB request the pods turn away is served by the
    remote; a larger one than the limit gets the pods' 429, unretried; any size passes through."""
    big = Model("big", spillover={"enabled": True})
    small = Model("small", spillover={"enabled": True, "maxRequestBytes": 65536})
    big.local.shed_limit = small.local.shed_limit = 0  # the pods turn every request away

    async def post(s: Stack, model: Model, size: int) -> tuple[int, str]:
        url, headers = f"{s.url}/v1/predict", {"Host": model.host}
        async with s.session.post(url, headers=headers, data=b"x" * size) as resp:
            return resp.status, (await resp.json())["served_by"]

    async with stack(tmp_path, big, small) as s:
        for model in (big, small):
            await routed(s, model)
        assert await post(s, big, 8_000_000) == (200, "big-remote")
        assert await post(s, small, 60_000) == (200, "small-remote")
        assert await post(s, small, 200_000) == (429, "small-local")
        big.local.shed_limit = None
        assert await post(s, big, 20_000_000) == (200, "big-local")
