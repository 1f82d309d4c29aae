"""The outbox: one row per (record, sink), written with the terminal state, retried until confirmed."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from monitor.state.db import Connection
from monitor.state.rows import OutboxRow, dumps, outbox_from

MAX_ERROR_CHARS = 2000  # a reason is a diagnosis, not a log: keep rows small


def enqueue(
    conn: sqlite3.Connection,
    record: Mapping[str, Any],
    sinks: Iterable[str],
    *,
    execution_id: str | None,
) -> int:
    """Insert one pending row per sink inside the caller's transaction; a row that exists is kept."""
    now = time.time()
    body = dumps(record)
    event_id, kind = str(record["event_id"]), str(record.get("kind", "execution"))
    added = 0
    for sink in dict.fromkeys(sinks):  # dedupe, keep order
        cursor = conn.execute(
            "INSERT OR IGNORE INTO outbox (event_id, sink, kind, execution_id, record_json, attempts,"
            " next_attempt_at, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, 0, 'pending', ?, ?)",
            (event_id, sink, kind, execution_id, body, now, now),
        )
        added += cursor.rowcount
    return added


class OutboxQueries:
    """Mixed into Store: every outbox query. Times given by callers are epoch seconds."""

    _db: Connection

    def pending_keys(self, sink: str, after_seq: int = 0) -> list[tuple[int, str, float]]:
        """(seq, event_id, next_attempt_at) of pending rows of `sink` added after `after_seq`."""
        rows = self._db.read(
            "SELECT seq, event_id, next_attempt_at FROM outbox"
            " WHERE sink = ? AND state = 'pending' AND seq > ? ORDER BY seq",
            (sink, after_seq),
        )
        return [(r["seq"], r["event_id"], r["next_attempt_at"]) for r in rows]

    def get_delivery(self, event_id: str, sink: str) -> OutboxRow | None:
        rows = self._db.read("SELECT * FROM outbox WHERE event_id = ? AND sink = ?", (event_id, sink))
        return outbox_from(rows[0]) if rows else None

    def mark_delivered(self, event_id: str, sink: str) -> bool:
        """Only after the sink confirmed. Not fsynced: losing it to a power cut means a redelivery."""
        with self._db.transaction(durable=False) as conn:
            cursor = conn.execute(
                "UPDATE outbox SET state = 'delivered', last_error = NULL, updated_at = ?"
                " WHERE event_id = ? AND sink = ? AND state = 'pending'",
                (time.time(), event_id, sink),
            )
            return cursor.rowcount > 0

    def mark_failed(self, event_id: str, sink: str, error: str, next_attempt_at: float) -> int:
        """Count one failed attempt and set when to try again; returns the attempts so far."""
        with self._db.transaction(durable=False) as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,"
                " updated_at = ? WHERE event_id = ? AND sink = ? AND state = 'pending'",
                (error[:MAX_ERROR_CHARS], next_attempt_at, time.time(), event_id, sink),
            )
            row = conn.execute(
                "SELECT attempts FROM outbox WHERE event_id = ? AND sink = ?", (event_id, sink)
            ).fetchone()
            return int(row["attempts"]) if row else 0

    def mark_dead(self, event_id: str, sink: str, reason: str, *, count_attempt: bool = True) -> bool:
        """Give up on this delivery: it becomes a dead letter, kept with its reason."""
        with self._db.transaction(durable=False) as conn:
            cursor = conn.execute(
                "UPDATE outbox SET state = 'dead', attempts = attempts + ?, last_error = ?, updated_at = ?"
                " WHERE event_id = ? AND sink = ? AND state = 'pending'",
                (1 if count_attempt else 0, reason[:MAX_ERROR_CHARS], time.time(), event_id, sink),
            )
            return cursor.rowcount > 0

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[OutboxRow]:
        sql = "SELECT * FROM outbox WHERE state = 'dead'"
        params: list[object] = []
        if sink is not None:
            sql += " AND sink = ?"
            params.append(sink)
        rows = self._db.read(sql + " ORDER BY seq LIMIT ?", [*params, limit])
        return [outbox_from(r) for r in rows]

    def retry_dead(self, event_id: str | None = None, sink: str | None = None) -> int:
        """Make dead letters pending again with a fresh attempt count and a fresh start for the
        sink's max_age (all of them when no filter)."""
        sql = "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0, created_at = ?, updated_at = ?"
        sql += " WHERE state = 'dead'"
        now = time.time()
        params: list[object] = [now, now]
        if event_id is not None:
            sql += " AND event_id = ?"
            params.append(event_id)
        if sink is not None:
            sql += " AND sink = ?"
            params.append(sink)
        with self._db.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def pending_count(self, sink: str | None = None) -> int:
        if sink is None:
            rows = self._db.read("SELECT count(*) AS n FROM outbox WHERE state = 'pending'")
        else:
            rows = self._db.read("SELECT count(*) AS n FROM outbox WHERE sink = ? AND state = 'pending'", (sink,))
        return int(rows[0]["n"])

    def dead_count(self) -> int:
        return int(self._db.read("SELECT count(*) AS n FROM outbox WHERE state = 'dead'")[0]["n"])

    # -- orphans: pending rows of a sink that is no longer configured ------------------------------

    def set_configured_sinks(self, names: Sequence[str]) -> None:
        """Note the sinks this process delivers to, so that `execmon dead-letters` can tell orphans."""
        with self._db.transaction(durable=False) as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('sinks', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(list(names)),),
            )

    def configured_sinks(self) -> list[str] | None:
        """The sinks the last process that opened this file delivered to (None: not noted yet)."""
        rows = self._db.read("SELECT value FROM meta WHERE key = 'sinks'")
        return [str(name) for name in json.loads(rows[0]["value"])] if rows else None

    def orphaned_counts(self, configured: Collection[str]) -> dict[str, int]:
        """Pending rows per sink name that is not among `configured`."""
        rows = self._db.read("SELECT sink, count(*) AS n FROM outbox WHERE state = 'pending' GROUP BY sink")
        return {str(r["sink"]): int(r["n"]) for r in rows if r["sink"] not in configured}

    def pending_rows(self, sinks: Sequence[str], limit: int = 1000) -> list[OutboxRow]:
        """Pending rows of these sinks, oldest first."""
        marks = ",".join("?" * len(sinks))
        rows = self._db.read(
            f"SELECT * FROM outbox WHERE state = 'pending' AND sink IN ({marks}) ORDER BY seq LIMIT ?",  # noqa: S608 -- only placeholders
            [*sinks, limit],
        )
        return [outbox_from(r) for r in rows]

    # -- max_age: results a paused sink could not be given in time --------------------------------

    def expire_pending(
        self, sink: str, created_before: float, why: str, keep: Collection[str] = (), limit: int = 1000
    ) -> list[str]:
        """Dead-letter pending rows of `sink` that entered the outbox before `created_before`, except
        `keep` (attempts in flight), oldest first; each reason is `why` plus its last error."""
        rows = self._db.read(
            "SELECT event_id, last_error FROM outbox WHERE sink = ? AND state = 'pending' AND created_at < ?"
            " ORDER BY seq LIMIT ?",
            (sink, created_before, limit),
        )
        expired = [(str(r["event_id"]), r["last_error"]) for r in rows if r["event_id"] not in keep]
        if not expired:
            return []
        now = time.time()
        with self._db.transaction(durable=False) as conn:
            conn.executemany(
                "UPDATE outbox SET state = 'dead', last_error = ?, updated_at = ?"
                " WHERE event_id = ? AND sink = ? AND state = 'pending'",
                [(f"{why}; last: {last or 'never attempted'}"[:MAX_ERROR_CHARS], now, e, sink) for e, last in expired],
            )
        return [event_id for event_id, _ in expired]
