"""What the server would count, read back from the shared budget's ledger rows (database clock)."""

from __future__ import annotations

from collections.abc import Sequence

import psycopg


def ledger_rows(url: str) -> list[tuple[float, float | None]]:
    """(started_at, done_at) of every ledger row, epoch seconds on the database clock, oldest first."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM done_at)::float8"
            " FROM ledger ORDER BY started_at"
        ).fetchall()
    return [(float(s), None if d is None else float(d)) for s, d in found]


def assert_never_more_than(n: int, window_s: float, rows: Sequence[tuple[float, float | None]]) -> None:
    """No window of `window_s` holds more than n starts, and no request started while n others that the
    server may still count (answered less than a window before, or unanswered) were about: the server
    sees each request between its start and its answer, so it never counts more than n in a window."""
    starts = [s for s, _ in rows]
    assert starts == sorted(starts)
    for i in range(len(starts) - n):
        assert starts[i + n] - starts[i] >= window_s, (i, starts[i : i + n + 1])
    for j, (start, _) in enumerate(rows):
        counted = [d for _, d in rows[:j] if d is None or d > start - window_s]
        assert len(counted) < n, (j, start)
