"""The budget, proven against the simulator's own server-side count of requests per window."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import Awaitable, Callable

import pytest
from aiolimiter import AsyncLimiter

from monitor import vtime
from monitor.api.client import ExecutionsClient
from monitor.api.errors import ApiError
from monitor.clock import Clock
from monitor.rates import RateLimit
from monitor.schedule.budget import Budget
from monitor.secrets import Secret
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

KEY = "sk_test_budget"
RATE = RateLimit(30, 60.0)
Body = Callable[[Simulator, ExecutionsClient, list[str]], Awaitable[None]]


def serve(body: Body, *, error_rate: float = 0.0, limit: RateLimit | None = RATE) -> dict[str, object]:
    """Run `body` against a fresh simulator on virtual time; return the simulator's stats."""

    async def main() -> dict[str, object]:
        settings = SimulatorSettings(api_keys=[KEY], rate_limit=limit, error_rate=error_rate)
        runner, url = await start_simulator(settings, "127.0.0.1", 0)
        simulator = simulator_of(runner)
        ids = simulator.create(count=5, duration_s=100_000)
        try:
            async with ExecutionsClient(url, Secret(KEY)) as client:
                await body(simulator, client, ids)
            return simulator.stats()
        finally:
            await runner.cleanup()

    return vtime.run(main())


async def spend(budget: Budget, client: ExecutionsClient, ids: list[str], count: int) -> None:
    """`count` requests through the budget, 4 at a time, each one counted whatever it answers."""

    async def one(i: int) -> None:
        async with budget.spend():
            with contextlib.suppress(ApiError):  # 404, 5xx: they count all the same
                await client.get_status(ids[i % len(ids)])

    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(4)))


def window(stats: dict[str, object]) -> int:
    value = stats["max_requests_in_window"]
    assert isinstance(value, int)
    return value


def answers(stats: dict[str, object], kind: str) -> int:
    responses = stats["responses"]
    assert isinstance(responses, dict)
    return int(responses.get(kind, 0))


def test_a_plain_leaky_bucket_bursts_past_the_limit() -> None:
    # The failure the budget exists to prevent, seen by the same server-side counter.
    async def body(_: Simulator, client: ExecutionsClient, ids: list[str]) -> None:
        limiter = AsyncLimiter(30, 60)
        for i in range(60):
            async with limiter:
                await client.get_status(ids[i % len(ids)])

    stats = serve(body, limit=None)
    assert window(stats) > 30


def test_burst_at_start_stays_within_the_window() -> None:
    async def body(_: Simulator, client: ExecutionsClient, ids: list[str]) -> None:
        await spend(Budget(RATE), client, ids, 90)

    stats = serve(body)
    assert window(stats) == 30
    assert answers(stats, "429") == 0


def test_after_an_idle_spell_no_burst() -> None:
    async def body(_: Simulator, client: ExecutionsClient, ids: list[str]) -> None:
        budget = Budget(RATE)
        for idle in (0, 300, 45, 61):
            await asyncio.sleep(idle)
            await spend(budget, client, ids, 35)

    stats = serve(body)
    assert window(stats) <= 30
    assert answers(stats, "429") == 0


def test_retries_and_404s_count_too() -> None:
    async def body(_: Simulator, client: ExecutionsClient, ids: list[str]) -> None:
        await spend(Budget(RATE), client, [*ids, "exec_nothere1", "exec_nothere2"], 120)

    stats = serve(body, error_rate=0.3)
    assert answers(stats, "5xx") > 10
    assert answers(stats, "404") > 10
    assert window(stats) <= 30
    assert answers(stats, "429") == 0


