"""The shared budget ledger against a real PostgreSQL: slots, the window on the database clock,
rows of a dead replica, pause and block across replicas, and the N-in-any-window invariant under
concurrent takers."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import psycopg
import pytest
from ledger_checks import assert_never_more_than, ledger_rows
from psycopg_pool import ConnectionPool

from monitor.errors import StoreFault
from monitor.state.pg.ledger import PgLedger, ensure_schema, key_id_for

KEY = "sk_live_shared_budget_secret"


@pytest.fixture
def url(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_schema(conn)
    return pg_url


@pytest.fixture
def ledgers(url: str) -> Iterator[tuple[PgLedger, PgLedger]]:
    """Two replicas of one key."""
    with PgLedger(url, KEY, replica="a") as a, PgLedger(url, KEY, replica="b") as b:
        yield a, b


def test_ensure_schema_is_idempotent(url: str) -> None:
    with psycopg.connect(url) as conn:  # not autocommit: inside the caller's transaction, as a migration
        ensure_schema(conn)
        ensure_schema(conn)
        conn.commit()
    with PgLedger(url, KEY) as ledger:
        assert ledger.take(1, 1.0, 1.0)[0] is not None


def test_key_id_is_a_hash_and_the_key_never_reaches_the_database(ledgers: tuple[PgLedger, PgLedger], url: str) -> None:
    a, _ = ledgers
    assert a.key_id == key_id_for(KEY)
    assert len(a.key_id) == 16
    assert int(a.key_id, 16) >= 0
    a.take(1, 1.0, 1.0)
    a.pause(1.0)
    a.block("rejected")
    with psycopg.connect(url) as conn:
        dump = conn.execute("SELECT l::text FROM ledger l UNION ALL SELECT k::text FROM budget_keys k").fetchall()
    assert dump
    assert all(KEY not in line for (line,) in dump)


def test_take_up_to_n_then_refuse_with_the_wait_until_a_slot_frees(ledgers: tuple[PgLedger, PgLedger]) -> None:
    a, b = ledgers
    slots = [a.take(3, 1.0, 5.0), b.take(3, 1.0, 5.0), a.take(3, 1.0, 5.0)]
    assert all(slot is not None and wait == 0.0 for slot, wait in slots)
    assert len({slot for slot, _ in slots}) == 3
    for slot, _ in slots:
        assert slot is not None
        a.done(slot)
    slot, wait = b.take(3, 1.0, 5.0)
    assert slot is None
    assert 0.9 < wait <= 1.0  # the first answer leaves the window one window after it came back
    assert a.in_window(1.0, 5.0) == 3


def test_a_slot_frees_one_window_after_its_answer_by_the_database_clock(ledgers: tuple[PgLedger, PgLedger]) -> None:
    a, b = ledgers
    slot, _ = a.take(1, 1.0, 5.0)
    assert slot is not None
    a.done(slot)
    refused, wait = b.take(1, 1.0, 5.0)
    assert refused is None
    time.sleep(wait - 0.2)
    assert b.take(1, 1.0, 5.0)[0] is None  # still inside
    time.sleep(0.25)
    assert b.take(1, 1.0, 5.0)[0] is not None
    assert b.in_window(1.0, 5.0) == 1


def test_cancel_frees_a_slot_at_once_and_done_keeps_the_first_answer(
    ledgers: tuple[PgLedger, PgLedger], url: str
) -> None:
    a, b = ledgers
    slot, _ = a.take(1, 60.0, 5.0)
    assert slot is not None
    a.cancel(slot)
    second, _ = b.take(1, 60.0, 5.0)
    assert second is not None
    b.done(second)
    first_done = ledger_rows(url)[0][1]
    b.done(second)
    assert ledger_rows(url)[0][1] == first_done


def test_the_row_of_a_dead_replica_counts_until_started_plus_timeout_plus_window(
    ledgers: tuple[PgLedger, PgLedger],
) -> None:
    dead, alive = ledgers
    slot, _ = dead.take(1, 0.5, 0.5)
    assert slot is not None  # ... and the replica dies: no done, no cancel
    refused, wait = alive.take(1, 0.5, 0.5)
    assert refused is None
    assert 0.9 < wait <= 1.0  # started + timeout + window
    time.sleep(0.6)  # past the window, still within timeout + window
    assert alive.take(1, 0.5, 0.5)[0] is None
    time.sleep(wait - 0.6 + 0.05)
    assert alive.take(1, 0.5, 0.5)[0] is not None


def test_a_pause_is_shared_and_only_ever_lengthened(ledgers: tuple[PgLedger, PgLedger]) -> None:
    a, b = ledgers
    assert b.state() == (0.0, None)
    a.pause(0.6)
    a.pause(0.1)  # a shorter pause does not cut the longer one
    slot, wait = b.take(10, 1.0, 5.0)
    assert slot is None
    assert 0.4 < wait <= 0.6
    paused_for, blocked = b.state()
    assert 0.4 < paused_for <= 0.6
    assert blocked is None
    time.sleep(wait + 0.02)
    assert b.take(10, 1.0, 5.0)[0] is not None
    assert b.state() == (0.0, None)


def test_a_block_is_shared_until_unblock(ledgers: tuple[PgLedger, PgLedger]) -> None:
    a, b = ledgers
    a.block("401 from the API")
    assert b.take(10, 1.0, 5.0) == (None, math.inf)
    assert b.state() == (0.0, "401 from the API")
    b.unblock()
    assert a.take(10, 1.0, 5.0)[0] is not None
    assert a.state() == (0.0, None)


def test_prune_removes_only_rows_that_can_no_longer_count(ledgers: tuple[PgLedger, PgLedger], url: str) -> None:
    a, b = ledgers
    old, _ = a.take(10, 0.2, 0.2)
    assert old is not None
    time.sleep(0.45)
    recent, _ = b.take(10, 0.2, 0.2)  # take() prunes too (once per horizon): the old row is gone
    assert recent is not None
    assert len(ledger_rows(url)) == 1
    a.take(10, 0.2, 0.2)
    assert a.prune(0.2, 0.2) == 0
    time.sleep(0.45)
    assert a.prune(0.2, 0.2) == 2
    assert ledger_rows(url) == []


def test_keys_do_not_share_a_budget(url: str) -> None:
    with PgLedger(url, KEY) as a, PgLedger(url, KEY + "-other") as other:
        assert a.take(1, 60.0, 5.0)[0] is not None
        assert a.take(1, 60.0, 5.0)[0] is None
        assert other.take(1, 60.0, 5.0)[0] is not None


def test_database_faults_are_store_faults(url: str) -> None:
    with ConnectionPool(url, min_size=1, kwargs={"autocommit": True}, open=True) as pool:
        ledger = PgLedger(pool, KEY)
        assert ledger.take(1, 1.0, 1.0)[0] is not None
    with pytest.raises(StoreFault, match="take"):
        ledger.take(1, 1.0, 1.0)  # the pool is closed
    unreachable = "host=/nonexistent-socket-dir port=1 connect_timeout=1 password=hunter2-secret"
    with (
        ConnectionPool(unreachable, min_size=1, timeout=0.3, open=True, reconnect_timeout=30) as pool,
        pytest.raises(StoreFault, match="done") as caught,
    ):
        PgLedger(pool, KEY).done(1)
    assert KEY not in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_concurrent_replicas_never_put_more_than_n_in_any_window(url: str) -> None:
    n, window, timeout, run_s = 10, 1.0, 10.0, 3.0
    refusals = [0, 0, 0]
    errors: list[BaseException] = []
    deadline = time.monotonic() + run_s

    def replica(index: int) -> None:
        try:
            with PgLedger(url, KEY, replica=f"r{index}") as ledger:
                while time.monotonic() < deadline:
                    slot, wait = ledger.take(n, window, timeout)
                    if slot is None:
                        refusals[index] += 1
                        time.sleep(min(wait, 0.05) * (index + 1) / 3)  # taker's own rhythm: races on purpose
                        continue
                    if slot % 7 == 0:
                        ledger.cancel(slot)  # a request not sent after all
                    else:
                        ledger.done(slot)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = ledger_rows(url)
    assert all(done is not None for _, done in found)
    # Saturated the whole time: about n per window, and every replica was refused often.
    assert len(found) >= n * run_s * 0.8
    assert min(refusals) > 10
    assert_never_more_than(n, window, found)


def test_the_invariant_check_catches_a_burst() -> None:
    t0 = datetime(2025, 1, 1).timestamp()
    burst = [(t0 + i * 0.05, t0 + i * 0.05 + 0.01) for i in range(11)]
    with pytest.raises(AssertionError):
        assert_never_more_than(10, 1.0, burst)


def test_a_pool_of_the_callers_own_works_and_keeps_its_durability(url: str) -> None:
    # Not autocommit (the pool's context commits); refusals and done() commit without an fsync wait,
    # which must not leak into the caller's later transactions on the same connection.
    # The test server runs with synchronous_commit off (tests/pg.py): this pool's sessions start "on".
    on = {"options": "-c synchronous_commit=on"}
    with ConnectionPool(url, min_size=1, max_size=1, open=True, kwargs=on) as pool:
        ledger = PgLedger(pool, KEY)
        slot, _ = ledger.take(1, 60.0, 5.0)
        assert slot is not None
        assert ledger.take(1, 60.0, 5.0)[0] is None
        ledger.done(slot)
        with pool.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert [done is not None for _, done in ledger_rows(url)] == [True]
