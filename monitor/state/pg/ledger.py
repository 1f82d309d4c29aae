"""The request budget shared by every replica: one ledger row per request, counted on the DATABASE clock.

`execmon_take_slot` (plpgsql, one round trip) first counts without a lock, so that a refusal writes
nothing; then it locks the key's `budget_keys` row and counts again in new statements, whose READ
COMMITTED snapshots are taken after the lock and see every row inserted by the takers before it; it
inserts a row only while fewer than n are in the window and the key is neither paused nor blocked.
Every row is inserted under that lock with `clock_timestamp()` read after the lock was granted, so
started_at grows in lock order and no window of started_at values ever holds more than n rows,
whatever the number of replicas.

A row counts while coalesce(done_at, started_at + timeout) > now - window: a request in flight counts
until its answer came back (or, if its replica died, until started_at + timeout + window). A request
is assumed to be over within `timeout_s` (the client's total timeout). The API key never reaches the
database or a log: only `key_id_for(key)`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from monitor.errors import StoreFault
from monitor.rates import RateLimit
from monitor.state.pg import redact_text

Params = tuple[object, ...] | dict[str, object]

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS budget_keys (
    key_id text PRIMARY KEY,
    paused_until timestamptz NULL,
    blocked text NULL,
    pruned_at timestamptz NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id bigserial PRIMARY KEY,
    key_id text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz NULL,
    replica text NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_key_started ON ledger (key_id, started_at);
CREATE OR REPLACE FUNCTION execmon_slot_wait(
    p_key text, p_n integer, p_window double precision, p_timeout double precision, p_now timestamptz
) RETURNS double precision
LANGUAGE plpgsql VOLATILE AS $fn$
-- NULL if a request may start at p_now; else seconds until one may (Infinity: blocked). Each statement
-- reads a new snapshot (READ COMMITTED, a volatile function).
DECLARE
    v_key budget_keys%ROWTYPE;
    v_window interval := make_interval(secs => p_window);
    v_timeout interval := make_interval(secs => p_timeout);
    v_count integer;
    v_free_at timestamptz;
BEGIN
    SELECT * INTO v_key FROM budget_keys WHERE key_id = p_key;
    IF v_key.blocked IS NOT NULL THEN
        RETURN 'Infinity';
    END IF;
    IF v_key.paused_until > p_now THEN
        RETURN extract(epoch FROM v_key.paused_until - p_now);
    END IF;
    SELECT count(*) INTO v_count FROM ledger
     WHERE key_id = p_key AND started_at > p_now - v_window - v_timeout
       AND coalesce(done_at, started_at + v_timeout) > p_now - v_window;
    IF v_count < p_n THEN
        RETURN NULL;
    END IF;
    -- Full: a slot frees when the (count - n + 1)-th row to leave the window has left it.
    SELECT e INTO v_free_at FROM (
        SELECT coalesce(done_at, started_at + v_timeout) AS e FROM ledger
         WHERE key_id = p_key AND started_at > p_now - v_window - v_timeout
           AND coalesce(done_at, started_at + v_timeout) > p_now - v_window
    ) AS counted ORDER BY e OFFSET v_count - p_n LIMIT 1;
    RETURN coalesce(extract(epoch FROM v_free_at + v_window - p_now), p_window);  -- coalesce: n < 1
END
$fn$;
CREATE OR REPLACE FUNCTION execmon_take_slot(
    p_key text, p_n integer, p_window double precision, p_timeout double precision, p_replica text
) RETURNS TABLE (slot bigint, wait_s double precision)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_key budget_keys%ROWTYPE;
    v_now timestamptz;
    v_horizon interval := make_interval(secs => p_window + p_timeout);
BEGIN
    -- First without the lock: refusing is always safe, and this refusal writes nothing (no WAL to flush).
    wait_s := execmon_slot_wait(p_key, p_n, p_window, p_timeout, clock_timestamp());
    IF wait_s IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- (a) One taker per key at a time: every ledger row of the key is inserted under this lock.
    SELECT * INTO v_key FROM budget_keys WHERE key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO budget_keys (key_id) VALUES (p_key) ON CONFLICT (key_id) DO NOTHING;
        SELECT * INTO v_key FROM budget_keys WHERE key_id = p_key FOR UPDATE;
    END IF;
    -- Not now(): that is the transaction's start, before the wait for the lock.
    v_now := clock_timestamp();
    IF v_key.pruned_at IS NULL OR v_key.pruned_at < v_now - v_horizon THEN  -- about once per horizon
        DELETE FROM ledger WHERE key_id = p_key AND started_at <= v_now - v_horizon;
        UPDATE budget_keys SET pruned_at = v_now WHERE key_id = p_key;
    END IF;
    -- (b) Counted again in new statements, so on snapshots taken after the lock: they see the rows of
    -- every taker that held it before.
    wait_s := execmon_slot_wait(p_key, p_n, p_window, p_timeout, v_now);
    IF wait_s IS NULL THEN  -- (c)
        INSERT INTO ledger (key_id, started_at, replica) VALUES (p_key, v_now, p_replica) RETURNING id INTO slot;
        wait_s := 0;
    END IF;
    RETURN NEXT;
END
$fn$;
CREATE OR REPLACE FUNCTION execmon_slot_done(p_id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    -- Lost in a crash, the row counts as in flight (until started + timeout + window): safe, so the
    -- commit does not wait for the WAL flush. Call it on its own: the setting lasts the transaction.
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE ledger SET done_at = now() WHERE id = p_id AND done_at IS NULL;
END
$fn$;
"""

