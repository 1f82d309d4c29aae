"""Bounded state: retention pruning, indexes on every request path, private files, the real-path lock.

Real SQLite files throughout; times are epoch seconds around the real clock, because the outbox
stamps its rows with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor import engine as engine_module
from monitor.engine import Monitor
from monitor.records import Outcome, event_id
from monitor.state import db as db_module
from monitor.state.store import STATUS_FILTERS, StateError, Store, TrackRequest

DAY = 86400.0
WEEK = 7 * DAY
NOW = time.time()
LATER = NOW + 8 * DAY  # pruning "now" in these tests: every row stamped by the real clock is 8 d old
LONG_AGO = NOW - 10 * DAY  # ended 18 d before LATER
RECENTLY = NOW + 2 * DAY  # ended 6 d before LATER: within a week's retention


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(path: Path) -> Iterator[Store]:
    with Store.open(path) as s:
        yield s


def rec(execution_id: str, outcome: Outcome = Outcome.COMPLETED, group: str | None = None) -> dict[str, Any]:
    return {"event_id": event_id(execution_id, outcome), "kind": "execution", "execution_id": execution_id,
            "outcome": outcome.value, "finished_at": "2025-11-11T10:00:00Z", "observed_at": "2025-11-11T10:00:01Z",
            "group": group}  # fmt: skip


def end(store: Store, execution_id: str, at: float, sinks: list[str], *, delivered: tuple[str, ...] = ()) -> str:
    """Finish `execution_id` at `at` for `sinks`; mark it delivered to `delivered`; returns its event_id."""
    store.finish(execution_id, Outcome.COMPLETED, rec(execution_id), sinks, terminal_at=at)
    ev = event_id(execution_id, Outcome.COMPLETED)
    for sink in delivered:
        assert store.mark_delivered(ev, sink)
    return ev


def track(store: Store, *ids: str, group: str | None = None) -> None:
    store.track_many(TrackRequest(i, tracked_since=NOW, group=group) for i in ids)


def prune_pass(store: Store, now: float = LATER, batch: int = 500) -> list[int]:
    """What the Monitor's retention task does each period: call again while something went."""
    calls = [store.prune(now, WEEK, batch=batch)]
    while calls[-1] > 0:
        calls.append(store.prune(now, WEEK, batch=batch))
    return calls


