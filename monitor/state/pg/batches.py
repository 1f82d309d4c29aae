"""Group batches in PostgreSQL: each use of a group name is one batch, with one digest once every
member is terminal, as in the SQLite store, and still once when replicas finish members at once.

The caller's `UPDATE batches ...` (a member ended or left) locks the batch row until its commit, so
of two replicas finishing the last members together the second waits, then sees the first's count
and record (READ COMMITTED: each statement sees what committed before it), and only one of them
makes the digest. The digest's event_id is stable and its outbox rows are inserted once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from monitor.records import build_group_record, new_batch_id
from monitor.state.pg.conn import Cursor
from monitor.state.pg.outbox import enqueue
from monitor.state.rows import TrackRequest


def batch_of(row: TrackRequest, call_batches: dict[str, str]) -> str | None:
    """The batch a grouped execution joins: the one given, else a new one for this call and group."""
    if row.group is None:
        return None
    if row.batch is not None:
        return row.batch
    return call_batches.setdefault(row.group, new_batch_id(row.tracked_since))


def join(cur: Cursor, joined: Sequence[tuple[TrackRequest, str | None]]) -> None:
    """Count the new members of each batch (made at its first member's tracked_since, as in SQLite)."""
    counts: dict[str, tuple[str, int, float]] = {}
    for row, batch in joined:
        if row.group is not None and batch is not None:
            name, members, created = counts.get(batch, (row.group, 0, row.tracked_since))
            counts[batch] = (name, members + 1, created)
    if counts:
        cur.execute(
            "INSERT INTO batches (batch, name, members, created_at)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::float8[])"
            " ON CONFLICT (batch) DO UPDATE SET members = batches.members + excluded.members",
            (
                list(counts),
                [name for name, _, _ in counts.values()],
                [members for _, members, _ in counts.values()],
                [created for _, _, created in counts.values()],
            ),
        )


def maybe_digest(cur: Cursor, batch: str, sinks: Sequence[str]) -> dict[str, Any] | None:
    """Enqueue the batch's digest for `sinks` once every member is terminal (once per batch)."""
    cur.execute("SELECT name, members, terminal, digest_at FROM batches WHERE batch = %s FOR UPDATE", (batch,))
    state = cur.fetchone()
    if state is None or state["digest_at"] is not None or state["members"] <= 0:
        return None
    if state["terminal"] < state["members"]:
        return None
    cur.execute("SELECT record_json FROM executions WHERE batch = %s AND record_json IS NOT NULL", (batch,))
    members = [json.loads(m["record_json"]) for m in cur.fetchall()]
    record = build_group_record(state["name"], batch, members)
    enqueue(cur, record, sinks, execution_id=None)
    cur.execute("UPDATE batches SET digest_at = %s WHERE batch = %s", (time.time(), batch))
    return record
