"""Retention in PostgreSQL: what `monitor.state.retention` does for SQLite, in the same small steps
(see there for what goes and what stays). One replica prunes at a time: the others skip their turn
rather than wait on, or deadlock with, the same rows.
"""

from __future__ import annotations

from monitor.state.pg.conn import Cursor

# Where the walk over ended executions stands: (terminal_at, execution_id) of the last one looked at.
Walk = tuple[float, str]
START: Walk = (-1.0, "")  # before any end (epoch seconds) and any ID (bytewise order: "" first)
_LOOK_AHEAD = 20  # ended executions one call may look at per one it may delete (as in SQLite)

_ENDED_BEFORE = (
    "SELECT terminal_at, execution_id,"
    " NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.execution_id = e.execution_id AND o.state != 'delivered')"
    " AND (e.batch IS NULL OR EXISTS (SELECT 1 FROM batches AS b WHERE b.batch = e.batch AND b.digest_at IS NOT NULL))"
    " AS done"
    " FROM executions AS e"
    " WHERE terminal_at IS NOT NULL AND terminal_at < %s AND (terminal_at, execution_id) > (%s, %s)"
    " ORDER BY terminal_at, execution_id LIMIT %s"
)


def take_turn(cur: Cursor) -> bool:
    """Whether this replica may prune now (until its transaction ends); no waiting."""
    cur.execute("SELECT pg_try_advisory_xact_lock(hashtext('execmon-prune')) AS mine")
    row = cur.fetchone()
    return bool(row and row["mine"])


def prune_executions(cur: Cursor, cutoff: float, after: Walk, limit: int) -> tuple[int, Walk]:
    """Delete up to `limit` ended executions after `after` that are done with, and their outbox rows;
    returns the rows deleted and where to go on from (START once the walk has reached `cutoff`)."""
    window = limit * _LOOK_AHEAD
    cur.execute(_ENDED_BEFORE, (cutoff, *after, window))
    ids: list[str] = []
    looked, position = 0, after
    for row in cur.fetchall():
        looked, position = looked + 1, (float(row["terminal_at"]), str(row["execution_id"]))
        if row["done"]:
            ids.append(position[1])
            if len(ids) == limit:
                break
    if len(ids) < limit and looked < window:
        position = START
    deleted = 0
    if ids:  # their outbox rows first: all of them delivered
        cur.execute("DELETE FROM outbox WHERE execution_id = ANY(%s)", (ids,))
        deleted += cur.rowcount
        cur.execute("DELETE FROM executions WHERE execution_id = ANY(%s)", (ids,))
        deleted += cur.rowcount
    return deleted, position


def prune_delivered(cur: Cursor, cutoff: float, limit: int) -> int:
    """Delete up to `limit` outbox rows confirmed before `cutoff` (never pending ones or dead letters)."""
    cur.execute(
        "DELETE FROM outbox WHERE seq IN"
        " (SELECT seq FROM outbox WHERE state = 'delivered' AND updated_at < %s LIMIT %s)",
        (cutoff, limit),
    )
    return cur.rowcount


def prune_batches(cur: Cursor, cutoff: float, limit: int) -> int:
    """Delete up to `limit` batches whose digest went out before `cutoff` and that have no member left."""
    cur.execute(
        "DELETE FROM batches WHERE batch IN (SELECT batch FROM batches AS b WHERE digest_at < %s"
        " AND NOT EXISTS (SELECT 1 FROM executions AS e WHERE e.batch = b.batch) LIMIT %s)",
        (cutoff, limit),
    )
    return cur.rowcount
