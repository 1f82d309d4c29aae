"""The outbox in PostgreSQL: as in SQLite (one row per record and sink, retried until confirmed),
plus a claim per row, so that replicas do not all send the same row at once.

A lane's `get_delivery` claims the row for its replica for one lease (`claimed_by`, `claim_until`
on the database's clock); the other replicas skip it in `pending_keys` and get None from
`get_delivery` until the claim is settled (mark_delivered / mark_failed / mark_dead clear it) or
lapses (its replica died: a later rescan picks the row up). Delivery stays at-least-once: a claim
that lapses during a slow attempt may let another replica send the row too, with the same event_id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from monitor.state.outbox import MAX_ERROR_CHARS
from monitor.state.pg.conn import Cursor, Database
from monitor.state.rows import OutboxRow, dumps, outbox_from

# Where rows may be taken: not claimed by another replica whose claim is live (this replica's own
# claims do not hide rows): `(claimed_by IS NULL OR claimed_by = %(me)s OR claim_until < now())`.
# A settled attempt (delivered, failed, dead) clears the claim.


def enqueue(cur: Cursor, record: Mapping[str, Any], sinks: Iterable[str], *, execution_id: str | None) -> int:
    """Insert one pending row per sink inside the caller's transaction; a row that exists is kept."""
    names = list(dict.fromkeys(sinks))  # dedupe, keep order
    if not names:
        return 0
    now = time.time()
    cur.execute(
        "INSERT INTO outbox (event_id, sink, kind, execution_id, record_json, attempts, next_attempt_at, state,"
        " created_at, updated_at)"
        " SELECT %s, s.sink, %s, %s, %s, 0, 0, 'pending', %s, %s FROM unnest(%s::text[]) WITH ORDINALITY AS s(sink, n)"
        " ORDER BY s.n ON CONFLICT (event_id, sink) DO NOTHING",
        (
            str(record["event_id"]),
            str(record.get("kind", "execution")),
            execution_id,
            dumps(record),
            now,
            now,
            names,
        ),
    )
    return cur.rowcount


