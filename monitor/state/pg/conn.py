"""Connecting to the PostgreSQL state: the pool, short transactions, and how failures are reported.

At open, anything that goes wrong (unreachable, refused, a bad URL) is a StateError naming the
URL without its password. After that, a dropped connection, a timeout or a pool that cannot hand
out a connection is a StoreFault: the transaction was rolled back (or never began) and the caller
may try again later. IntegrityError and ProgrammingError are bugs and pass through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.abc import Params, Query
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from monitor.errors import StoreFault
from monitor.state.db import StateError
from monitor.state.pg import redact_text, redact_url

CONNECT_TIMEOUT_S = 5  # an unreachable server fails the call within this, not after TCP's minutes
STATEMENT_TIMEOUT = "10s"  # bounds a stall: statements are short, and called from the event loop
POOL_WAIT_S = 5.0  # how long a call waits for a connection before it is a StoreFault
# The pool retries a lost connection with a backoff that doubles (1, 2, 4 ... s) until this much time
# has passed, then waits for the next call to try again. Kept short, so that a server back after a
# failover is used within seconds (the store gate's probes are the next calls), not a minute later.
RECONNECT_WINDOW_S = 10.0

Cursor = psycopg.Cursor[DictRow]


def connect_kwargs(url: str, application_name: str) -> dict[str, Any]:
    """What every connection gets, unless the URL says otherwise (raises StateError for a bad URL)."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StateError(f"not a usable PostgreSQL URL: {redact_url(url)} ({describe(exc, url)})") from None
    kwargs: dict[str, Any] = {"autocommit": True}  # every transaction is explicit
    if "connect_timeout" not in given:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in given:
        kwargs["application_name"] = application_name[:63]  # what pg_stat_activity shows
    return kwargs


def open_pool(url: str, kwargs: dict[str, Any], *, wait_s: float = POOL_WAIT_S) -> ConnectionPool[Any]:
    """A small pool (the store is called one call at a time; the ledger may share it), opened now."""
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        kwargs=kwargs,
        min_size=1,
        max_size=4,
        open=False,
        configure=_configure,
        check=ConnectionPool.check_connection,  # a connection the server dropped is replaced, not a fault
        timeout=wait_s,
        reconnect_timeout=RECONNECT_WINDOW_S,
        name="execmon-state",
    )
    try:
        pool.open(wait=True, timeout=max(wait_s, CONNECT_TIMEOUT_S))
    except psycopg.Error as exc:
        pool.close()
        raise StateError(f"cannot connect to the PostgreSQL state at {redact_url(url)}: {describe(exc, url)}") from None
    return pool


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")


def describe(exc: BaseException, url: str) -> str:
    """The first line of a driver's message, with no trace of the URL's password."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return redact_text(text, url)


class Database:
    """The pool of one PgStore: short explicit transactions; a connection failure is a StoreFault."""

    def __init__(self, pool: ConnectionPool[Any], url: str) -> None:
        self.pool = pool
        self._url = url
        self.where = redact_url(url)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """BEGIN .. COMMIT on one connection, rolled back on any error so nothing is half-written."""
        with (
            self._faults(),
            self.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            yield cur

    def read(self, sql: Query, params: Params | None = None) -> list[DictRow]:
        """One statement on its own (autocommit)."""
        with self._faults(), self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            rows: list[DictRow] = cur.fetchall()
            return rows

    def close(self) -> None:
        self.pool.close()

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # pool timeouts are OperationalErrors
            raise StoreFault(f"PostgreSQL state at {self.where}: {describe(exc, self._url)}") from exc
