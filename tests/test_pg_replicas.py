"""Two replicas (two PgStores) on one real PostgreSQL database: leases split the work and move it when
a replica stops renewing; fences keep a stale replica from writing; outbox claims keep two replicas
from sending one row at once; a group digest is made once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_store import rec

from monitor.errors import LeaseLost, StoreFault
from monitor.records import Outcome, event_id
from monitor.state.pg.store import PgStore
from monitor.state.rows import DeliveryState, TrackRequest

SHORT_LEASE = 1.0  # seconds; the tests that let a lease lapse sleep just past it, once


def track(store: PgStore, *ids: str, group: str | None = None, batch: str | None = None) -> list[str]:
    return store.track_many(
        TrackRequest(i, tracked_since=float(n), group=group, batch=batch) for n, i in enumerate(ids)
    )


@pytest.fixture
def pair(pg_url: str) -> Iterator[tuple[PgStore, PgStore]]:
    with PgStore.open(pg_url, replica="a") as a, PgStore.open(pg_url, replica="b") as b:
        yield a, b


@pytest.fixture
def short_pair(pg_url: str) -> Iterator[tuple[PgStore, PgStore]]:
    with (
        PgStore.open(pg_url, replica="a", lease_s=SHORT_LEASE) as a,
        PgStore.open(pg_url, replica="b", lease_s=SHORT_LEASE) as b,
    ):
        yield a, b


def lapse() -> None:
    time.sleep(SHORT_LEASE + 0.2)


def test_claims_split_the_work_between_live_replicas(pair: tuple[PgStore, PgStore]) -> None:
    a, b = pair
    ids = [f"exec_{n:02d}" for n in range(10)]
    assert track(a, *ids) == ids  # held by the replica that tracked them: it polls them at once
    first = a.claim_cycle()
    assert (sorted(first.held), first.gained, first.lost) == (ids, [], [])
    assert b.claim_cycle().gained == []  # all held; b now counts as live
    shed = a.claim_cycle()  # a holds 10 of a fair share of 5 (+2): it lets the newest go
    assert shed.lost == ids[:4:-1]
    assert sorted(shed.held) == ids[:5]
    took = b.claim_cycle()
    assert [r.execution_id for r in took.gained] == ids[5:]  # oldest first
    assert set(took.held.values()) == {2}  # tracked by a with fence 1, claimed by b: 2
    assert a.owned_counts() == {"a": 5, "b": 5}
    assert [r.execution_id for r in b.load_active()] == ids[5:]
    assert (a.claim_cycle().gained, b.claim_cycle().gained) == ([], [])  # stable
    assert a.count_executions("active") == 10  # every replica sees the whole set


def test_a_replica_that_stops_renewing_loses_its_executions_to_another(
    short_pair: tuple[PgStore, PgStore],
) -> None:
    a, b = short_pair
    track(a, "exec_1", "exec_2")
    a.save_poll("exec_1", {"next_due": 7.0}, {"status": "running"}, 4)
    a.flush_polls()
    assert b.claim_cycle().gained == []  # a's leases are live
    lapse()  # a is "paused": no claim cycle
    took = b.claim_cycle()
    assert [r.execution_id for r in took.gained] == ["exec_1", "exec_2"]
    assert (took.gained[0].schedule, took.gained[0].polls) == ({"next_due": 7.0}, 4)  # a's bookkeeping carries over
    assert b.owned_counts() == {"b": 2}
    # a wakes up: its writes are fenced off and its next cycle tells it what it lost.
    a.save_poll("exec_2", {"next_due": 99.0}, None, 9)
    assert a.flush_polls() == 1
    row = a.get("exec_2")
    assert row is not None
    assert (row.schedule, row.polls) == (None, 0)
    with pytest.raises(LeaseLost, match="exec_1") as caught:
        a.finish("exec_1", Outcome.COMPLETED, rec("exec_1"), ["jsonl"])
    assert caught.value.execution_id == "exec_1"
    assert not isinstance(caught.value, StoreFault)
    assert a.pending_count() == 0  # nothing written by the stale replica
    assert a.get("exec_1") is not None
    back = a.claim_cycle()
    assert (back.lost, back.gained, back.held) == (["exec_2"], [], {})
    assert b.finish("exec_1", Outcome.COMPLETED, rec("exec_1"), ["jsonl"]).newly_terminal
    # Once terminal, a late finish by the stale replica is the idempotent no-op, not LeaseLost.
    assert a.finish("exec_1", Outcome.FAILED, rec("exec_1", Outcome.FAILED), ["jsonl"]).newly_terminal is False
    assert a.pending_count() == 1


def test_release_all_makes_the_executions_claimable_at_once(pair: tuple[PgStore, PgStore]) -> None:
    a, b = pair
    track(a, "exec_1", "exec_2", "exec_3")
    a.claim_cycle()
    assert b.claim_cycle().gained == []
    a.save_poll("exec_3", {"next_due": 3.0}, None, 1)
    assert a.release_all() == 3  # a clean stop; buffered polls are written first
    took = b.claim_cycle()  # a no longer counts as live: b's share is all of them
    assert [r.execution_id for r in took.gained] == ["exec_1", "exec_2", "exec_3"]
    assert took.gained[2].schedule == {"next_due": 3.0}
    assert a.owned_counts() == {"b": 3}
    assert a.load_active() == []  # a's next start-up: b holds them all, a live share of 2 claims nothing


def test_a_digest_is_made_once_when_two_replicas_finish_the_last_members(pair: tuple[PgStore, PgStore]) -> None:
    a, b = pair
    for store in pair:
        store.set_group_sinks(["chat"])
    members = [f"m_{n}" for n in range(6)]
    track(a, *members[:3], group="nightly", batch="b_1")
    track(b, *members[3:], group="nightly", batch="b_1")  # one batch across replicas (e.g. split add calls)
    for n in range(2):
        a.finish(members[n], Outcome.COMPLETED, rec(members[n], group="nightly"), [])
        b.finish(members[3 + n], Outcome.COMPLETED, rec(members[3 + n], group="nightly"), [])
    digests: list[dict[str, Any] | None] = []
    start = threading.Barrier(2)

    def finish_last(store: PgStore, execution_id: str) -> None:
        start.wait()
        digests.append(
            store.finish(execution_id, Outcome.FAILED, rec(execution_id, Outcome.FAILED, "nightly"), []).group_record
        )

    threads = [threading.Thread(target=finish_last, args=(s, i)) for s, i in ((a, "m_2"), (b, "m_5"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    made = [d for d in digests if d is not None]
    assert len(digests) == 2
    assert len(made) == 1
    assert (made[0]["total"], made[0]["failed_ids"]) == (6, ["m_2", "m_5"])  # it saw the other's record
    assert a.pending_count("chat") == 1


def test_an_outbox_row_is_claimed_by_one_replica_at_a_time(short_pair: tuple[PgStore, PgStore]) -> None:
    a, b = short_pair
    track(a, "exec_1", "exec_2")
    a.finish("exec_1", Outcome.COMPLETED, rec("exec_1"), ["hook"])
    a.finish("exec_2", Outcome.COMPLETED, rec("exec_2"), ["hook"])
    ev_1, ev_2 = event_id("exec_1", Outcome.COMPLETED), event_id("exec_2", Outcome.COMPLETED)
    row = a.get_delivery(ev_1, "hook")
    assert row is not None
    assert row.state is DeliveryState.PENDING
    assert b.get_delivery(ev_1, "hook") is None  # a is sending it
    assert [k[1] for k in b.pending_keys("hook")] == [ev_2]
    assert [k[1] for k in a.pending_keys("hook")] == [ev_1, ev_2]  # a's own claim does not hide it from a
    assert a.get_delivery(ev_1, "hook") is not None  # claimed again by its holder
    assert a.mark_failed(ev_1, "hook", "HTTP 503", next_attempt_at=1.0) == 1  # settles the claim
    assert b.get_delivery(ev_1, "hook") is not None
    assert a.get_delivery(ev_1, "hook") is None
    lapse()  # b died while sending: its claim lapses
    again = a.get_delivery(ev_1, "hook")
    assert again is not None
    assert again.attempts == 1
    assert b.mark_delivered(ev_1, "hook")  # b was only slow: at least once, never lost
    delivered = b.get_delivery(ev_1, "hook")  # a settled row is returned as it is, to anyone
    assert delivered is not None
    assert delivered.state is DeliveryState.DELIVERED
    assert b.get_delivery(ev_2, "hook") is not None
    b.release_all()  # a clean stop hands its outbox claims over too
    assert a.get_delivery(ev_2, "hook") is not None
    assert b.expire_pending("hook", time.time() + 1, "max_age") == []  # a's attempt is in flight
    assert a.expire_pending("hook", time.time() + 1, "max_age") == [ev_2]


def test_a_replica_holding_far_more_than_its_share_is_not_asked_to_flap(pair: tuple[PgStore, PgStore]) -> None:
    a, b = pair
    track(a, *(f"exec_{n}" for n in range(5)))
    a.claim_cycle()
    b.claim_cycle()
    assert a.claim_cycle().lost == []  # 5 > 3 (its share) but within the margin of 2
    assert b.claim_cycle(limit_hint=1).gained == []  # nothing free
    b.release_all()
    assert a.claim_cycle().held.keys() == {f"exec_{n}" for n in range(5)}


async def test_results_on_one_monitor_include_what_another_replica_recorded(pg_url: str) -> None:
    """Two library Monitors on one database: `results()` on the one that tracked nothing still
    returns every result, whichever replica polled it (read back after each claim cycle)."""
    import monitor.testing
    from monitor import Monitor

    async with monitor.testing.simulator(rate_limit="30/3s") as sim:
        ids = await sim.create(count=4, duration_s=0.5, outcome="completed")
        async with (
            Monitor(base_url=sim.url, api_key=sim.api_key, rate_limit="30/3s", state=pg_url) as first,
            Monitor(base_url=sim.url, api_key=sim.api_key, rate_limit="30/3s", state=pg_url) as second,
        ):
            await first.track(ids)
            got = {}
            async with asyncio.timeout(30):
                async for result in second.results(ids):
                    got[result.execution_id] = result.outcome
            assert got == dict.fromkeys(ids, "completed")
