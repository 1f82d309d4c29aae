"""The state file (SQLite): tracked executions and their schedule, the outbox, budget history.

This is the only module (with its helpers in this package) that speaks SQL. Calls are synchronous
and small, so the event loop may call them directly; big batches (`track_many`) are one
transaction. A terminal outcome and its outbox rows are written in ONE transaction, so a crash
can never leave a result that is terminal but undelivered-and-forgotten.

Failures: a file that is corrupt, foreign or newer is refused by `Store.open` (StateError). After
that, a call that cannot reach the disk (full, I/O error, busy) raises StoreFault, and whatever it
was asked to write did not happen; `probe()` says when writes work again.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from monitor.errors import StoreFault, UsageError
from monitor.logs import get_logger
from monitor.records import Outcome, build_group_record, new_batch_id
from monitor.state import retention
from monitor.state.db import Connection, FileLock, StateError, connect
from monitor.state.outbox import OutboxQueries, enqueue
from monitor.state.rows import (
    DeliveryState,
    FinishResult,
    OutboxRow,
    TrackedRow,
    TrackRequest,
    dumps,
    tracked_from,
)

log = get_logger(__name__)

BUDGET_KEEP_S = 3600.0  # request history older than this can no longer matter to any window
_PRUNE_EVERY = 64
# What save_poll keeps until flush_polls: (schedule, last_status, polls) per ID, serialised by the flush.
_PollRow = tuple[dict[str, Any] | None, dict[str, Any] | None, int]
STATUS_FILTERS = ("all", "active", "pending", "running", "stalled", "terminal", *(o.value for o in Outcome))


class Store(OutboxQueries):
    """One open state file, held exclusively by this process (see `Store.open`).

    Poll bookkeeping (`save_poll`, `complete_request`) is kept in memory and written by
    `flush_polls()` in one transaction: the owner calls it from a periodic task (about every
    second) and `close()` calls it once more. Reads of executions flush first, so they see it
    (during a fault they read what is on disk).
    """

    def __init__(self, db: Connection, lock: FileLock | None) -> None:
        self._db = db
        self._lock = lock
        self._group_sinks: tuple[str, ...] = ()
        self._budget_writes = 0
        self._polls: dict[str, _PollRow] = {}
        self._answered: dict[int, float] = {}  # budget row id -> when its answer came
        self._prune_cursor = retention.START

    @classmethod
    def open(cls, path: str | Path | None, *, read_only: bool = False) -> Store:
        """Open (or create) a state file. Raises StateError when it is in use, corrupt, newer or not
        ours (checked here, once), StoreFault when the disk fails under it.

        `path=None`: a private in-memory store (same schema, no lock), gone on close.
        `read_only=True` takes no lock (WAL lets it read beside a running writer); for inspection.
        """
        if path is None:
            if read_only:
                raise ValueError("an in-memory store cannot be opened read-only")
            return cls(Connection(connect(None, read_only=False), None), None)
        state_path = Path(path).expanduser()
        if not state_path.parent.is_dir():
            raise StateError(f"cannot open state file {state_path}: directory {state_path.parent} does not exist")
        lock = None
        if not read_only:
            lock = FileLock(state_path)
            lock.acquire(state_path)
        try:
            conn = connect(
                state_path, read_only=read_only, checked=lock is not None and lock.unchanged_since_clean_close()
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(Connection(conn, state_path), lock)

    def close(self) -> None:
        """Flush the buffered bookkeeping (best effort: losing it costs a few repeated polls), close."""
        try:
            self.flush_polls()
        except StoreFault as exc:
            log.warning("poll bookkeeping not saved at close", error=str(exc), executions=len(self._polls))
        self._db.close()
        if self._lock is not None:
            self._lock.release(clean=not self._db.faulted)
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def load_learning(self) -> str | None:
        """The policy's learned run times (JSON text) as last saved, or None."""
        rows = self._db.read("SELECT value FROM meta WHERE key = 'policy_learning'")
        return str(rows[0]["value"]) if rows else None

    def save_learning(self, text: str) -> None:
        """Replace the policy's learned run times (one row of `meta`)."""
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('policy_learning', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (text,),
            )

    def set_group_sinks(self, names: Sequence[str]) -> None:
        """The sinks that receive group digests (the delivery engine sets this from the sinks' `events`)."""
        self._group_sinks = tuple(names)

    # -- executions ---------------------------------------------------------------------------

    def track_many(self, rows: Iterable[TrackRequest]) -> list[str]:
        """Start tracking; returns the IDs that were new. A tracked ID is left as it is (schedule kept)."""
        added: list[str] = []
        call_batches: dict[str, str] = {}  # one call is one use of a group name: one batch
        with self._db.transaction() as conn:
            for row in rows:
                batch = _batch_of(row, call_batches)
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO executions (execution_id, tracked_since, deadline_at, grp, batch,"
                    " labels_json, schedule_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.execution_id,
                        row.tracked_since,
                        row.deadline_at,
                        row.group,
                        batch,
                        dumps(dict(row.labels)),
                        dumps(dict(row.schedule)) if row.schedule is not None else None,
                    ),
                )
                if cursor.rowcount:
                    added.append(row.execution_id)
                    if row.group is not None and batch is not None:
                        _join_batch(conn, batch, row.group, row.tracked_since)
        return added

    def untrack(self, execution_id: str) -> bool:
        """Forget an ID (its pending deliveries stay). A batch it leaves may become complete."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT batch, terminal_outcome FROM executions WHERE execution_id = ?", (execution_id,)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM executions WHERE execution_id = ?", (execution_id,))
                if row["batch"] is not None:
                    was_terminal = 1 if row["terminal_outcome"] is not None else 0
                    conn.execute(
                        "UPDATE batches SET members = members - 1, terminal = terminal - ? WHERE batch = ?",
                        (was_terminal, row["batch"]),
                    )
                    self._maybe_digest(conn, row["batch"])
        self._polls.pop(execution_id, None)
        return row is not None

    def get(self, execution_id: str) -> TrackedRow | None:
        rows = self._read_executions("SELECT * FROM executions WHERE execution_id = ?", (execution_id,))
        return tracked_from(rows[0]) if rows else None

    def load_active(self) -> list[TrackedRow]:
        """Every tracked ID that is not terminal yet, oldest first (what a restart resumes)."""
        rows = self._read_executions(
            "SELECT * FROM executions WHERE terminal_outcome IS NULL ORDER BY tracked_since, execution_id"
        )
        return [tracked_from(r) for r in rows]

    def list_executions(self, status_filter: str | None = None, limit: int = 1000, offset: int = 0) -> list[TrackedRow]:
        """Tracked IDs, oldest first. Filter: all, active|running, terminal, or an outcome."""
        where, params = _filter_sql(status_filter)
        rows = self._read_executions(
            f"SELECT * FROM executions {where} ORDER BY tracked_since, execution_id LIMIT ? OFFSET ?",  # noqa: S608 -- `where` is one of a fixed set
            [*params, limit, offset],
        )
        return [tracked_from(r) for r in rows]

    def count_executions(self, status_filter: str | None = None) -> int:
        where, params = _filter_sql(status_filter)
        rows = self._read_executions(f"SELECT count(*) AS n FROM executions {where}", params)  # noqa: S608 -- as above
        return int(rows[0]["n"])

    def _read_executions(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Buffered polls change schedules and the pending/running split: write them first. While
        the store cannot write, read what is on disk (a flush interval old) rather than fail."""
        with contextlib.suppress(StoreFault):
            self.flush_polls()
        return self._db.read(sql, params)

    def save_poll(
        self,
        execution_id: str,
        schedule: Mapping[str, Any] | None,
        last_status: Mapping[str, Any] | None,
        polls: int,
    ) -> None:
        """Note the schedule after a poll, in memory until `flush_polls` (only the latest per ID).

        The mappings are copied now (one level: pass values you will not change) and serialised by
        the flush, once per ID however often it was polled in between: a poll costs no JSON.
        """
        self._polls[execution_id] = (
            dict(schedule) if schedule is not None else None,
            dict(last_status) if last_status is not None else None,
            polls,
        )

    def flush_polls(self) -> int:
        """Write the buffered polls and answered requests in ONE transaction; returns how many.

        Not fsynced: a lost one costs a repeated poll, or a budget primed more carefully. On
        StoreFault the buffers are kept for the next call. Call it about every second.
        """
        if not self._polls and not self._answered:
            return 0
        rows = [
            (_dumps_or_none(schedule), _dumps_or_none(last_status), polls, execution_id)
            for execution_id, (schedule, last_status, polls) in self._polls.items()
        ]
        with self._db.transaction(durable=False) as conn:
            conn.executemany(
                "UPDATE executions SET schedule_json = ?, last_status_json = ?, polls = ?"
                " WHERE execution_id = ? AND terminal_outcome IS NULL",
                rows,
            )
            conn.executemany(
                "UPDATE budget SET stamp = ?, done = 1 WHERE id = ?",
                [(stamp, row_id) for row_id, stamp in self._answered.items()],
            )
        written = len(self._polls) + len(self._answered)
        self._polls.clear()
        self._answered.clear()
        return written

    def probe(self) -> None:
        """A tiny durable write that raises StoreFault while the store still cannot write."""
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('probe', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(time.time()),),
            )

    def finish(
        self,
        execution_id: str,
        outcome: Outcome | str,
        record: Mapping[str, Any],
        sinks: Sequence[str],
        *,
        terminal_at: float | None = None,
    ) -> FinishResult:
        """Mark terminal AND enqueue the record for `sinks`, in one transaction. Idempotent.

        When this was the group's last member, the group digest is built and enqueued for the
        group sinks in the same transaction.
        """
        with self._db.transaction() as conn:
            result = self._finish(
                conn, execution_id, Outcome(outcome), record=record, sinks=sinks, terminal_at=terminal_at or time.time()
            )
        self._polls.pop(execution_id, None)  # a terminal row takes no more poll bookkeeping
        return result

    def _finish(
        self,
        conn: sqlite3.Connection,
        execution_id: str,
        outcome: Outcome,
        *,
        record: Mapping[str, Any],
        sinks: Sequence[str],
        terminal_at: float,
    ) -> FinishResult:
        row = conn.execute(
            "SELECT batch, terminal_outcome FROM executions WHERE execution_id = ?", (execution_id,)
        ).fetchone()
        if row is None or row["terminal_outcome"] is not None:
            return FinishResult(newly_terminal=False)
        conn.execute(
            "UPDATE executions SET terminal_outcome = ?, terminal_at = ?, record_json = ? WHERE execution_id = ?",
            (outcome.value, terminal_at, dumps(dict(record)), execution_id),
        )
        added = enqueue(conn, record, sinks, execution_id=execution_id)
        group_record = None
        if row["batch"] is not None:
            conn.execute("UPDATE batches SET terminal = terminal + 1 WHERE batch = ?", (row["batch"],))
            group_record = self._maybe_digest(conn, row["batch"])
        return FinishResult(newly_terminal=True, enqueued=added, group_record=group_record)

    def enqueue_event(self, record: Mapping[str, Any], sinks: Sequence[str]) -> int:
        """Enqueue a record that ends nothing (a stall, a resume) for `sinks`, in one transaction;
        returns the rows added: 0 when its event_id was enqueued before (a freeze seen again)."""
        execution_id = record.get("execution_id")
        with self._db.transaction() as conn:
            return enqueue(conn, record, sinks, execution_id=None if execution_id is None else str(execution_id))

    def undelivered_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these executions have a result that some sink has not confirmed (pending or dead)."""
        rows = self._read_in(
            "SELECT DISTINCT execution_id FROM outbox WHERE execution_id IN ({marks}) AND state != 'delivered'",
            execution_ids,
        )
        return {str(r["execution_id"]) for r in rows}

    def results(self, execution_ids: Iterable[str] | None = None) -> dict[str, Outcome]:
        """The terminal outcome of each given ID that is terminal (no IDs: of every terminal one)."""
        if execution_ids is None:
            rows = self._db.read(
                "SELECT execution_id, terminal_outcome FROM executions WHERE terminal_outcome IS NOT NULL"
            )
        else:
            rows = self._read_in(
                "SELECT execution_id, terminal_outcome FROM executions WHERE execution_id IN ({marks})"
                " AND terminal_outcome IS NOT NULL",
                execution_ids,
            )
        return {str(r["execution_id"]): Outcome(r["terminal_outcome"]) for r in rows}

    def terminal_records(self, execution_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The result record of each given ID that is terminal (what `Monitor.results` hands out)."""
        rows = self._read_in(
            "SELECT execution_id, record_json FROM executions WHERE execution_id IN ({marks})"
            " AND record_json IS NOT NULL",
            execution_ids,
        )
        return {str(r["execution_id"]): json.loads(r["record_json"]) for r in rows}

    def tracked_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these IDs are tracked (terminal ones included)."""
        rows = self._read_in("SELECT execution_id FROM executions WHERE execution_id IN ({marks})", execution_ids)
        return {str(r["execution_id"]) for r in rows}

    def _read_in(self, sql: str, execution_ids: Iterable[str]) -> list[sqlite3.Row]:
        """`sql` with `IN ({marks})`, run over chunks of the IDs (an index lookup per ID, never a scan)."""
        rows: list[sqlite3.Row] = []
        for chunk in _chunks(list(execution_ids)):
            rows += self._db.read(sql.format(marks=",".join("?" * len(chunk))), chunk)
        return rows

    # -- retention ----------------------------------------------------------------------------

    def prune(self, now: float, retention_s: float, *, batch: int = 500) -> int:
        """Forget one batch of what ended more than `retention_s` before `now` (epoch s) and is done
        with; returns how many rows went. One short transaction (not fsynced: a lost prune is redone).

        At most `batch` of each: ended executions whose every outbox row is delivered and whose batch
        has had its digest (with their outbox rows), delivered outbox rows confirmed that long ago,
        digested batches with no member left. Pending rows and dead letters are never deleted, nor
        what they belong to. Call it again (letting the loop run in between) while it returns > 0.
        It goes on where the last call stopped, so executions that must stay are not looked at on
        every call (0 after thousands of those in a row: the next pass goes on past them).
        """
        cutoff = now - retention_s
        with self._db.transaction(durable=False) as conn:
            deleted, cursor = retention.prune_executions(conn, cutoff, self._prune_cursor, batch)
            deleted += retention.prune_delivered(conn, cutoff, batch)
            deleted += retention.prune_batches(conn, cutoff, batch)
        self._prune_cursor = cursor  # only once committed: a rolled-back batch is looked at again
        return deleted

    # -- group batches ------------------------------------------------------------------------

    def _maybe_digest(self, conn: sqlite3.Connection, batch: str) -> dict[str, Any] | None:
        """Enqueue the batch's digest once every member is terminal (once per batch)."""
        state = conn.execute(
            "SELECT name, members, terminal, digest_at FROM batches WHERE batch = ?", (batch,)
        ).fetchone()
        if state is None or state["digest_at"] is not None or state["members"] <= 0:
            return None
        if state["terminal"] < state["members"]:
            return None
        members = conn.execute(
            "SELECT record_json FROM executions WHERE batch = ? AND record_json IS NOT NULL", (batch,)
        ).fetchall()
        record = build_group_record(state["name"], batch, (json.loads(m["record_json"]) for m in members))
        enqueue(conn, record, self._group_sinks, execution_id=None)
        conn.execute("UPDATE batches SET digest_at = ? WHERE batch = ?", (time.time(), batch))
        return record

    # -- budget history -----------------------------------------------------------------------

    def record_request(self, stamp: float) -> int:
        """A request is about to be sent at `stamp` (epoch s); returns its row id.

        Written at once (WAL, not fsynced: it survives a killed process), because after a restart
        the budget must count every request the server may have counted.
        """
        with self._db.transaction(durable=False) as conn:
            cursor = conn.execute("INSERT INTO budget (stamp, done) VALUES (?, 0)", (stamp,))
            self._budget_writes += 1
            if self._budget_writes % _PRUNE_EVERY == 0:
                conn.execute("DELETE FROM budget WHERE stamp < ?", (stamp - BUDGET_KEEP_S,))
            return int(cursor.lastrowid or 0)

    def complete_request(self, row_id: int, stamp: float) -> None:
        """The answer came at `stamp`: the latest moment the server can have counted the request.

        Buffered until `flush_polls`: if it is lost, the restart counts the request as unanswered,
        i.e. seen at send time + timeout, which is never earlier than its answer (safe side).
        """
        self._answered[row_id] = stamp

    def recent_requests(self, since: float) -> list[tuple[float, bool]]:
        """(stamp, done) of requests at or after `since`, oldest first. Not done = sent, no answer seen."""
        self.flush_polls()
        rows = self._db.read("SELECT stamp, done FROM budget WHERE stamp >= ? ORDER BY stamp", (since,))
        return [(float(r["stamp"]), bool(r["done"])) for r in rows]


