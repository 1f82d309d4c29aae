"""The state in PostgreSQL (`[state] url`): the StateStore of replicas that share one database.

It keeps the SQLite store's semantics (monitor.state.store): a terminal outcome and its outbox rows
commit in ONE transaction, poll bookkeeping is buffered until `flush_polls`, a group digest is
enqueued once per batch. On top of that, each replica holds leases on the executions it polls
(`claim_cycle`, monitor.state.pg.leases): it writes an execution's result or schedule only while
the fence it was given still matches, so a replica whose lease lapsed (paused, partitioned) cannot
overwrite the new owner's work; `finish` then raises LeaseLost and writes nothing.

Calls are synchronous and short, as with SQLite (statement_timeout bounds a stall). Failures: a
database that is unreachable at open, foreign or newer is refused by `PgStore.open` (StateError,
the URL shown without its password); after that, a dropped connection or a timeout is StoreFault
and what the call was asked to write did not happen.

The request budget of replicas is the shared ledger (monitor.state.pg.ledger), not this store:
`record_request`, `complete_request` and `recent_requests` keep the protocol but store nothing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import psycopg
from psycopg.abc import Params, Query
from psycopg.rows import DictRow
from psycopg_pool import ConnectionPool

from monitor.errors import LeaseLost, StoreFault, UsageError
from monitor.logs import get_logger
from monitor.records import Outcome
from monitor.secrets import Secret
from monitor.state.db import StateError
from monitor.state.pg import batches, leases, redact_url, retention, schema
from monitor.state.pg.conn import POOL_WAIT_S, Cursor, Database, connect_kwargs, describe, open_pool
from monitor.state.pg.leases import LeaseChange
from monitor.state.pg.ledger import LedgerSlots, PgLedger
from monitor.state.pg.outbox import PgOutboxQueries, enqueue
from monitor.state.rows import FinishResult, TrackedRow, TrackRequest, dumps, tracked_from

log = get_logger(__name__)

# What save_poll keeps until flush_polls: (schedule, last_status, polls) per ID, serialised by the flush.
_PollRow = tuple[dict[str, Any] | None, dict[str, Any] | None, int]
_NO_FENCE = -1  # never a row's fence (they start at 0): a write with it matches nothing


class _ApiSettings(Protocol):
    @property
    def request_timeout_s(self) -> float: ...


class LedgerSettings(Protocol):
    """What `shared_slots` reads of a `monitor.config.Config` (the state layer does not import it)."""

    @property
    def api(self) -> _ApiSettings: ...

    def api_key(self) -> Secret: ...


class PgStore(PgOutboxQueries):
    """One replica's view of the shared state. `replica` names it in the database (owner of leases
    and outbox claims); `lease_s` is how long one renewal of its leases lasts.

    Poll bookkeeping (`save_poll`) is kept in memory and written by `flush_polls()` (about every
    second) or by the next claim cycle; reads of executions flush first, so they see it.
    """

    def __init__(self, db: Database, *, replica: str, lease_s: float) -> None:
        self._db = db
        self.replica = replica
        self.lease_s = lease_s
        self._held: dict[str, int] = {}  # execution_id -> the fence of this replica's lease
        self._polls: dict[str, _PollRow] = {}
        self._group_sinks: tuple[str, ...] = ()
        self._prune_walk = retention.START

    @classmethod
    def open(
        cls, url: str, *, lease_s: float = 30.0, replica: str | None = None, wait_s: float = POOL_WAIT_S
    ) -> PgStore:
        """Connect, create or migrate the schema (one replica at a time), open the pool.

        Raises StateError when the server cannot be reached or refuses us, or the database is
        foreign or has a newer schema. `wait_s`: how long a call may wait for a connection.
        """
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        replica = replica or leases.new_replica_id()
        kwargs = connect_kwargs(url, f"execmon {replica}")
        db_where = redact_url(url)
        try:
            with psycopg.connect(url, **kwargs) as conn:
                schema.prepare(conn, db_where)
        except psycopg.Error as exc:
            raise StateError(f"cannot open the PostgreSQL state at {db_where}: {describe(exc, url)}") from None
        return cls(Database(open_pool(url, kwargs, wait_s=wait_s), url), replica=replica, lease_s=lease_s)

    @property
    def pool(self) -> ConnectionPool[Any]:
        """The connection pool (autocommit connections), e.g. for the shared ledger."""
        return self._db.pool

    def close(self) -> None:
        """Write the buffered bookkeeping and hand this replica's leases over (best effort: the leases
        otherwise lapse by themselves), then close the pool."""
        try:
            self.release_all()
        except StoreFault as exc:
            log.warning("leases not released at close", error=str(exc), executions=len(self._held))
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def probe(self) -> None:
        """A tiny durable write that raises StoreFault while the database still cannot be written."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('probe', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(time.time()),),
            )

    def load_learning(self) -> str | None:
        """The policy's learned run times (JSON text) as last saved, or None."""
        rows = self._db.read("SELECT value FROM meta WHERE key = 'policy_learning'")
        return str(rows[0]["value"]) if rows else None

    def save_learning(self, text: str) -> None:
        """Replace the policy's learned run times (one row of `meta`)."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('policy_learning', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (text,),
            )

    def set_group_sinks(self, names: Sequence[str]) -> None:
        """The sinks that receive group digests (the delivery engine sets this from the sinks' `events`)."""
        self._group_sinks = tuple(names)

    def shared_slots(
        self, config: LedgerSettings, *, on_fault: Callable[[StoreFault], None] | None = None
    ) -> LedgerSlots:
        """The key's request budget shared by every replica (monitor.state.pg.ledger), on this pool."""
        ledger = PgLedger(self.pool, config.api_key().reveal(), replica=self.replica)
        return LedgerSlots(ledger, config.api.request_timeout_s, on_fault=on_fault)

    # -- leases -------------------------------------------------------------------------------

    def claim_cycle(self, limit_hint: int | None = None) -> LeaseChange:
        """Renew this replica's leases and take its fair share of the rest, in one transaction.

        Buffered polls are written first. Then: this replica is marked alive; its leases are
        renewed (what it held but no longer does is `lost`); it claims up to ceil(active / live
        replicas) - held of the unheld or lapsed executions, oldest first (at most `limit_hint`),
        or, when it holds well over its share, releases the newest excess (also `lost`).
        """
        with self._db.transaction() as cur:
            self._write_polls(cur)
            leases.heartbeat(cur, self.replica)
            held = leases.renew(cur, self.replica, self.lease_s)
            target = leases.fair_share(cur, self.lease_s)
            claimed: list[DictRow] = []
            released: list[str] = []
            if len(held) < target:
                want = target - len(held) if limit_hint is None else min(target - len(held), max(0, limit_hint))
                claimed = leases.claim(cur, self.replica, self.lease_s, want) if want else []
            elif len(held) > target + max(2, target // 10):  # a margin, so shares do not flap
                released = leases.release_newest(cur, self.replica, len(held) - target)
            # Held without this process knowing (a replica id used again): polled from now on too.
            unknown = [i for i in held if i not in self._held]
            if unknown:
                cur.execute("SELECT * FROM executions WHERE execution_id = ANY(%s) ORDER BY tracked_since", (unknown,))
                claimed = cur.fetchall() + claimed
        self._polls.clear()
        lost = [i for i in self._held if i not in held] + released
        gained = [row for row in claimed if row["execution_id"] not in released]
        held.update((str(row["execution_id"]), int(row["fence"])) for row in gained)
        for execution_id in released:
            held.pop(execution_id, None)
        self._held = held
        return LeaseChange(held=dict(held), gained=[tracked_from(row) for row in gained], lost=lost)

    def release_all(self) -> int:
        """At a clean stop: hand every execution and outbox claim over at once (others take them in
        their next cycle, not after the lease). Buffered polls are written first. Returns how many."""
        with self._db.transaction() as cur:
            self._write_polls(cur)
            released = leases.release_all(cur, self.replica)
        self._polls.clear()
        self._held.clear()
        return released

    def owned_counts(self) -> dict[str, int]:
        """Active executions per replica with a live lease (for metrics)."""
        return {str(r["owner"]): int(r["n"]) for r in self._db.read(leases.OWNED_COUNTS)}

    # -- executions ---------------------------------------------------------------------------

    def track_many(self, rows: Iterable[TrackRequest]) -> list[str]:
        """Start tracking; returns the IDs that were new (held by this replica, which polls them at
        once). A tracked ID is left as it is (schedule and owner kept). One statement per table."""
        call_batches: dict[str, str] = {}  # one call is one use of a group name: one batch
        wanted: dict[str, tuple[TrackRequest, str | None]] = {}
        for row in rows:
            if row.execution_id not in wanted:  # the first of a repeated ID counts, as in SQLite
                wanted[row.execution_id] = (row, batches.batch_of(row, call_batches))
        if not wanted:
            return []
        requests = list(wanted.values())
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO executions (execution_id, tracked_since, deadline_at, grp, batch, labels_json,"
                " schedule_json, owner, lease_until, fence)"
                " SELECT u.id, u.since, u.deadline, u.grp, u.batch, u.labels, u.schedule, %s,"
                " now() + make_interval(secs => %s), 1"
                " FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::text[], %s::text[], %s::text[], %s::text[])"
                " WITH ORDINALITY AS u(id, since, deadline, grp, batch, labels, schedule, n) ORDER BY u.n"
                " ON CONFLICT (execution_id) DO NOTHING RETURNING execution_id, fence",
                (
                    self.replica,
                    self.lease_s,
                    [r.execution_id for r, _ in requests],
                    [r.tracked_since for r, _ in requests],
                    [r.deadline_at for r, _ in requests],
                    [r.group for r, _ in requests],
                    [batch for _, batch in requests],
                    [dumps(dict(r.labels)) for r, _ in requests],
                    [None if r.schedule is None else dumps(dict(r.schedule)) for r, _ in requests],
                ),
            )
            new = {str(row["execution_id"]): int(row["fence"]) for row in cur.fetchall()}
            batches.join(cur, [(r, batch) for r, batch in requests if r.execution_id in new])
        self._held.update(new)
        return [execution_id for execution_id in wanted if execution_id in new]

    def untrack(self, execution_id: str) -> bool:
        """Forget an ID, whoever holds it (its pending deliveries stay). A batch it leaves may become complete."""
        with self._db.transaction() as cur:
            cur.execute(
                "DELETE FROM executions WHERE execution_id = %s RETURNING batch, terminal_outcome", (execution_id,)
            )
            row = cur.fetchone()
            if row is not None and row["batch"] is not None:
                cur.execute(
                    "UPDATE batches SET members = members - 1, terminal = terminal - %s WHERE batch = %s",
                    (0 if row["terminal_outcome"] is None else 1, row["batch"]),
                )
                batches.maybe_digest(cur, row["batch"], self._group_sinks)
        self._forget(execution_id)
        return row is not None

    def get(self, execution_id: str) -> TrackedRow | None:
        rows = self._read_executions("SELECT * FROM executions WHERE execution_id = %s", (execution_id,))
        return tracked_from(rows[0]) if rows else None

    def load_active(self) -> list[TrackedRow]:
        """What this replica polls: a claim cycle first, then every execution it holds, oldest first."""
        self.claim_cycle()
        rows = self._db.read(
            "SELECT * FROM executions WHERE owner = %s AND terminal_outcome IS NULL"
            " ORDER BY tracked_since, execution_id",
            (self.replica,),
        )
        return [tracked_from(r) for r in rows]

    def list_executions(self, status_filter: str | None = None, limit: int = 1000, offset: int = 0) -> list[TrackedRow]:
        """Tracked IDs of every replica, oldest first. Filter: all, active, pending, running, stalled,
        terminal, or an outcome."""
        where, params = _filter_sql(status_filter)
        rows = self._read_executions(
            f"SELECT * FROM executions {where} ORDER BY tracked_since, execution_id LIMIT %s OFFSET %s",  # noqa: S608 -- `where` is one of a fixed set
            [*params, limit, offset],
        )
        return [tracked_from(r) for r in rows]

    def count_executions(self, status_filter: str | None = None) -> int:
        where, params = _filter_sql(status_filter)
        rows = self._read_executions(f"SELECT count(*) AS n FROM executions {where}", params)  # noqa: S608 -- as above
        return int(rows[0]["n"])

    def _read_executions(self, sql: Query, params: Params | None = None) -> list[DictRow]:
        """Buffered polls change schedules and the pending/running split: write them first. While
        the database cannot be written, read what is stored rather than fail."""
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
        """Note the schedule after a poll, in memory until `flush_polls` (only the latest per ID)."""
        self._polls[execution_id] = (
            dict(schedule) if schedule is not None else None,
            dict(last_status) if last_status is not None else None,
            polls,
        )

    def flush_polls(self) -> int:
        """Write the buffered polls in ONE transaction, only for executions this replica still holds
        (a lost one is skipped: its new owner's schedule wins). Returns how many entries were flushed;
        on StoreFault they are kept for the next call."""
        if not self._polls:
            return 0
        with self._db.transaction() as cur:
            self._write_polls(cur)
        flushed = len(self._polls)
        self._polls.clear()
        return flushed

    def _write_polls(self, cur: Cursor) -> None:
        rows = [
            (execution_id, _dumps_or_none(schedule), _dumps_or_none(status), polls, self._held[execution_id])
            for execution_id, (schedule, status, polls) in self._polls.items()
            if execution_id in self._held
        ]
        if rows:
            ids, schedules, statuses, counts, fences = (list(column) for column in zip(*rows, strict=True))
            cur.execute(
                "UPDATE executions AS e SET schedule_json = u.schedule, last_status_json = u.status, polls = u.polls"
                " FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::bigint[])"
                " AS u(id, schedule, status, polls, fence)"
                " WHERE e.execution_id = u.id AND e.owner = %s AND e.fence = u.fence AND e.terminal_outcome IS NULL",
                (ids, schedules, statuses, counts, fences, self.replica),
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
        """Mark terminal AND enqueue the record for `sinks` (and a completed batch's digest for the
        group sinks), in one transaction, while this replica's lease still holds. Idempotent: an
        unknown or already terminal ID changes nothing. Raises LeaseLost, writing nothing, when
        another replica holds the execution now (it will report the result itself)."""
        try:
            with self._db.transaction() as cur:
                result = self._finish(
                    cur, execution_id, Outcome(outcome), record, sinks, terminal_at=terminal_at or time.time()
                )
        except LeaseLost:
            self._forget(execution_id)
            raise
        self._forget(execution_id)  # terminal, or gone: no more lease or polls here (a fault keeps both)
        return result

    def _finish(
        self,
        cur: Cursor,
        execution_id: str,
        outcome: Outcome,
        record: Mapping[str, Any],
        sinks: Sequence[str],
        *,
        terminal_at: float,
    ) -> FinishResult:
        cur.execute(
            "UPDATE executions SET terminal_outcome = %s, terminal_at = %s, record_json = %s, owner = NULL,"
            " lease_until = NULL WHERE execution_id = %s AND owner = %s AND fence = %s AND terminal_outcome IS NULL"
            " RETURNING batch",
            (outcome.value, terminal_at, dumps(dict(record)), execution_id, self.replica, self._fence(execution_id)),
        )
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT terminal_outcome FROM executions WHERE execution_id = %s", (execution_id,))
            found = cur.fetchone()
            if found is None or found["terminal_outcome"] is not None:
                return FinishResult(newly_terminal=False)
            raise LeaseLost(execution_id)
        added = enqueue(cur, record, sinks, execution_id=execution_id)
        group_record = None
        if row["batch"] is not None:
            # Locks the batch row to the commit: one digest when replicas end its last members at once.
            cur.execute("UPDATE batches SET terminal = terminal + 1 WHERE batch = %s", (row["batch"],))
            group_record = batches.maybe_digest(cur, row["batch"], self._group_sinks)
        return FinishResult(newly_terminal=True, enqueued=added, group_record=group_record)

    def _fence(self, execution_id: str) -> int:
        return self._held.get(execution_id, _NO_FENCE)

    def _forget(self, execution_id: str) -> None:
        self._held.pop(execution_id, None)
        self._polls.pop(execution_id, None)

    def enqueue_event(self, record: Mapping[str, Any], sinks: Sequence[str]) -> int:
        """Enqueue a record that ends nothing (a stall, a resume) for `sinks`, in one transaction;
        returns the rows added: 0 when its event_id was enqueued before."""
        execution_id = record.get("execution_id")
        with self._db.transaction() as cur:
            return enqueue(cur, record, sinks, execution_id=None if execution_id is None else str(execution_id))

    def undelivered_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these executions have a result that some sink has not confirmed (pending or dead)."""
        rows = self._read_in(
            "SELECT DISTINCT execution_id FROM outbox WHERE execution_id = ANY(%s) AND state != 'delivered'",
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
                "SELECT execution_id, terminal_outcome FROM executions WHERE execution_id = ANY(%s)"
                " AND terminal_outcome IS NOT NULL",
                execution_ids,
            )
        return {str(r["execution_id"]): Outcome(r["terminal_outcome"]) for r in rows}

    def terminal_records(self, execution_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The result record of each given ID that is terminal (what `Monitor.results` hands out)."""
        rows = self._read_in(
            "SELECT execution_id, record_json FROM executions WHERE execution_id = ANY(%s) AND record_json IS NOT NULL",
            execution_ids,
        )
        return {str(r["execution_id"]): json.loads(r["record_json"]) for r in rows}

    def tracked_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these IDs are tracked (terminal ones included)."""
        rows = self._read_in("SELECT execution_id FROM executions WHERE execution_id = ANY(%s)", execution_ids)
        return {str(r["execution_id"]) for r in rows}

    def _read_in(self, sql: Query, execution_ids: Iterable[str]) -> list[DictRow]:
        """`sql` with `= ANY(%s)` over the IDs (one array parameter: an index lookup per ID)."""
        ids = list(execution_ids)
        return self._db.read(sql, (ids,)) if ids else []

    # -- retention ----------------------------------------------------------------------------

    def prune(self, now: float, retention_s: float, *, batch: int = 500) -> int:
        """Forget one batch of what ended more than `retention_s` before `now` (epoch s) and is done
        with, as the SQLite store does; returns how many rows went (call again while > 0). One
        replica prunes at a time: while another one does, this returns 0."""
        cutoff = now - retention_s
        walk = self._prune_walk
        with self._db.transaction() as cur:
            if not retention.take_turn(cur):
                return 0
            deleted, walk = retention.prune_executions(cur, cutoff, walk, batch)
            deleted += retention.prune_delivered(cur, cutoff, batch)
            deleted += retention.prune_batches(cur, cutoff, batch)
        self._prune_walk = walk  # only once committed: a rolled-back batch is looked at again
        return deleted

    # -- budget history: the shared ledger's job with replicas --------------------------------

    def record_request(self, stamp: float) -> int:
        """Nothing is stored: with replicas every request takes a row of the shared ledger
        (monitor.state.pg.ledger) before it is sent, which is what the budget counts. Returns 0."""
        return 0

    def complete_request(self, row_id: int, stamp: float) -> None:
        """Nothing to do (see `record_request`): the ledger's `done` notes an answer."""

    def recent_requests(self, since: float) -> list[tuple[float, bool]]:
        """Always empty (see `record_request`): the budget primes nothing from this store."""
        return []


def _dumps_or_none(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else dumps(value)


_WHERE = {
    "active": "WHERE terminal_outcome IS NULL",
    "pending": "WHERE terminal_outcome IS NULL AND polls = 0",  # tracked, never answered yet
    "running": "WHERE terminal_outcome IS NULL AND polls > 0",
    # The schedule says since when (monitor.schedule.persist); ->> gives NULL for a JSON null too.
    "stalled": "WHERE terminal_outcome IS NULL AND (schedule_json::jsonb -> 'stall' ->> 'since') IS NOT NULL",
    "terminal": "WHERE terminal_outcome IS NOT NULL",
}
STATUS_FILTERS = ("all", *_WHERE, *(o.value for o in Outcome))


def _filter_sql(status_filter: str | None) -> tuple[str, list[object]]:
    if status_filter in (None, "all"):
        return "", []
    if status_filter in _WHERE:
        return _WHERE[status_filter], []
    if status_filter in {o.value for o in Outcome}:
        return "WHERE terminal_outcome = %s", [status_filter]
    raise UsageError(f"unknown status filter {status_filter!r}: expected one of {', '.join(STATUS_FILTERS)}")


__all__ = ["LeaseChange", "PgStore"]
