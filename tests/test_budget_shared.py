"""The budget shared by replicas: a fake SharedSlots on virtual time, then several Budgets (one per
"replica") on a real PgLedger, checked against what the server would count."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections import deque
from collections.abc import Iterable

import psycopg
import pytest
from ledger_checks import assert_never_more_than, ledger_rows

from monitor import vtime
from monitor.errors import StoreFault
from monitor.rates import RateLimit
from monitor.schedule.budget import Budget, SharedSlots
from monitor.state.pg.ledger import LedgerSlots, PgLedger, ensure_schema

RATE = RateLimit(10, 10.0)  # one per second locally; a refused take is asked again within 1 s


class FakeShared:
    """Grants slots 1, 2, ... except for the scripted refusals (their waits); records every call."""

    def __init__(self, refusals: Iterable[float] = ()) -> None:
        self.refusals = deque(refusals)
        self.calls: list[tuple[str, object]] = []
        self.taken_at: list[float] = []
        self.fail: set[str] = set()
        self._slots = itertools.count(1)

    def take(self, rate: RateLimit) -> tuple[int | None, float]:
        self.taken_at.append(asyncio.get_running_loop().time())
        self._maybe_fail("take")
        if self.refusals:
            return None, self.refusals.popleft()
        return next(self._slots), 0.0

    def done(self, slot: int) -> None:
        self._record("done", slot)

    def cancel(self, slot: int) -> None:
        self._record("cancel", slot)

    def pause(self, seconds: float) -> None:
        self._record("pause", seconds)

    def block(self, reason: str) -> None:
        self._record("block", reason)

    def unblock(self) -> None:
        self._record("unblock", None)

    def _record(self, call: str, arg: object) -> None:
        self.calls.append((call, arg))
        self._maybe_fail(call)

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            raise StoreFault(f"{call}: the database went away")


def test_a_ledger_adapter_is_a_shared_slots() -> None:
    slots: type[SharedSlots] = LedgerSlots  # checked by mypy
    assert slots is LedgerSlots


def test_refusals_make_it_wait_and_the_slot_goes_with_the_ticket() -> None:
    async def main() -> tuple[float, list[tuple[str, object]], list[int | None]]:
        loop = asyncio.get_running_loop()
        shared = FakeShared([0.3, 0.3])
        budget = Budget(RATE, shared=shared)
        start = loop.time()
        first = await budget.acquire()
        waited = loop.time() - start
        budget.release(first)
        second = await budget.acquire()
        budget.release(second, used=False)
        return waited, shared.calls, [first.slot, second.slot]

    waited, calls, slots = vtime.run(main())
    assert waited == pytest.approx(0.6, abs=0.01)
    assert slots == [1, 2]
    assert calls == [("done", 1), ("cancel", 2)]


def test_refused_waits_are_clamped() -> None:
    async def main() -> list[float]:
        shared = FakeShared([100.0, 0.0, math.inf])
        budget = Budget(RATE, shared=shared)
        budget.release(await budget.acquire())
        return [b - a for a, b in itertools.pairwise(shared.taken_at)]

    # At most one local interval (window / n), so an unblock is seen soon; at least a few ms.
    assert vtime.run(main()) == pytest.approx([1.0, 0.005, 1.0], abs=0.001)


def test_the_local_window_comes_first() -> None:
    async def main() -> tuple[int, bool]:
        shared = FakeShared()
        budget = Budget(RateLimit(3, 3.0), shared=shared)
        held = [await budget.acquire() for _ in range(3)]
        waiter = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(30)
        asked, waiting = len(shared.taken_at), not waiter.done()
        waiter.cancel()
        for ticket in held:
            budget.release(ticket)
        return asked, waiting

    assert vtime.run(main()) == (3, True)  # a full local window never asks the shared one


def test_a_429_pauses_every_replica_and_a_rejected_key_blocks_them() -> None:
    async def main() -> list[tuple[str, object]]:
        shared = FakeShared()
        budget = Budget(RATE, throttle_cap_s=30.0, shared=shared)
        budget.throttle(17.0)
        budget.throttle(10_000.0)  # capped
        budget.throttle(None)  # half a window
        budget.block()
        budget.block("401: key revoked")
        budget.unblock()
        return shared.calls

    assert vtime.run(main()) == [
        ("pause", 17.0),
        ("pause", 30.0),
        ("pause", 5.0),
        ("block", "key rejected"),
        ("block", "401: key revoked"),
        ("unblock", None),
    ]


def test_a_pause_or_block_elsewhere_is_waited_out_and_can_be_cancelled() -> None:
    async def main() -> tuple[int, int, int, list[tuple[str, object]]]:
        shared = FakeShared([math.inf] * 1000)  # another replica blocked the key
        budget = Budget(RATE, shared=shared)
        waiter = asyncio.ensure_future(budget.acquire())
        await asyncio.sleep(10.5)
        asked = len(shared.taken_at)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        stats = budget.stats()
        return asked, stats.in_flight, stats.requests, shared.calls

    asked, in_flight, requests, calls = vtime.run(main())
    assert asked == 11  # once per local interval
    assert (in_flight, requests, calls) == (0, 0, [])


def test_a_fault_in_take_counts_nothing() -> None:
    async def main() -> tuple[int, int, int | None]:
        shared = FakeShared()
        shared.fail.add("take")
        budget = Budget(RATE, shared=shared)
        with pytest.raises(StoreFault):
            await budget.acquire()
        stats = budget.stats()
        shared.fail.clear()
        ticket = await budget.acquire()
        budget.release(ticket)
        return stats.in_flight, stats.requests, ticket.slot

    assert vtime.run(main()) == (0, 0, 1)


def test_a_fault_in_done_keeps_the_local_accounting() -> None:
    async def main() -> tuple[bool, int, float]:
        loop = asyncio.get_running_loop()
        shared = FakeShared()
        shared.fail.add("done")
        budget = Budget(RateLimit(1, 1.0), shared=shared)
        ticket = await budget.acquire()
        waiter = asyncio.ensure_future(budget.acquire())  # the window is full of one in flight
        await asyncio.sleep(5)
        start = loop.time()
        with pytest.raises(StoreFault):
            budget.release(ticket)
        stats = budget.stats()
        shared.fail.clear()
        budget.release(await waiter)  # woken by the release all the same, one window later
        return ticket.released, stats.in_flight, loop.time() - start

    released, in_flight, waited = vtime.run(main())
    assert released
    assert in_flight == 0
    assert waited == pytest.approx(1.0, abs=0.01)


def test_a_failing_start_hook_gives_the_slot_back() -> None:
    async def main() -> tuple[list[tuple[str, object]], int]:
        shared = FakeShared()

        def started(_: float) -> object:
            raise StoreFault("disk full")

        budget = Budget(RATE, on_request_started=started, shared=shared)
        with pytest.raises(StoreFault):
            await budget.acquire()
        return shared.calls, budget.stats().in_flight

    assert vtime.run(main()) == ([("cancel", 1)], 0)


def test_the_hooks_keep_their_token_beside_the_slot() -> None:
    async def main() -> tuple[object, int | None, list[object]]:
        shared = FakeShared()
        done: list[object] = []
        budget = Budget(
            RATE, on_request_started=lambda _: "row-7", on_request_done=lambda t, _: done.append(t), shared=shared
        )
        ticket = await budget.acquire()
        budget.release(ticket)
        return ticket.token, ticket.slot, [*done, *shared.calls]

    assert vtime.run(main()) == ("row-7", 1, ["row-7", ("done", 1)])


def test_no_limit_never_asks_the_shared_budget() -> None:
    async def main() -> tuple[int, int | None, list[tuple[str, object]]]:
        shared = FakeShared()
        budget = Budget(None, shared=shared)
        ticket = await budget.acquire()
        budget.release(ticket)
        return len(shared.taken_at), ticket.slot, shared.calls

    assert vtime.run(main()) == (0, None, [])


# -- replicas on a real PostgreSQL (real time: the database's clock is real) ------------------------


async def test_replicas_on_one_ledger_never_exceed_the_limit_in_any_window(pg_url: str) -> None:
    n, window, timeout, run_s = 10, 1.0, 10.0, 3.0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_schema(conn)
    rng = random.Random(10)
    ledgers = [PgLedger(pg_url, "sk_shared", replica=f"r{i}") for i in range(3)]
    try:
        # Each replica alone would go at n per window: three of them ask for three times the budget.
        budgets = [Budget(RateLimit(n, window), shared=LedgerSlots(ledger, timeout)) for ledger in ledgers]

        async def worker(budget: Budget) -> None:
            while True:
                async with budget.spend():
                    await asyncio.sleep(rng.uniform(0.0, 0.03))  # the request

        tasks = [asyncio.create_task(worker(budget)) for budget in budgets for _ in range(4)]
        await asyncio.sleep(run_s)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        assert all(budget.stats().in_flight == 0 for budget in budgets)
        requests = sum(budget.requests for budget in budgets)
    finally:
        for ledger in ledgers:
            ledger.close()
    rows = ledger_rows(pg_url)
    assert len(rows) == requests
    assert all(done is not None for _, done in rows)  # every ticket given back, cancelled ones included
    assert n * run_s * 0.8 <= len(rows) <= n * (run_s + 1)
    assert_never_more_than(n, window, rows)


async def test_a_429_seen_by_one_replica_pauses_the_others(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_schema(conn)
    loop = asyncio.get_running_loop()
    with PgLedger(pg_url, "sk_shared", replica="a") as a, PgLedger(pg_url, "sk_shared", replica="b") as b:
        rate = RateLimit(100, 1.0)  # a take refused by the pause is asked again every 10 ms
        first = Budget(rate, shared=LedgerSlots(a, 10.0))
        second = Budget(rate, shared=LedgerSlots(b, 10.0))
        first.throttle(0.5)
        start = loop.time()
        second.release(await second.acquire())
        assert 0.45 <= loop.time() - start < 0.7
        first.block("401")
        waiter = asyncio.ensure_future(second.acquire())
        await asyncio.sleep(0.2)
        assert not waiter.done()
        first.unblock()
        second.release(await asyncio.wait_for(waiter, 1.0))