def _dumps_or_none(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else dumps(value)


def _chunks(items: Sequence[str], size: int = 500) -> Iterable[list[str]]:
    """Slices small enough for SQLite's limit on bound parameters."""
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _batch_of(row: TrackRequest, call_batches: dict[str, str]) -> str | None:
    """The batch a grouped execution joins: the one given, else a new one for this call and group."""
    if row.group is None:
        return None
    if row.batch is not None:
        return row.batch
    return call_batches.setdefault(row.group, new_batch_id(row.tracked_since))


def _join_batch(conn: sqlite3.Connection, batch: str, group: str, now: float) -> None:
    conn.execute(
        "INSERT INTO batches (batch, name, members, created_at) VALUES (?, ?, 1, ?)"
        " ON CONFLICT (batch) DO UPDATE SET members = members + 1",
        (batch, group, now),
    )


_WHERE = {
    "active": "WHERE terminal_outcome IS NULL",
    "pending": "WHERE terminal_outcome IS NULL AND polls = 0",  # tracked, never answered yet
    "running": "WHERE terminal_outcome IS NULL AND polls > 0",
    # The schedule says since when (monitor.schedule.persist).
    "stalled": "WHERE terminal_outcome IS NULL AND json_extract(schedule_json, '$.stall.since') IS NOT NULL",
    "terminal": "WHERE terminal_outcome IS NOT NULL",
}


def _filter_sql(status_filter: str | None) -> tuple[str, list[object]]:
    if status_filter in (None, "all"):
        return "", []
    if status_filter in _WHERE:
        return _WHERE[status_filter], []
    if status_filter in {o.value for o in Outcome}:
        return "WHERE terminal_outcome = ?", [status_filter]
    raise UsageError(f"unknown status filter {status_filter!r}: expected one of {', '.join(STATUS_FILTERS)}")


__all__ = [
    "DeliveryState",
    "FinishResult",
    "OutboxRow",
    "StateError",
    "Store",
    "TrackRequest",
    "TrackedRow",
]
