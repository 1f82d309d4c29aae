"""The PostgreSQL store on a real server (tests/pg.py): the SQLite store's semantics, the schema and
its refusals, and faults. Two replicas on one database: tests/test_pg_replicas.py."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from test_store import rec

from monitor.errors import StoreFault, UsageError
from monitor.records import Outcome, event_id, group_event_id
from monitor.state.db import StateError
from monitor.state.pg import outbox as pg_outbox
from monitor.state.pg import redact_text, redact_url
from monitor.state.pg.schema import SCHEMA_VERSION
from monitor.state.pg.store import STATUS_FILTERS, PgStore
from monitor.state.protocol import StateStore
from monitor.state.rows import DeliveryState, TrackRequest

DAY = 86400.0
WEEK = 7 * DAY
NOW = time.time()
LATER = NOW + 8 * DAY  # pruning "now": every row stamped by the real clock is 8 days old then
LONG_AGO = NOW - 10 * DAY


@pytest.fixture
def store(pg_url: str) -> Iterator[PgStore]:
    with PgStore.open(pg_url) as s:
        yield s


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own, as another process would."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def track(store: PgStore, *ids: str, group: str | None = None, since: float = 1000.0) -> list[str]:
    return store.track_many(TrackRequest(i, tracked_since=since, group=group) for i in ids)


# -- executions -----------------------------------------------------------------------------------


def test_it_is_a_state_store_with_a_replica_id_per_process(store: PgStore) -> None:
    protocol: StateStore = store  # mypy checks that PgStore stands in for the SQLite Store
    assert protocol is store
    host, pid, token = store.replica.split(":")
    assert (host, int(pid), len(token)) == (socket.gethostname(), os.getpid(), 6)
    assert store.lease_s == 30.0


def test_track_many_adds_only_new_ids_and_keeps_the_schedule(store: PgStore) -> None:
    assert track(store, "exec_a", "exec_b") == ["exec_a", "exec_b"]
    store.save_poll("exec_a", {"next_due": 42.0}, {"status": "running", "progress": 5}, 3)
    again = store.track_many(
        [
            TrackRequest("exec_a", tracked_since=2000.0, schedule={"next_due": 1.0}),
            TrackRequest("exec_c", 2000.0, labels={"kind": "etl"}, deadline_at=9000.0),
            TrackRequest("exec_c", 3000.0),  # repeated in one call: the first counts
        ]
    )
    assert again == ["exec_c"]
    row = store.get("exec_a")
    assert row is not None
    assert row.schedule == {"next_due": 42.0}
    assert row.last_status == {"status": "running", "progress": 5}
    assert (row.polls, row.tracked_since, row.terminal) == (3, 1000.0, False)
    c = store.get("exec_c")
    assert c is not None
    assert (c.labels, c.deadline_at, c.tracked_since) == ({"kind": "etl"}, 9000.0, 2000.0)
    assert [r.execution_id for r in store.load_active()] == ["exec_a", "exec_b", "exec_c"]
    assert store.track_many([]) == []
    assert store.get("exec_unknown") is None


def test_ten_thousand_ids_are_tracked_in_one_statement(store: PgStore) -> None:
    ids = [f"exec_{n:06d}" for n in range(10_000)]
    started = time.perf_counter()
    added = store.track_many(TrackRequest(i, tracked_since=1.0, group="big", labels={"n": i}) for i in ids)
    took = time.perf_counter() - started
    assert added == ids
    assert took < 2.0, f"track_many(10,000) took {took:.2f} s"
    assert store.count_executions("active") == 10_000
    assert store.owned_counts() == {store.replica: 10_000}


def test_finish_marks_terminal_and_enqueues_per_sink_once(store: PgStore) -> None:
    track(store, "exec_a")
    result = store.finish("exec_a", Outcome.FAILED, rec("exec_a", Outcome.FAILED), ["jsonl", "webhook", "jsonl"])
    assert (result.newly_terminal, result.enqueued) == (True, 2)
    row = store.get("exec_a")
    assert row is not None
    assert row.outcome is Outcome.FAILED
    assert row.record is not None
    assert row.record["outcome"] == "failed"
    assert row.terminal_at is not None
    assert store.pending_count() == 2
    assert [k[1] for k in store.pending_keys("jsonl")] == [event_id("exec_a", Outcome.FAILED)]
    # Idempotent: a second finish (say, a duplicate poll answer) changes nothing.
    again = store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl", "stdout"])
    assert again.newly_terminal is False
    assert store.pending_count() == 2
    assert store.results() == {"exec_a": Outcome.FAILED}
    assert store.terminal_records(["exec_a", "exec_x"]) == {"exec_a": rec("exec_a", Outcome.FAILED)}
    assert store.finish("exec_unknown", Outcome.COMPLETED, rec("exec_unknown"), ["jsonl"]).newly_terminal is False
    assert store.owned_counts() == {}  # a terminal execution is nobody's lease


def test_terminal_state_and_outbox_rows_commit_together(store: PgStore, monkeypatch: pytest.MonkeyPatch) -> None:
    track(store, "exec_a")

    def broken_enqueue(*args: object, **kwargs: object) -> int:
        raise psycopg.OperationalError("server closed the connection unexpectedly (simulated)")

    monkeypatch.setattr("monitor.state.pg.store.enqueue", broken_enqueue)
    with pytest.raises(StoreFault, match=r"PostgreSQL state at .*: server closed the connection"):
        store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"])
    row = store.get("exec_a")
    assert row is not None
    assert row.terminal is False, "terminal without its outbox rows would lose the result"
    monkeypatch.setattr("monitor.state.pg.store.enqueue", pg_outbox.enqueue)
    assert store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"]).newly_terminal  # the lease was kept
    assert store.pending_count("jsonl") == 1


def test_list_filters_results_and_status_filters(store: PgStore) -> None:
    track(store, "exec_a", "exec_b", "exec_c", "exec_d")
    store.finish("exec_b", Outcome.NOT_FOUND, rec("exec_b", Outcome.NOT_FOUND), [])
    assert [r.execution_id for r in store.list_executions("active")] == ["exec_a", "exec_c", "exec_d"]
    assert [r.execution_id for r in store.list_executions("pending")] == ["exec_a", "exec_c", "exec_d"]
    store.save_poll("exec_c", None, {"status": "running", "progress": 5}, 1)
    store.save_poll("exec_d", {"stall": {"since": 5.0}}, {"status": "running"}, 2)
    store.save_poll("exec_a", {"stall": {"since": None}}, None, 0)
    assert [r.execution_id for r in store.list_executions("running")] == ["exec_c", "exec_d"]
    assert [r.execution_id for r in store.list_executions("pending")] == ["exec_a"]
    assert [r.execution_id for r in store.list_executions("stalled")] == ["exec_d"]
    assert [r.execution_id for r in store.list_executions("not_found")] == ["exec_b"]
    assert [r.execution_id for r in store.list_executions(None, limit=2, offset=1)] == ["exec_b", "exec_c"]
    assert store.count_executions("terminal") == 1
    assert store.count_executions() == 4
    for status in STATUS_FILTERS:
        assert store.count_executions(status) == len(store.list_executions(status))
    assert store.results(["exec_a", "exec_b"]) == {"exec_b": Outcome.NOT_FOUND}
    assert store.results([]) == {}
    assert store.tracked_among(["exec_a", "exec_b", "exec_zzz"]) == {"exec_a", "exec_b"}
    with pytest.raises(UsageError, match="unknown status filter 'done'"):
        store.list_executions("done")


def test_untrack_forgets_whoever_holds_it(store: PgStore) -> None:
    track(store, "exec_a", "exec_b")
    store.save_poll("exec_a", {"next_due": 1.0}, None, 1)
    assert store.untrack("exec_a") is True
    assert store.untrack("exec_a") is False
    assert store.flush_polls() == 0  # its buffered poll went with it
    assert [r.execution_id for r in store.load_active()] == ["exec_b"]


def test_the_request_history_is_the_ledgers_job(store: PgStore) -> None:
    row = store.record_request(100.0)
    store.complete_request(row, 100.5)
    assert (row, store.recent_requests(0.0)) == (0, [])


# -- the outbox -----------------------------------------------------------------------------------


def test_outbox_failures_backoff_dead_letters_and_retry(store: PgStore) -> None:
    track(store, "exec_a", "exec_b")
    store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["hook"])
    store.finish("exec_b", Outcome.COMPLETED, rec("exec_b"), ["hook"])
    ev_a, ev_b = event_id("exec_a", Outcome.COMPLETED), event_id("exec_b", Outcome.COMPLETED)
    assert [k[1] for k in store.pending_keys("hook")] == [ev_a, ev_b]
    assert store.mark_failed(ev_a, "hook", "HTTP 500", next_attempt_at=500.0) == 1
    assert store.mark_failed(ev_a, "hook", "HTTP 503", next_attempt_at=600.0) == 2
    assert [(k[1], k[2]) for k in store.pending_keys("hook")] == [(ev_a, 600.0), (ev_b, 0.0)]
    first = store.pending_keys("hook")[0][0]
    assert [k[1] for k in store.pending_keys("hook", after_seq=first)] == [ev_b]
    failed = store.get_delivery(ev_a, "hook")
    assert failed is not None
    assert (failed.attempts, failed.last_error, failed.record["execution_id"]) == (2, "HTTP 503", "exec_a")
    assert store.mark_delivered(ev_b, "hook") is True
    assert store.mark_delivered(ev_b, "hook") is False  # already settled
    assert store.mark_dead(ev_a, "hook", "HTTP 404 (not retried)") is True
    assert store.mark_failed(ev_a, "hook", "late", next_attempt_at=1.0) == 3  # settled: only read
    dead = store.dead_letters()
    assert [(d.event_id, d.state, d.attempts, d.last_error) for d in dead] == [
        (ev_a, DeliveryState.DEAD, 3, "HTTP 404 (not retried)")
    ]
    assert store.dead_letters("other") == []
    assert (store.pending_count(), store.dead_count()) == (0, 1)
    assert store.retry_dead(ev_a, "other") == 0
    assert store.retry_dead(ev_a) == 1
    row = store.get_delivery(ev_a, "hook")
    assert row is not None
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)
    delivered = store.get_delivery(ev_b, "hook")
    assert delivered is not None
    assert delivered.state is DeliveryState.DELIVERED
    assert store.get_delivery("ev_nothing", "hook") is None
    assert store.undelivered_among(["exec_a", "exec_b", "exec_unknown"]) == {"exec_a"}
    assert store.undelivered_among([]) == set()


def test_stall_events_are_enqueued_once(store: PgStore) -> None:
    record = {"event_id": "evs_1", "kind": "stalled", "execution_id": "exec_a"}
    assert store.enqueue_event(record, ["chat", "jsonl"]) == 2
    assert store.enqueue_event(record, ["chat"]) == 0
    row = store.get_delivery("evs_1", "chat")
    assert row is not None
    assert (row.kind, row.execution_id, row.record) == ("stalled", "exec_a", record)


def test_orphans_configured_sinks_and_expiry(store: PgStore) -> None:
    assert store.configured_sinks() is None
    store.set_configured_sinks(["jsonl"])
    store.set_configured_sinks(["jsonl", "hook"])
    assert store.configured_sinks() == ["jsonl", "hook"]
    track(store, "exec_a", "exec_b")
    store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl", "gone"])
    store.finish("exec_b", Outcome.COMPLETED, rec("exec_b"), ["gone"])
    assert store.orphaned_counts(["jsonl", "hook"]) == {"gone": 2}
    assert [(r.execution_id, r.sink) for r in store.pending_rows(["gone"])] == [("exec_a", "gone"), ("exec_b", "gone")]
    assert store.pending_rows(["gone"], limit=1)[0].execution_id == "exec_a"
    ev_a, ev_b = event_id("exec_a", Outcome.COMPLETED), event_id("exec_b", Outcome.COMPLETED)
    store.mark_failed(ev_a, "gone", "HTTP 503", next_attempt_at=1.0)
    assert store.expire_pending("gone", time.time() - 60, "max_age") == []  # younger than that
    assert store.expire_pending("gone", time.time() + 1, "past max_age 1d", keep={ev_b}) == [ev_a]
    [dead] = store.dead_letters("gone")
    assert (dead.event_id, dead.last_error) == (ev_a, "past max_age 1d; last: HTTP 503")
    assert store.expire_pending("gone", time.time() + 1, "past max_age 1d") == [ev_b]
    assert store.dead_letters("gone")[1].last_error == "past max_age 1d; last: never attempted"
    assert store.orphaned_counts(["jsonl"]) == {}


# -- group digests --------------------------------------------------------------------------------


def test_group_digest_once_after_the_last_member(store: PgStore) -> None:
    store.set_group_sinks(["chat"])
    track(store, "exec_1", "exec_2", "exec_3", group="nightly")
    track(store, "exec_other")
    assert store.finish("exec_1", Outcome.COMPLETED, rec("exec_1", group="nightly"), ["jsonl"]).group_record is None
    assert (
        store.finish("exec_2", Outcome.FAILED, rec("exec_2", Outcome.FAILED, "nightly"), ["jsonl"]).group_record is None
    )
    last = store.finish("exec_3", Outcome.CANCELLED, rec("exec_3", Outcome.CANCELLED, "nightly"), ["jsonl"])
    digest = last.group_record
    assert digest is not None
    batch = digest["batch"]
    assert batch.startswith("b_")
    assert digest["event_id"] == group_event_id("nightly", batch)
    assert (digest["kind"], digest["group"], digest["total"]) == ("group", "nightly", 3)
    assert digest["outcomes"] == {"cancelled": 1, "completed": 1, "failed": 1}
    assert digest["failed_ids"] == ["exec_2", "exec_3"]
    assert store.pending_keys("chat")[0][1] == group_event_id("nightly", batch)
    store.finish("exec_3", Outcome.CANCELLED, rec("exec_3", Outcome.CANCELLED, "nightly"), ["jsonl"])
    store.finish("exec_other", Outcome.COMPLETED, rec("exec_other"), ["jsonl"])
    assert store.pending_count("chat") == 1


def test_untracking_the_last_running_member_completes_the_group(store: PgStore) -> None:
    store.set_group_sinks(["chat"])
    track(store, "exec_1", "exec_2", group="g")
    store.finish("exec_1", Outcome.COMPLETED, rec("exec_1", group="g"), [])
    assert store.pending_count("chat") == 0
    assert store.untrack("exec_2") is True
    [(_, digest_id, _)] = store.pending_keys("chat")
    digest = store.get_delivery(digest_id, "chat")
    assert digest is not None
    assert digest_id == group_event_id("g", digest.record["batch"])
    assert (digest.record["total"], digest.record["failed_ids"]) == (1, [])


def test_each_use_of_a_group_name_is_its_own_batch_and_a_given_batch_spans_calls(store: PgStore) -> None:
    store.set_group_sinks(["chat"])
    track(store, "night1_a", "night1_b", group="nightly")  # one call: one batch
    track(store, "night2_a", group="nightly")  # the same name the next night: a new batch
    for execution_id in ("c_1", "c_2"):  # e.g. `execmon add` splitting one call into chunks
        store.track_many([TrackRequest(execution_id, tracked_since=1.0, group="g", batch="b_one")])
    assert store.finish("night1_a", Outcome.COMPLETED, rec("night1_a", group="nightly"), []).group_record is None
    second = store.finish("night2_a", Outcome.COMPLETED, rec("night2_a", group="nightly"), []).group_record
    third = store.finish("night1_b", Outcome.FAILED, rec("night1_b", Outcome.FAILED, "nightly"), []).group_record
    assert second is not None
    assert third is not None
    assert [second["total"], third["total"]] == [1, 2]
    assert second["batch"] != third["batch"]
    store.finish("c_1", Outcome.COMPLETED, rec("c_1", group="g"), [])
    done = store.finish("c_2", Outcome.COMPLETED, rec("c_2", group="g"), []).group_record
    assert done is not None
    assert (done["batch"], done["total"]) == ("b_one", 2)
    assert store.pending_count("chat") == 3


# -- retention ------------------------------------------------------------------------------------


def prune_pass(store: PgStore, now: float = LATER, batch: int = 500) -> list[int]:
    calls = [store.prune(now, WEEK, batch=batch)]
    while calls[-1] > 0:
        calls.append(store.prune(now, WEEK, batch=batch))
    return calls


def end(store: PgStore, execution_id: str, at: float, sinks: list[str], *, delivered: tuple[str, ...] = ()) -> str:
    store.finish(execution_id, Outcome.COMPLETED, rec(execution_id), sinks, terminal_at=at)
    ev = event_id(execution_id, Outcome.COMPLETED)
    for sink in delivered:
        assert store.mark_delivered(ev, sink)
    return ev


def test_prune_forgets_what_ended_long_ago_and_every_sink_confirmed(store: PgStore, pg_url: str) -> None:
    track(store, "old_done", "old_pending", "old_dead", "recent_done", "running", since=NOW)
    end(store, "old_done", LONG_AGO, ["jsonl", "hook"], delivered=("jsonl", "hook"))
    end(store, "old_pending", LONG_AGO, ["jsonl"])
    store.mark_dead(end(store, "old_dead", LONG_AGO, ["jsonl", "hook"], delivered=("jsonl",)), "hook", "HTTP 410")
    end(store, "recent_done", NOW + 2 * DAY, ["jsonl"], delivered=("jsonl",))
    assert prune_pass(store)[-1] == 0
    assert {r[0] for r in sql(pg_url, "SELECT execution_id FROM executions")} == {
        "old_pending",
        "old_dead",
        "recent_done",
        "running",
    }
    # Delivered rows a week old go even where their execution stays; pending and dead ones never.
    assert set(sql(pg_url, "SELECT execution_id, sink, state FROM outbox")) == {
        ("old_pending", "jsonl", "pending"),
        ("old_dead", "hook", "dead"),
    }
    assert store.track_many([TrackRequest("old_done", tracked_since=LATER)]) == ["old_done"]  # forgotten


def test_a_batch_stays_until_its_digest_then_goes_with_its_members(store: PgStore, pg_url: str) -> None:
    store.set_group_sinks(["chat"])
    track(store, "g_1", "g_2", group="nightly", since=NOW)
    end(store, "g_1", LONG_AGO, [])
    prune_pass(store)
    assert len(sql(pg_url, "SELECT 1 FROM executions")) == 2  # the digest will need g_1's record
    store.finish("g_2", Outcome.FAILED, rec("g_2", Outcome.FAILED, "nightly"), [], terminal_at=LONG_AGO)
    [(_, digest_id, _)] = store.pending_keys("chat")
    prune_pass(store)
    assert sql(pg_url, "SELECT count(*) FROM executions") == [(0,)]
    assert sql(pg_url, "SELECT count(*) FROM batches") == [(0,)]
    assert store.mark_delivered(digest_id, "chat")
    prune_pass(store)
    assert sql(pg_url, "SELECT count(*) FROM outbox") == [(0,)]


def test_prune_goes_in_small_batches_and_on_past_what_must_stay(store: PgStore, pg_url: str) -> None:
    stuck = [f"stuck_{n:02d}" for n in range(50)]
    done = [f"done_{n:02d}" for n in range(10)]
    track(store, *stuck, *done, since=NOW)
    for n, execution_id in enumerate(stuck):  # the oldest: a dead letter each
        store.mark_dead(end(store, execution_id, LONG_AGO + n, ["hook"]), "hook", "HTTP 410")
    for n, execution_id in enumerate(done):
        end(store, execution_id, LONG_AGO + 100 + n, [])
    sizes = []
    for _ in range(8):  # one call looks at 20 per one it may delete: 40 here
        before = sql(pg_url, "SELECT count(*) FROM executions")[0][0]
        store.prune(LATER, WEEK, batch=2)
        sizes.append(before - sql(pg_url, "SELECT count(*) FROM executions")[0][0])
    assert sizes == [0, 2, 2, 2, 2, 2, 0, 0]


def test_one_replica_prunes_at_a_time(store: PgStore, pg_url: str) -> None:
    track(store, "old", since=NOW)
    end(store, "old", LONG_AGO, [])
    with psycopg.connect(pg_url, autocommit=True) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(hashtext('execmon-prune'))")
        assert store.prune(LATER, WEEK) == 0  # another one is at it: no waiting
    assert store.prune(LATER, WEEK) == 1


# -- the schema -----------------------------------------------------------------------------------


def test_the_schema_is_made_once_with_the_ledgers_and_opened_again(pg_url: str) -> None:
    stores: list[PgStore] = []

    def open_one() -> None:
        stores.append(PgStore.open(pg_url))

    threads = [threading.Thread(target=open_one) for _ in range(3)]  # replicas that start together
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores) == 3
    for s in stores:
        s.close()
    assert sql(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    tables = {r[0] for r in sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"meta", "executions", "batches", "outbox", "replicas", "ledger", "budget_keys"} <= tables
    with PgStore.open(pg_url) as again:
        assert again.count_executions() == 0


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    PgStore.open(pg_url).close()
    sql(pg_url, "UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StateError, match=r"newer execmon \(schema 2; .*upgrade execmon"):
        PgStore.open(pg_url)


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE accounts (id int)",
        "CREATE TABLE meta (key text, value text)",  # no version in it
        "CREATE TABLE meta (id int)",  # another shape
    ],
)
def test_a_foreign_database_is_refused_and_left_untouched(pg_url: str, ddl: str) -> None:
    sql(pg_url, ddl)
    with pytest.raises(StateError, match="holds other tables but no execmon state"):
        PgStore.open(pg_url)
    tables = {r[0] for r in sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert "executions" not in tables
    assert "ledger" not in tables


def test_an_unreachable_server_is_a_state_error_without_the_password() -> None:
    url = "postgresql://execmon:s3cr%40t-pw@127.0.0.1:1/execmon?connect_timeout=2"
    with pytest.raises(StateError, match=r"cannot open the PostgreSQL state at postgresql://execmon:\*\*\*@") as caught:
        PgStore.open(url)
    assert "s3cr" not in str(caught.value)
    with pytest.raises(StateError, match="not a usable PostgreSQL URL") as bad:
        PgStore.open("postgresql://execmon:s3cret-pw@db/x?nonsense=1")
    assert "s3cret-pw" not in str(bad.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@db:5432/x?sslmode=require") == "postgresql://u:***@db:5432/x?sslmode=require"
    assert redact_url("postgresql://u:p@ss@db/x") == "postgresql://u:***@db/x"
    assert redact_url("postgresql://u@db/x") == "postgresql://u@db/x"
    assert redact_url("postgresql:///x?host=/tmp&password=pw") == "postgresql:///x?host=/tmp&password=***"
    assert redact_url("host=db password='a b' user=u") == "host=db password=*** user=u"
    assert redact_text('missing "=" after "postgresql://u:hunter22@db" (hunter22)', "postgresql://u:hunter22@db") == (
        'missing "=" after "postgresql://u:***@db" (***)'
    )


# -- faults ---------------------------------------------------------------------------------------


def test_a_connection_the_server_dropped_is_replaced_without_a_fault(store: PgStore, pg_url: str) -> None:
    track(store, "exec_a")
    killed = sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND application_name LIKE 'execmon %%'",
    )
    assert killed
    assert store.count_executions() == 1


def test_a_server_that_refuses_us_is_a_store_fault_until_it_comes_back(pg_url: str) -> None:
    dbname = conninfo_to_dict(pg_url)["dbname"]
    admin = pg_url.replace(f"/{dbname}?", "/postgres?")
    with PgStore.open(pg_url, wait_s=0.3) as store:
        track(store, "exec_a")
        sql(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
            with pytest.raises(StoreFault, match=r"PostgreSQL state at postgresql://"):
                store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"])
            with pytest.raises(StoreFault):
                store.probe()
        finally:
            sql(admin, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 10
        while True:  # the pool reconnects with a backoff
            try:
                store.probe()
                break
            except StoreFault:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        result = store.finish("exec_a", Outcome.COMPLETED, rec("exec_a"), ["jsonl"])
        assert result.newly_terminal  # the fault kept the lease and wrote nothing
        assert store.pending_count("jsonl") == 1


def test_a_closed_pool_is_a_store_fault(pg_url: str) -> None:
    store = PgStore.open(pg_url)
    track(store, "exec_a")
    store.pool.close()
    with pytest.raises(StoreFault):
        store.count_executions()
    with pytest.raises(StoreFault):
        store.claim_cycle()
    store.close()  # best effort: a warning, no error


def test_learned_run_times_are_one_row_another_replica_reads(store: PgStore, pg_url: str) -> None:
    assert store.load_learning() is None
    store.save_learning('{"runs":[]}')
    store.save_learning('{"runs":[{"kind":"etl","n":3}]}')
    with PgStore.open(pg_url) as other:
        assert other.load_learning() == '{"runs":[{"kind":"etl","n":3}]}'
    assert sql(pg_url, "SELECT count(*) FROM meta WHERE key = 'policy_learning'") == [(1,)]
