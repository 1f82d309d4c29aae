"""A real PostgreSQL for the tests, started on a Unix socket from the `pgserver` wheel (it ships the
server binaries; no Docker, nothing installed by hand). One server per test session; each test that
asks for `pg_url` gets a database of its own, so tests never see each other's rows."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    pgserver = pytest.importorskip("pgserver", reason="the pgserver wheel is not installed (pip install -e '.[test]')")
    root = Path(tempfile.mkdtemp(prefix="execmon-pg-"))
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        # A throwaway server: durability against a power cut buys nothing here, and without it the
        # server stops in half a second instead of writing out everything for 20-30 s.
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(f"ALTER SYSTEM SET {name} = off")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a new, empty database on the session's server."""
    import psycopg

    name = f"t{next(_counter)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return str(pg_server.get_uri(name))