class PgOutboxQueries:
    """Mixed into PgStore: every outbox query. Times given by callers are epoch seconds."""

    _db: Database
    replica: str
    lease_s: float

    def pending_keys(self, sink: str, after_seq: int = 0) -> list[tuple[int, str, float]]:
        """(seq, event_id, next_attempt_at) of pending rows of `sink` after `after_seq` that no other
        live replica has claimed."""
        rows = self._db.read(
            "SELECT seq, event_id, next_attempt_at FROM outbox WHERE sink = %(sink)s AND state = 'pending'"
            " AND seq > %(after)s AND (claimed_by IS NULL OR claimed_by = %(me)s OR claim_until < now())"
            " ORDER BY seq",
            {"sink": sink, "after": after_seq, "me": self.replica},
        )
        return [(int(r["seq"]), str(r["event_id"]), float(r["next_attempt_at"])) for r in rows]

    def get_delivery(self, event_id: str, sink: str) -> OutboxRow | None:
        """The row, claimed for this replica if it is pending; None if another live replica holds it
        (or there is no such row). A delivered or dead row is returned as it is."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox SET claimed_by = %(me)s, claim_until = now() + make_interval(secs => %(lease)s)"
                " WHERE event_id = %(event)s AND sink = %(sink)s AND state = 'pending'"
                " AND (claimed_by IS NULL OR claimed_by = %(me)s OR claim_until < now())"
                " RETURNING *",
                {"me": self.replica, "lease": self.lease_s, "event": event_id, "sink": sink},
            )
            row = cur.fetchone()
            if row is None:
                cur.execute("SELECT * FROM outbox WHERE event_id = %s AND sink = %s", (event_id, sink))
                row = cur.fetchone()
                if row is None or row["state"] == "pending":  # pending: another replica's
                    return None
        return outbox_from(row)

    def mark_delivered(self, event_id: str, sink: str) -> bool:
        """Only after the sink confirmed."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox SET state = 'delivered', last_error = NULL, updated_at = %s,"
                " claimed_by = NULL, claim_until = NULL WHERE event_id = %s AND sink = %s AND state = 'pending'",
                (time.time(), event_id, sink),
            )
            return cur.rowcount > 0

    def mark_failed(self, event_id: str, sink: str, error: str, next_attempt_at: float) -> int:
        """Count one failed attempt and set when to try again; returns the attempts so far."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = %s, next_attempt_at = %s,"
                " updated_at = %s, claimed_by = NULL, claim_until = NULL"
                " WHERE event_id = %s AND sink = %s AND state = 'pending'",
                (error[:MAX_ERROR_CHARS], next_attempt_at, time.time(), event_id, sink),
            )
            cur.execute("SELECT attempts FROM outbox WHERE event_id = %s AND sink = %s", (event_id, sink))
            row = cur.fetchone()
            return int(row["attempts"]) if row else 0

    def mark_dead(self, event_id: str, sink: str, reason: str, *, count_attempt: bool = True) -> bool:
        """Give up on this delivery: it becomes a dead letter, kept with its reason."""
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox SET state = 'dead', attempts = attempts + %s, last_error = %s, updated_at = %s,"
                " claimed_by = NULL, claim_until = NULL WHERE event_id = %s AND sink = %s AND state = 'pending'",
                (1 if count_attempt else 0, reason[:MAX_ERROR_CHARS], time.time(), event_id, sink),
            )
            return cur.rowcount > 0

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[OutboxRow]:
        if sink is None:
            rows = self._db.read("SELECT * FROM outbox WHERE state = 'dead' ORDER BY seq LIMIT %s", (limit,))
        else:
            rows = self._db.read(
                "SELECT * FROM outbox WHERE state = 'dead' AND sink = %s ORDER BY seq LIMIT %s", (sink, limit)
            )
        return [outbox_from(r) for r in rows]

    def retry_dead(self, event_id: str | None = None, sink: str | None = None) -> int:
        """Make dead letters pending again with a fresh attempt count and a fresh start for the
        sink's max_age (all of them when no filter)."""
        now = time.time()
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0, created_at = %(now)s,"
                " updated_at = %(now)s, claimed_by = NULL, claim_until = NULL WHERE state = 'dead'"
                " AND (%(event)s::text IS NULL OR event_id = %(event)s)"
                " AND (%(sink)s::text IS NULL OR sink = %(sink)s)",
                {"now": now, "event": event_id, "sink": sink},
            )
            return cur.rowcount

    def pending_count(self, sink: str | None = None) -> int:
        if sink is None:
            rows = self._db.read("SELECT count(*) AS n FROM outbox WHERE state = 'pending'")
        else:
            rows = self._db.read("SELECT count(*) AS n FROM outbox WHERE sink = %s AND state = 'pending'", (sink,))
        return int(rows[0]["n"])

    def dead_count(self) -> int:
        return int(self._db.read("SELECT count(*) AS n FROM outbox WHERE state = 'dead'")[0]["n"])

    # -- orphans: pending rows of a sink that is no longer configured ------------------------------

    def set_configured_sinks(self, names: Sequence[str]) -> None:
        """Note the sinks this replica delivers to, so that `execmon dead-letters` can tell orphans
        (replicas share one list: the last one to start wins; they are meant to share a config)."""
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES ('sinks', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(list(names)),),
            )

    def configured_sinks(self) -> list[str] | None:
        """The sinks the last replica that started delivered to (None: not noted yet)."""
        rows = self._db.read("SELECT value FROM meta WHERE key = 'sinks'")
        return [str(name) for name in json.loads(rows[0]["value"])] if rows else None

    def orphaned_counts(self, configured: Collection[str]) -> dict[str, int]:
        """Pending rows per sink name that is not among `configured`."""
        rows = self._db.read("SELECT sink, count(*) AS n FROM outbox WHERE state = 'pending' GROUP BY sink")
        return {str(r["sink"]): int(r["n"]) for r in rows if r["sink"] not in configured}

    def pending_rows(self, sinks: Sequence[str], limit: int = 1000) -> list[OutboxRow]:
        """Pending rows of these sinks, oldest first."""
        rows = self._db.read(
            "SELECT * FROM outbox WHERE state = 'pending' AND sink = ANY(%s) ORDER BY seq LIMIT %s",
            (list(sinks), limit),
        )
        return [outbox_from(r) for r in rows]

    # -- max_age: results a paused sink could not be given in time --------------------------------

    def expire_pending(
        self, sink: str, created_before: float, why: str, keep: Collection[str] = (), limit: int = 1000
    ) -> list[str]:
        """Dead-letter pending rows of `sink` that entered the outbox before `created_before`, except
        `keep` (this replica's attempts in flight) and rows another live replica has claimed (its
        attempts in flight), oldest first; each reason is `why` plus its last error."""
        rows = self._db.read(
            "SELECT event_id, last_error FROM outbox WHERE sink = %(sink)s AND state = 'pending'"
            " AND created_at < %(before)s AND (claimed_by IS NULL OR claimed_by = %(me)s OR claim_until < now())"
            " ORDER BY seq LIMIT %(limit)s",
            {"sink": sink, "before": created_before, "me": self.replica, "limit": limit},
        )
        expired = [(str(r["event_id"]), r["last_error"]) for r in rows if r["event_id"] not in keep]
        if not expired:
            return []
        reasons = [f"{why}; last: {last or 'never attempted'}"[:MAX_ERROR_CHARS] for _, last in expired]
        with self._db.transaction() as cur:
            cur.execute(
                "UPDATE outbox AS o SET state = 'dead', last_error = u.reason, updated_at = %s,"
                " claimed_by = NULL, claim_until = NULL"
                " FROM unnest(%s::text[], %s::text[]) AS u(event_id, reason)"
                " WHERE o.event_id = u.event_id AND o.sink = %s AND o.state = 'pending'",
                (time.time(), [e for e, _ in expired], reasons, sink),
            )
        return [event_id for event_id, _ in expired]
