"""The adaptive limit against model servers of known parallelism (no clock involved)."""

from __future__ import annotations

import asyncio

import pytest

from vlmtag.run.limiter import Limiter


def server_latency(limit: int, slots: int, seconds: float, batch_cost: float = 0.0) -> float:
    """A server with `slots` parallel slots: beyond them requests queue. `batch_cost` makes
    each parallel request a little slower, as continuous batching in vLLM does."""
    working = min(limit, slots)
    service = seconds * (1 + batch_cost * (working - 1))
    return service * max(1.0, limit / slots)


def drive(limiter: Limiter, slots: int, seconds: float, rounds: int = 400, **kw) -> list[int]:
    seen = []
    for _ in range(rounds):
        n = limiter.limit
        limiter.observe(server_latency(n, slots, seconds, **kw), n)
        seen.append(limiter.limit)
    return seen


@pytest.mark.parametrize("slots", [1, 2, 4, 8, 32])
def test_auto_finds_the_servers_parallelism(slots):
    limiter = Limiter.auto()
    seen = drive(limiter, slots, 0.25)
    tail = seen[-200:]
    # Mostly at the server's parallelism, with short probes one step above and below it.
    step = max(1, slots // 4)
    assert max(set(tail), key=tail.count) == slots
    assert sum(1 for n in tail if n == slots) / len(tail) > 0.7
    assert slots - step <= min(tail) and max(tail) <= slots + step


def test_one_at_a_time_server_stays_at_one():
    limiter = Limiter.auto()
    seen = drive(limiter, 1, 20.0)
    tail = seen[-200:]
    assert tail.count(1) / len(tail) > 0.7  # at 1, but for short probes of 2
    assert max(tail) <= 2


def test_batching_server_climbs_to_dozens():
    limiter = Limiter.auto()
    seen = drive(limiter, 64, 0.5, batch_cost=0.01)
    assert max(seen[-100:]) >= 32


def test_overload_halves_and_fixed_never_moves():
    async def scenario():
        limiter = Limiter.auto()
        drive(limiter, 16, 0.1)
        before = limiter.limit
        await limiter.acquire()
        limiter.release(None, sent=limiter.sent(), overloaded=True)
        assert limiter.limit == max(1, before // 2)

        fixed = Limiter(4)
        drive(fixed, 32, 0.1)
        assert fixed.limit == 4 and fixed.history == [4]

    asyncio.run(scenario())


def test_never_more_in_flight_than_the_limit():
    async def scenario():
        limiter = Limiter(3)
        peak = 0

        async def request():
            nonlocal peak
            await limiter.acquire()
            peak = max(peak, limiter.in_flight)
            await asyncio.sleep(0.001)
            limiter.release(0.001)

        await asyncio.gather(*(request() for _ in range(30)))
        assert peak == 3 and limiter.in_flight == 0

    asyncio.run(scenario())


def test_a_burst_of_503s_halves_once_per_limit_not_once_per_reply():
    async def scenario():
        limiter = Limiter(32, adaptive=True)
        sent = []
        for _ in range(32):
            await limiter.acquire()
            sent.append(limiter.sent())
        for s in sent:  # every request of the burst answers 503
            limiter.release(None, sent=s, overloaded=True)
        assert limiter.limit == 16 and limiter.history == [32, 16]
        # Requests sent under the new limit that are refused too halve it once more.
        again = []
        for _ in range(16):
            await limiter.acquire()
            again.append(limiter.sent())
        for s in again:
            limiter.release(None, sent=s, overloaded=True)
        assert limiter.limit == 8

    asyncio.run(scenario())
