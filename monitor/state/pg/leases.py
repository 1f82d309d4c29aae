"""Leases: which replica polls which execution, on the database's clock.

A replica holds an execution while `owner` is its id and `lease_until` is in the future. Each
claim (`fence + 1`) gives the row a new fence; the holder's writes carry the fence it was given,
so a replica whose lease lapsed and was taken cannot write over the new owner's work. These are
the statements of one claim cycle, run in the caller's transaction (see `PgStore.claim_cycle`).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from dataclasses import dataclass

from psycopg.rows import DictRow

from monitor.state.pg.conn import Cursor
from monitor.state.rows import TrackedRow

_FORGET_REPLICA_S = 86400.0  # a replica row nobody renewed for this long is gone for good

# Active executions per replica holding a live lease (for metrics).
OWNED_COUNTS = (
    "SELECT owner, count(*) AS n FROM executions"
    " WHERE terminal_outcome IS NULL AND owner IS NOT NULL AND lease_until >= now() GROUP BY owner"
)


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """What one claim cycle changed: every ID held now (with its fence), what was gained, what was lost."""

    held: dict[str, int]
    gained: list[TrackedRow]
    lost: list[str]


def new_replica_id() -> str:
    """Unique per process, readable in pg_stat_activity and in the executions' `owner`."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def heartbeat(cur: Cursor, replica: str) -> None:
    """This replica is alive (it counts in everyone's fair share); long-gone replicas are forgotten."""
    cur.execute(
        "INSERT INTO replicas (replica, host, pid) VALUES (%s, %s, %s)"
        " ON CONFLICT (replica) DO UPDATE SET seen_at = now()",
        (replica, socket.gethostname(), os.getpid()),
    )
    cur.execute("DELETE FROM replicas WHERE seen_at < now() - make_interval(secs => %s)", (_FORGET_REPLICA_S,))


def renew(cur: Cursor, replica: str, lease_s: float) -> dict[str, int]:
    """Extend every lease this replica still holds; returns them with their fences."""
    cur.execute(
        "UPDATE executions SET lease_until = now() + make_interval(secs => %(lease)s)"
        " WHERE owner = %(me)s AND terminal_outcome IS NULL RETURNING execution_id, fence",
        {"lease": lease_s, "me": replica},
    )
    return {str(row["execution_id"]): int(row["fence"]) for row in cur.fetchall()}


def fair_share(cur: Cursor, lease_s: float) -> int:
    """ceil(active executions / live replicas): what each replica should hold."""
    cur.execute(
        "SELECT (SELECT count(*) FROM executions WHERE terminal_outcome IS NULL) AS active,"
        " (SELECT count(*) FROM replicas WHERE seen_at > now() - make_interval(secs => %s)) AS live",
        (lease_s,),
    )
    row = cur.fetchone()
    assert row is not None
    return math.ceil(int(row["active"]) / max(1, int(row["live"])))


def claim(cur: Cursor, replica: str, lease_s: float, limit: int) -> list[DictRow]:
    """Take up to `limit` active executions nobody holds (or whose lease lapsed), oldest first.

    SKIP LOCKED: replicas claiming at the same moment take different rows instead of waiting.
    """
    cur.execute(
        "WITH picked AS (SELECT execution_id FROM executions"
        " WHERE terminal_outcome IS NULL AND (owner IS NULL OR lease_until < now())"
        " ORDER BY tracked_since, execution_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " UPDATE executions AS e SET owner = %(me)s, lease_until = now() + make_interval(secs => %(lease)s),"
        " fence = e.fence + 1"
        " FROM picked WHERE e.execution_id = picked.execution_id RETURNING e.*",
        {"limit": limit, "me": replica, "lease": lease_s},
    )
    return sorted(cur.fetchall(), key=lambda row: (row["tracked_since"], row["execution_id"]))


def release_newest(cur: Cursor, replica: str, count: int) -> list[str]:
    """Let go of this replica's `count` newest executions (others then claim them at once)."""
    cur.execute(
        "WITH gone AS (SELECT execution_id FROM executions WHERE owner = %(me)s AND terminal_outcome IS NULL"
        " ORDER BY tracked_since DESC, execution_id DESC LIMIT %(count)s FOR UPDATE)"
        " UPDATE executions AS e SET owner = NULL, lease_until = NULL"
        " FROM gone WHERE e.execution_id = gone.execution_id RETURNING e.execution_id",
        {"me": replica, "count": count},
    )
    return [str(row["execution_id"]) for row in cur.fetchall()]


def release_all(cur: Cursor, replica: str) -> int:
    """Hand everything over: executions and outbox claims; this replica no longer counts as live."""
    cur.execute("UPDATE executions SET owner = NULL, lease_until = NULL WHERE owner = %s", (replica,))
    released = cur.rowcount
    cur.execute("UPDATE outbox SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = %s", (replica,))
    cur.execute("DELETE FROM replicas WHERE replica = %s", (replica,))
    return released
