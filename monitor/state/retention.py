"""Retention: what the state file forgets, one small batch at a time, so that it stays bounded.

An ended execution is kept for `state.retention` after it ended (so `ls`, `status`, `wait` and a
resumed watch still see it). Then it goes, with its outbox rows, but only once every sink has
confirmed its result (a pending row or a dead letter keeps it, and the row, until that changes)
and once its batch has had its digest (a digest is built from its members' records). Delivered
outbox rows go when they were confirmed that long ago; a digested batch goes when no member is
left. Each step touches at most `limit` rows of each kind: one short transaction of the caller's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

# Where the walk over ended executions stands: (terminal_at, rowid) of the last one looked at.
Cursor = tuple[float, int]
START: Cursor = (-1.0, -1)  # before any end (epoch seconds) and any rowid
# How many ended executions one call may look at per one it may delete: it looks past those that
# must stay (a dead letter) but stays short (an index probe each) when thousands must.
_LOOK_AHEAD = 20

_ENDED_BEFORE = (
    "SELECT rowid, terminal_at, execution_id,"
    " NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.execution_id = e.execution_id AND o.state != 'delivered')"
    " AND (e.batch IS NULL OR EXISTS (SELECT 1 FROM batches AS b WHERE b.batch = e.batch AND b.digest_at IS NOT NULL))"
    " AS done"
    " FROM executions AS e WHERE terminal_at < ? AND (terminal_at, rowid) > (?, ?)"
    " ORDER BY terminal_at, rowid LIMIT ?"
)


def prune_executions(conn: sqlite3.Connection, cutoff: float, after: Cursor, limit: int) -> tuple[int, Cursor]:
    """Delete up to `limit` ended executions after `after` that are done with, and their outbox
    rows; returns the rows deleted and where to go on from (START once the walk has reached `cutoff`).

    The walk goes on from the cursor instead of from the oldest, so that executions that must stay
    are looked at once per walk, not once per call.
    """
    ids, position = _done_after(conn, cutoff, after, limit)
    deleted = 0
    if ids:  # their outbox rows first: all of them delivered
        deleted += _delete_in(conn, "outbox", "execution_id", ids)
        deleted += _delete_in(conn, "executions", "execution_id", ids)
    return deleted, position


def _done_after(conn: sqlite3.Connection, cutoff: float, after: Cursor, limit: int) -> tuple[list[str], Cursor]:
    """The next (up to) `limit` executions that can go, and the position of the last one looked at."""
    window = limit * _LOOK_AHEAD
    ids: list[str] = []
    looked, position = 0, after
    rows = conn.execute(_ENDED_BEFORE, (cutoff, *after, window))
    try:
        for row in rows:  # lazily: the usual call stops after `limit` rows
            looked, position = looked + 1, (float(row["terminal_at"]), int(row["rowid"]))
            if row["done"]:
                ids.append(str(row["execution_id"]))
                if len(ids) == limit:
                    return ids, position
    finally:
        rows.close()  # before the deletes
    return ids, START if looked < window else position


def prune_delivered(conn: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """Delete up to `limit` outbox rows confirmed before `cutoff` (never pending ones or dead letters)."""
    return conn.execute(
        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE state = 'delivered' AND updated_at < ? LIMIT ?)",
        (cutoff, limit),
    ).rowcount


def prune_batches(conn: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """Delete up to `limit` batches whose digest went out before `cutoff` and that have no member left."""
    return conn.execute(
        "DELETE FROM batches WHERE batch IN (SELECT batch FROM batches AS b WHERE digest_at < ?"
        " AND NOT EXISTS (SELECT 1 FROM executions AS e WHERE e.batch = b.batch) LIMIT ?)",
        (cutoff, limit),
    ).rowcount


def _delete_in(conn: sqlite3.Connection, table: str, column: str, values: Sequence[str]) -> int:
    marks = ",".join("?" * len(values))
    sql = f"DELETE FROM {table} WHERE {column} IN ({marks})"  # noqa: S608 -- fixed names, only placeholders
    return conn.execute(sql, values).rowcount