def test_history_of_a_previous_process_is_not_spent_again() -> None:
    async def body(_: Simulator, client: ExecutionsClient, ids: list[str]) -> None:
        loop = asyncio.get_running_loop()
        stamps: list[float] = []
        first = Budget(RATE, on_request_started=lambda t: t, on_request_done=lambda _, t: stamps.append(t or 0))
        await spend(first, client, ids, 30)  # a burst... then the process "dies"
        await asyncio.sleep(5)
        second = Budget(RATE, history=stamps)
        start = loop.time()
        await spend(second, client, ids, 10)
        assert loop.time() - start >= 60 - 5 - 30 * 2  # it had to wait for the old stamps to age

    stats = serve(body)
    assert window(stats) <= 30
    assert answers(stats, "429") == 0


def test_pacing_spreads_requests_evenly() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budget = Budget(RATE)
        starts = []
        for _ in range(10):
            ticket = await budget.acquire()
            starts.append(loop.time())
            budget.release(ticket)
        return [b - a for a, b in itertools.pairwise(starts)]

    gaps = vtime.run(main())
    assert gaps == pytest.approx([2.0] * 9, abs=0.01)


def test_requests_in_flight_hold_their_slot() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        budget = Budget(RateLimit(3, 3.0))  # one per second
        held = [await budget.acquire() for _ in range(3)]
        start = loop.time()
        waiter = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(30)
        assert not waiter.done()  # three in flight fill the window, however long they take
        budget.release(held[0])
        ticket = await waiter
        budget.release(ticket)
        for t in held[1:]:
            budget.release(t)
        return loop.time() - start, budget.stats().used

    waited, used = vtime.run(main())
    # The released one still counts in its window (its answer came back at 30 s): with two more in
    # flight the window is full until 33 s.
    assert waited == pytest.approx(33, abs=0.01)
    assert used == 3


def test_throttle_pauses_the_key_then_slows_it() -> None:
    async def main() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        budget = Budget(RATE)
        budget.release(await budget.acquire())
        budget.throttle(17.0)
        assert budget.stats().paused_until is not None
        assert budget.rate_per_s == pytest.approx(0.25)
        start = loop.time()
        starts = []
        for _ in range(4):
            ticket = await budget.acquire()
            starts.append(loop.time() - start)
            budget.release(ticket)
        return starts[0], [b - a for a, b in itertools.pairwise(starts)]

    first, gaps = vtime.run(main())
    assert first == pytest.approx(17.0, abs=0.01)
    assert all(gap >= 4.0 - 0.01 for gap in gaps)  # half the rate while slowed


def test_throttle_is_capped() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        budget = Budget(RATE, throttle_cap_s=30.0)
        budget.throttle(10_000.0)
        start = loop.time()
        budget.release(await budget.acquire())
        return loop.time() - start

    assert vtime.run(main()) == pytest.approx(30.0, abs=0.01)


def test_block_stops_every_request_until_unblock() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        budget = Budget(RATE)
        budget.block()
        waiter = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(600)
        assert not waiter.done()
        assert budget.stats().blocked
        start = loop.time()
        budget.unblock()
        budget.release(await waiter)
        return loop.time() - start

    assert vtime.run(main()) < 0.01


def test_hooks_see_every_request_and_unused_tickets() -> None:
    async def main() -> list[tuple[str, object, float | None]]:
        loop = asyncio.get_running_loop()
        calls: list[tuple[str, object, float | None]] = []
        counter = iter(range(100))

        def started(stamp: float) -> object:
            token = next(counter)
            calls.append(("started", token, stamp - loop.time()))
            return token

        budget = Budget(RATE, on_request_started=started, on_request_done=lambda tok, t: calls.append(("done", tok, t)))
        ticket = await budget.acquire()
        await asyncio.sleep(1.5)
        budget.release(ticket)
        budget.release(ticket)  # a second release is ignored
        budget.release(await budget.acquire(), used=False)
        return calls

    calls = vtime.run(main())
    assert [(kind, token) for kind, token, _ in calls] == [("started", 0), ("done", 0), ("started", 1), ("done", 1)]
    assert calls[3][2] is None  # never sent
    assert isinstance(calls[1][2], float)


