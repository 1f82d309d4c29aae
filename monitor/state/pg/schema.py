"""The PostgreSQL schema: created or migrated at open, one replica at a time, and refused when it is
not ours (a foreign database) or newer than this execmon.

Everything runs in ONE transaction under `pg_advisory_xact_lock(hashtext('execmon-schema'))`, so
replicas that start together wait for each other and the second one finds the schema made (DDL is
transactional in PostgreSQL: a failed migration leaves nothing behind). The ledger's tables
(`monitor.state.pg.ledger`) are made in the same transaction.

Times the SQLite store keeps as epoch seconds stay `double precision` epoch seconds given by the
caller; leases and claims are `timestamptz` on the database's clock.
"""

from __future__ import annotations

from typing import Any

import psycopg

from monitor._version import __version__
from monitor.state.db import StateError
from monitor.state.pg.ledger import ensure_schema as ensure_ledger_schema

SCHEMA_VERSION = 1
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('execmon-schema'))"

# The newest schema, for an empty database. execution_id sorts bytewise (COLLATE "C"), as in SQLite,
# so that lists come in the primary key's order whatever the database's locale.
_SCHEMA = (
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE executions (
        execution_id text COLLATE "C" PRIMARY KEY,
        tracked_since double precision NOT NULL,
        deadline_at double precision,
        grp text,
        batch text,
        labels_json text NOT NULL DEFAULT '{}',
        schedule_json text,
        last_status_json text,
        polls integer NOT NULL DEFAULT 0,
        terminal_outcome text,
        terminal_at double precision,
        record_json text,
        owner text,
        lease_until timestamptz,
        fence bigint NOT NULL DEFAULT 0
    ) WITH (fillfactor = 70)""",  # room on each page for those in-place updates
    "CREATE INDEX executions_by_batch ON executions (batch) WHERE batch IS NOT NULL",
    "CREATE INDEX executions_by_outcome ON executions (terminal_outcome, tracked_since, execution_id)",
    "CREATE INDEX executions_by_tracked ON executions (tracked_since, execution_id)",
    "CREATE INDEX executions_by_terminal_at ON executions (terminal_at, execution_id) WHERE terminal_at IS NOT NULL",
    # Renewals and releases find a replica's rows by owner. No index holds lease_until: a renewal
    # (every row held, every cycle) and a poll's bookkeeping then change no indexed column, so
    # PostgreSQL updates the row in place (HOT) instead of adding an entry to every index.
    # Claims walk executions_by_outcome in tracked_since order.
    "CREATE INDEX executions_by_owner ON executions (owner) WHERE owner IS NOT NULL",
    """CREATE TABLE batches (
        batch text PRIMARY KEY,
        name text NOT NULL,
        members integer NOT NULL DEFAULT 0,
        terminal integer NOT NULL DEFAULT 0,
        digest_at double precision,
        created_at double precision NOT NULL
    )""",
    "CREATE INDEX batches_by_digest_at ON batches (digest_at) WHERE digest_at IS NOT NULL",
    """CREATE TABLE outbox (
        seq bigserial PRIMARY KEY,
        event_id text NOT NULL,
        sink text NOT NULL,
        kind text NOT NULL,
        execution_id text COLLATE "C",
        record_json text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        state text NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
        last_error text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        claimed_by text,
        claim_until timestamptz,
        UNIQUE (event_id, sink)
    )""",
    "CREATE INDEX outbox_by_sink_state ON outbox (sink, state, seq)",  # a lane's scan, in seq order
    "CREATE INDEX outbox_by_execution ON outbox (execution_id, state)",
    "CREATE INDEX outbox_by_state ON outbox (state, updated_at)",
    """CREATE TABLE replicas (
        replica text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        seen_at timestamptz NOT NULL DEFAULT now()
    )""",
)

# From each schema version to the next, applied in order in the locked transaction (none yet:
# `_SCHEMA` above is version 1).
_MIGRATIONS: dict[int, tuple[str, ...]] = {}


def prepare(conn: psycopg.Connection[Any], where: str) -> None:
    """Create, migrate or accept the schema of the database `conn` is connected to (autocommit).

    Raises StateError for a foreign database or a newer schema; psycopg errors pass through (the
    caller reports them as StateError, since nothing has started yet).
    """
    with conn.transaction():
        conn.execute(SCHEMA_LOCK)
        version = _version(conn, where)
        if version is None:
            _create(conn)
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"the PostgreSQL state at {where} was written by a newer execmon (schema {version}; this "
                f"execmon {__version__} reads up to {SCHEMA_VERSION}); upgrade execmon or give another database"
            )
        elif version < SCHEMA_VERSION:
            _migrate(conn, version)
        ensure_ledger_schema(conn)  # idempotent; the same lock, a savepoint of this transaction


def _version(conn: psycopg.Connection[Any], where: str) -> int | None:
    """The schema version found; None for an empty database (nothing in its schema yet)."""
    tables = {
        str(row[0])
        for row in conn.execute("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()")
    }
    if not tables:
        return None
    foreign = StateError(
        f"the database at {where} holds other tables but no execmon state; give execmon a database "
        "(or a schema, with search_path) of its own"
    )
    if "meta" not in tables:
        raise foreign
    with conn.transaction():  # a savepoint: a `meta` of another shape must not abort the migration
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except psycopg.errors.UndefinedColumn:
            raise foreign from None
    version = str(row[0]) if row else ""
    if not version.isdigit():
        raise foreign
    return int(version)


def _create(conn: psycopg.Connection[Any]) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', %s), ('created_by', %s)",
        (str(SCHEMA_VERSION), f"execmon {__version__}"),
    )


def _migrate(conn: psycopg.Connection[Any], version: int) -> None:
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in _MIGRATIONS[step]:
            conn.execute(statement)
    conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