_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('execmon-schema'))"


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the ledger's tables, index and function if missing; safe to run again and concurrently.

    Runs in a transaction (a savepoint inside the caller's) under the schema advisory lock, which a
    session that already holds it (the migration in schema.py) gets again at once.
    """
    with conn.transaction():
        conn.execute(_SCHEMA_LOCK)
        conn.execute(LEDGER_DDL)


def key_id_for(api_key: str) -> str:
    """The key's name in the database: the first 16 hex digits of its sha256, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


@contextmanager
def _faults(what: str, conninfo: str) -> Iterator[None]:
    """A dropped connection, a timeout or a closed pool is a StoreFault: transient, nothing happened."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # PoolTimeout is an OperationalError
        detail = redact_text(str(exc).strip().partition("\n")[0], conninfo)
        raise StoreFault(f"budget ledger: {what} failed ({type(exc).__name__}: {detail})") from exc


class PgLedger:
    """The shared ledger of one API key, as seen by one replica.

    `pool` is a psycopg_pool.ConnectionPool (made with kwargs={"autocommit": True}, or each call costs
    a BEGIN and a COMMIT more) or a conninfo string, for which the ledger opens a small pool of its own.
    Every method is one short statement, called from the event loop as the store is.
    """

    def __init__(self, pool: ConnectionPool[Any] | str, api_key: str, *, replica: str = "") -> None:
        self._own_pool = isinstance(pool, str)
        if isinstance(pool, str):
            pool = ConnectionPool(
                pool,
                min_size=1,
                max_size=2,
                kwargs={"autocommit": True, "connect_timeout": 5, "options": "-c statement_timeout=10000"},
                open=True,
                timeout=5.0,  # a checkout blocks the event loop: as long as connect_timeout at most
                name="execmon-ledger",
            )
        self._pool = pool
        self._conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""  # to redact driver messages
        self.key_id = key_id_for(api_key)
        self.replica = replica

    def close(self) -> None:
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> PgLedger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _one(self, what: str, sql: str, params: Params) -> tuple[Any, ...] | None:
        with _faults(what, self._conninfo), self._pool.connection() as conn:
            row: tuple[Any, ...] | None = conn.execute(sql, params).fetchone()
            return row

    def _run(self, what: str, sql: str, params: Params) -> int:
        with _faults(what, self._conninfo), self._pool.connection() as conn:
            count: int = conn.execute(sql, params).rowcount
            return count

    # -- slots ----------------------------------------------------------------------------------------

    def take(self, n: int, window_s: float, timeout_s: float) -> tuple[int | None, float]:
        """(row id, 0.0) if a request may start now; else (None, seconds until it may: inf if blocked)."""
        row = self._one(
            "take",
            "SELECT slot, wait_s FROM execmon_take_slot(%s, %s, %s, %s, %s)",
            (self.key_id, n, window_s, timeout_s, self.replica),
        )
        assert row is not None
        slot, wait = row
        return (int(slot), 0.0) if slot is not None else (None, float(wait))

    def done(self, row_id: int) -> None:
        """The answer came back: the row leaves the window `window` seconds from now."""
        self._run("done", "SELECT execmon_slot_done(%s)", (row_id,))

    def cancel(self, row_id: int) -> None:
        """The request was never sent: it frees its slot at once."""
        self._run("cancel", "DELETE FROM ledger WHERE id = %s", (row_id,))

    def prune(self, window_s: float, timeout_s: float) -> int:
        """Delete this key's rows that can no longer count (take() also does it about once a horizon)."""
        return self._run(
            "prune",
            "DELETE FROM ledger WHERE key_id = %s AND started_at <= now() - make_interval(secs => %s)",
            (self.key_id, window_s + timeout_s),
        )

    def in_window(self, window_s: float, timeout_s: float) -> int:
        """The rows take() would count now (answered in the window, or possibly still in flight)."""
        row = self._one(
            "in_window",
            """SELECT count(*) FROM ledger
                WHERE key_id = %(k)s AND started_at > clock_timestamp() - make_interval(secs => %(w)s + %(t)s)
                  AND coalesce(done_at, started_at + make_interval(secs => %(t)s))
                      > clock_timestamp() - make_interval(secs => %(w)s)""",
            {"k": self.key_id, "w": window_s, "t": timeout_s},
        )
        assert row is not None
        return int(row[0])

    # -- the key's state, shared by every replica ------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """A 429: no replica takes a slot until now + seconds (a longer pause already set is kept)."""
        self._run(
            "pause",
            """INSERT INTO budget_keys (key_id, paused_until) VALUES (%s, now() + make_interval(secs => %s))
               ON CONFLICT (key_id) DO UPDATE
               SET paused_until = greatest(budget_keys.paused_until, excluded.paused_until)""",
            (self.key_id, max(seconds, 0.0)),
        )

    def block(self, reason: str) -> None:
        """The key was rejected: no replica takes a slot until `unblock`."""
        self._run(
            "block",
            """INSERT INTO budget_keys (key_id, blocked) VALUES (%s, %s)
               ON CONFLICT (key_id) DO UPDATE SET blocked = excluded.blocked""",
            (self.key_id, reason),
        )

    def unblock(self) -> None:
        self._run("unblock", "UPDATE budget_keys SET blocked = NULL WHERE key_id = %s", (self.key_id,))

    def state(self) -> tuple[float, str | None]:
        """(seconds the pause still lasts, 0.0 if none; the block's reason, None if not blocked)."""
        row = self._one(
            "state",
            """SELECT greatest(coalesce(extract(epoch FROM paused_until - clock_timestamp()), 0), 0)::float8,
                      blocked
                 FROM budget_keys WHERE key_id = %s""",
            (self.key_id,),
        )
        return (0.0, None) if row is None else (float(row[0]), row[1])


class LedgerSlots:
    """A PgLedger as a Budget's `SharedSlots`: the budget passes its rate, this binds the request timeout.

    `on_fault`, if given, receives the StoreFault of done/cancel/pause/block/unblock instead of the
    caller (a row left undone only counts a little longer: safe); take() always raises it, since no
    request may start without a row.
    """

    def __init__(
        self, ledger: PgLedger, timeout_s: float, *, on_fault: Callable[[StoreFault], None] | None = None
    ) -> None:
        self.ledger = ledger
        self.timeout_s = timeout_s
        self._on_fault = on_fault

    def take(self, rate: RateLimit) -> tuple[int | None, float]:
        return self.ledger.take(rate.limit, rate.window_s, self.timeout_s)

    def done(self, slot: int) -> None:
        self._quietly(self.ledger.done, slot)

    def cancel(self, slot: int) -> None:
        self._quietly(self.ledger.cancel, slot)

    def pause(self, seconds: float) -> None:
        if math.isfinite(seconds):
            self._quietly(self.ledger.pause, seconds)

    def block(self, reason: str) -> None:
        self._quietly(self.ledger.block, reason)

    def unblock(self) -> None:
        self._quietly(self.ledger.unblock)

    def _quietly(self, call: Callable[..., object], *args: object) -> None:
        try:
            call(*args)
        except StoreFault as exc:
            if self._on_fault is None:
                raise
            self._on_fault(exc)