def table(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the file with a second connection, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def executions(path: Path) -> set[str]:
    return {r[0] for r in table(path, "SELECT execution_id FROM executions")}


def outbox(path: Path) -> set[tuple[str, str, str]]:
    return {(r[0], r[1], r[2]) for r in table(path, "SELECT execution_id, sink, state FROM outbox")}


# -- what goes and what stays -------------------------------------------------------------------------


def test_prune_forgets_what_ended_long_ago_and_every_sink_confirmed(store: Store, path: Path) -> None:
    track(store, "old_done", "old_pending", "old_dead", "recent_done", "running")
    end(store, "old_done", LONG_AGO, ["jsonl", "hook"], delivered=("jsonl", "hook"))
    end(store, "old_pending", LONG_AGO, ["jsonl"])
    dead = end(store, "old_dead", LONG_AGO, ["jsonl", "hook"], delivered=("jsonl",))
    store.mark_dead(dead, "hook", "HTTP 410")
    end(store, "recent_done", RECENTLY, ["jsonl"], delivered=("jsonl",))

    assert prune_pass(store)[-1] == 0
    assert executions(path) == {"old_pending", "old_dead", "recent_done", "running"}
    # Delivered rows a week old go even where their execution stays; pending and dead ones never.
    assert outbox(path) == {("old_pending", "jsonl", "pending"), ("old_dead", "hook", "dead")}
    assert (store.pending_count(), store.dead_count()) == (1, 1)
    assert store.undelivered_among(["recent_done", "old_dead", "old_pending"]) == {"old_dead", "old_pending"}
    assert store.results(["old_done", "recent_done"]) == {"recent_done": Outcome.COMPLETED}
    # Forgotten: tracking the ID again starts afresh.
    assert store.track_many([TrackRequest("old_done", tracked_since=LATER)]) == ["old_done"]


def test_nothing_goes_within_the_retention(store: Store, path: Path) -> None:
    track(store, "a", "b", "c")
    end(store, "a", NOW - 6 * DAY, ["jsonl"], delivered=("jsonl",))
    end(store, "b", NOW - DAY, [])
    end(store, "c", NOW - 8 * DAY, ["jsonl"])  # a week old, but not delivered yet
    assert prune_pass(store, now=NOW) == [0]
    assert executions(path) == {"a", "b", "c"}
    assert len(outbox(path)) == 2


def test_a_batch_stays_until_its_digest_then_goes_with_its_members(store: Store, path: Path) -> None:
    store.set_group_sinks(["chat"])
    track(store, "g_1", "g_2", group="nightly")  # one call: one batch
    end(store, "g_1", LONG_AGO, [])
    prune_pass(store)
    assert executions(path) == {"g_1", "g_2"}  # the digest will need g_1's record
    store.finish("g_2", Outcome.FAILED, rec("g_2", Outcome.FAILED, "nightly"), [], terminal_at=LONG_AGO)
    [(_, digest_id, _)] = store.pending_keys("chat")
    prune_pass(store)
    assert executions(path) == set()  # members go once the digest is made, and the batch with them
    assert table(path, "SELECT count(*) FROM batches") == [(0,)]
    assert [key[1] for key in store.pending_keys("chat")] == [digest_id]
    assert store.mark_delivered(digest_id, "chat")  # the digest itself waits for its sink as any row
    prune_pass(store)
    assert outbox(path) == set()


def test_prune_goes_in_small_batches_and_on_past_what_must_stay(store: Store, path: Path) -> None:
    stuck = [f"stuck_{n:02d}" for n in range(50)]
    done = [f"done_{n:02d}" for n in range(10)]
    track(store, *stuck, *done)
    for n, execution_id in enumerate(stuck):  # the oldest: a dead letter each
        store.mark_dead(end(store, execution_id, LONG_AGO + n, ["hook"]), "hook", "HTTP 410")
    for n, execution_id in enumerate(done):  # no sink wanted them: nothing to confirm
        end(store, execution_id, LONG_AGO + 100 + n, [])
    sizes = []
    for _ in range(8):  # one call looks at 20 per one it may delete: 40 here
        before = len(executions(path))
        store.prune(LATER, WEEK, batch=2)
        sizes.append(before - len(executions(path)))
    # The first call finds only dead letters; the next ones go on from there, not from the oldest.
    assert sizes == [0, 2, 2, 2, 2, 2, 0, 0]
    assert executions(path) == set(stuck)


# -- no request path scans a table --------------------------------------------------------------------


def test_no_request_path_scans_a_table(store: Store, path: Path) -> None:
    track(store, *(f"exec_{n}" for n in range(20)), group="g")
    for n in range(10):
        end(store, f"exec_{n}", LONG_AGO, ["jsonl"], delivered=("jsonl",) if n % 2 else ())
    ids = [f"exec_{n}" for n in range(15)]
    statements: list[str] = []
    store._db.conn.set_trace_callback(statements.append)
    try:
        store.get("exec_1")
        for status in STATUS_FILTERS:
            store.list_executions(status, limit=5, offset=2)
            if status not in ("all", "terminal"):  # those count every row they cover: no index helps
                store.count_executions(status)
        store.load_active()
        store.pending_keys("jsonl", after_seq=1)
        store.terminal_records(ids)
        store.tracked_among(ids)
        store.results(ids)
        store.undelivered_among(ids)
        store.dead_letters()
        store.dead_letters("jsonl")
        store.pending_count()
        store.dead_count()
        store.prune(LATER, WEEK)
    finally:
        store._db.conn.set_trace_callback(None)
    queries = [s for s in statements if re.match(r"\s*(SELECT|DELETE|UPDATE)", s, re.IGNORECASE)]
    assert len(queries) > 25
    for sql in queries:
        plan = [row[3] for row in store._db.conn.execute("EXPLAIN QUERY PLAN " + sql)]
        assert not [step for step in plan if re.fullmatch(r"SCAN \w+", step)], f"{sql}\n{plan}"
        if sql.startswith("SELECT * FROM executions"):  # lists come in index order, never sorted whole
            assert "USE TEMP B-TREE FOR ORDER BY" not in plan, f"{sql}\n{plan}"


# -- files: private modes, one lock per real file ------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_state_files_are_created_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        with Store.open(tmp_path / "state.db") as s:
            track(s, "exec_a")  # the WAL and its index exist now
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == dict.fromkeys(["state.db", "state.db-wal", "state.db-shm", "state.db.lock"], 0o600)


def test_a_symlinked_state_path_takes_the_real_files_lock(tmp_path: Path) -> None:
    real = tmp_path / "data" / "state.db"
    real.parent.mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(real)  # dangling until the first open creates the real file
    (tmp_path / "dirlink").symlink_to(real.parent)
    with Store.open(link) as s:
        track(s, "exec_a")
        for other in (real, tmp_path / "dirlink" / "state.db"):
            with pytest.raises(StateError, match="in use by another execmon"):
                Store.open(other)
    assert real.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dirlink", "link.db"]  # no lock beside the link
    with Store.open(real) as s:
        assert s.get("exec_a") is not None


def test_a_cleanly_closed_file_is_not_read_whole_again_unless_it_changed(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[Path] = []
    check = db_module._check_integrity

    def counting(conn: sqlite3.Connection, where: Path) -> None:
        checked.append(where)
        check(conn, where)

    monkeypatch.setattr(db_module, "_check_integrity", counting)
    Store.open(path).close()
    with Store.open(path) as s:  # as this process left it: no second full read
        track(s, "exec_a")
    Store.open(path).close()  # written since, but by sqlite in a session that closed cleanly
    assert len(checked) == 1
    os.utime(path)  # changed by someone else
    Store.open(path).close()
    assert len(checked) == 2
    crash = "import os, sys; from monitor.state.store import Store; Store.open(sys.argv[1]); os._exit(0)"
    subprocess.run([sys.executable, "-c", crash, str(path)], check=True)  # exits without closing
    with Store.open(path) as s:
        assert len(checked) == 3
        assert s.get("exec_a") is not None


# -- the Monitor runs it ---------------------------------------------------------------------------------


async def test_the_monitor_prunes_in_the_background(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(path) as s:
        track(s, "old_done", "old_dead")
        end(s, "old_done", LONG_AGO, ["jsonl"], delivered=("jsonl",))
        s.mark_dead(end(s, "old_dead", LONG_AGO, ["jsonl"]), "jsonl", "HTTP 410")
    monkeypatch.setattr(engine_module, "_PRUNE_EVERY_S", 0.05)
    async with Monitor(base_url="http://127.0.0.1:9", api_key="sk_test_retention", state=path) as mon:
        for _ in range(200):
            if mon.store.get("old_done") is None:
                break
            await asyncio.sleep(0.02)
        assert mon.store.get("old_done") is None
        assert mon.store.get("old_dead") is not None
        assert mon.store.dead_count() == 1


async def test_a_dying_retention_task_fails_the_monitor_loudly(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine_module, "_PRUNE_EVERY_S", 0.01)
    async with Monitor(base_url="http://127.0.0.1:9", api_key="sk_test_retention", state=path) as mon:
        monkeypatch.setattr(mon.store, "prune", boom)
        failed = await asyncio.wait_for(mon.wait_failed(), timeout=5)
        assert "execmon-retention" in str(failed)
