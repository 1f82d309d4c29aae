"""Which store a `state` names: a PostgreSQL URL (replicas), an SQLite path, or None (in memory)."""

from __future__ import annotations

import os
from pathlib import Path

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(state: str | os.PathLike[str] | None) -> bool:
    return isinstance(state, str) and state.startswith(POSTGRES_SCHEMES)


def state_path(state: str | os.PathLike[str] | None) -> Path | None:
    """The SQLite file of a `state` (None for memory or a PostgreSQL URL)."""
    return None if state is None or is_postgres_url(state) else Path(state)