def test_set_rate_applies_at_once() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        budget = Budget(RATE)
        budget.release(await budget.acquire())
        budget.set_rate(RateLimit(60, 60.0))
        start = loop.time()
        budget.release(await budget.acquire())
        budget.release(await budget.acquire())
        return loop.time() - start

    assert vtime.run(main()) == pytest.approx(1.0, abs=0.01)  # one per second from now on


def test_stats_count_the_current_window() -> None:
    async def main() -> tuple[int, int | None, int]:
        budget = Budget(RateLimit(5, 10.0), Clock(asyncio.get_running_loop()))
        for _ in range(3):
            budget.release(await budget.acquire())
        held = await budget.acquire()
        stats = budget.stats()
        budget.release(held)
        await asyncio.sleep(11)
        return stats.used, stats.free, budget.stats().used

    used, free, later = vtime.run(main())
    assert (used, free, later) == (4, 1, 0)
    assert math.isfinite(float(used))


# -- no limit ("none") ------------------------------------------------------------------------------


def test_no_limit_hands_out_tickets_at_once_and_still_counts() -> None:
    async def main() -> tuple[float, int, int, int | None, int | None]:
        loop = asyncio.get_running_loop()
        calls: list[object] = []
        budget = Budget(None, on_request_started=calls.append, on_request_done=lambda *a: calls.append(a))
        start = loop.time()
        held = [await budget.acquire() for _ in range(1000)]  # far beyond any window: none waits
        elapsed = loop.time() - start
        stats = budget.stats()
        for ticket in held[:-1]:
            budget.release(ticket)
        budget.release(held[-1], used=False)
        assert calls == []  # no window, so no request log to keep
        assert budget.stats().in_flight == 0
        return elapsed, budget.requests, stats.in_flight, stats.limit, stats.free

    elapsed, requests, in_flight, limit, free = vtime.run(main())
    assert elapsed == 0.0
    assert (requests, in_flight) == (999, 1000)
    assert limit is None
    assert free is None


def test_no_limit_reports_an_infinite_rate() -> None:
    async def main() -> float:
        return Budget(None).rate_per_s

    assert vtime.run(main()) == math.inf


def test_no_limit_still_pauses_on_a_429_but_never_slows() -> None:
    async def main() -> tuple[float, float, list[float]]:
        loop = asyncio.get_running_loop()
        budget = Budget(None)
        budget.throttle(5.0)
        start = loop.time()
        budget.release(await budget.acquire())
        paused = loop.time() - start
        budget.throttle(None)  # no Retry-After: a short pause of its own
        start = loop.time()
        starts = []
        for _ in range(3):
            budget.release(await budget.acquire())
            starts.append(loop.time() - start)
        assert budget.stats().slowed_until is None
        return paused, starts[0], [b - a for a, b in itertools.pairwise(starts)]

    paused, default_pause, gaps = vtime.run(main())
    assert paused == pytest.approx(5.0, abs=0.01)
    assert default_pause == pytest.approx(1.0, abs=0.01)
    assert gaps == [0.0, 0.0]


def test_no_limit_blocks_like_any_budget() -> None:
    async def main() -> bool:
        budget = Budget(None)
        budget.block()
        waiter = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(60)
        blocked = not waiter.done()
        budget.unblock()
        budget.release(await waiter)
        return blocked

    assert vtime.run(main())


def test_set_rate_to_and_from_no_limit() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        budget = Budget(RateLimit(1, 10.0))
        budget.release(await budget.acquire())
        budget.set_rate(None)
        start = loop.time()
        for _ in range(50):
            budget.release(await budget.acquire())
        unlimited = loop.time() - start
        budget.set_rate(RateLimit(1, 10.0))  # the first request's stamp still counts in its window
        start = loop.time()
        budget.release(await budget.acquire())
        return unlimited, loop.time() - start

    unlimited, limited = vtime.run(main())
    assert unlimited == 0.0
    assert limited == pytest.approx(10.0, abs=0.01)
