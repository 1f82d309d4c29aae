"""The control API's view of a running Monitor (implements `ControlBackend`).

Views are read from the SQLite state (the source of truth, so `ls` shows terminal executions too)
plus the scheduler's plan for the ones still being polled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.clock import iso_utc
from monitor.engine import Monitor
from monitor.records import TrackResult
from monitor.state.rows import TrackedRow


class MonitorBackend:
    """Adapts a `Monitor` to the control API's `ControlBackend` protocol."""

    def __init__(self, engine: Monitor) -> None:
        self._engine = engine

    async def track(
        self,
        ids: list[str],
        *,
        deadline_s: float | None,
        group: str | None,
        labels: dict[str, str],
        batch: str | None = None,
    ) -> TrackResult:
        return self._engine.track_valid(ids, deadline_s=deadline_s, group=group, labels=labels, batch=batch)

    async def untrack(self, execution_id: str) -> bool:
        return self._engine.untrack(execution_id)

    def list_executions(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        store = self._engine.store
        rows = store.list_executions(status, limit, offset)
        undelivered = store.undelivered_among(r.execution_id for r in rows if r.terminal)
        return [self._view(row, undelivered) for row in rows]

    def count_executions(self, status: str | None) -> int:
        return self._engine.store.count_executions(status)

    def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        row = self._engine.store.get(execution_id)
        if row is None:
            return None
        return self._view(row, self._engine.store.undelivered_among([execution_id] if row.terminal else []))

    def health(self) -> tuple[bool, str | None]:
        return self._engine.health()

    async def retry_dead_letters(self, *, sink: str | None, event_id: str | None) -> int:
        return self._engine.retry_dead_letters(sink, event_id)

    def _view(self, row: TrackedRow, undelivered: set[str]) -> dict[str, Any]:
        last = row.last_status or {}
        plan = None if row.terminal else self._engine.scheduler.snapshot(row.execution_id)
        last_poll = plan.get("last_poll") if plan and row.polls else None
        next_poll = plan.get("next_poll_at") if plan else None
        state = row.outcome.value if row.outcome is not None else "running" if row.polls else "pending"
        return {
            "execution_id": row.execution_id,
            "state": state,
            "progress": last.get("progress") if isinstance(last.get("progress"), int) else None,
            "polls": row.polls,
            "tracked_since": iso_utc(row.tracked_since),
            "last_polled_at": iso_utc(last_poll) if isinstance(last_poll, float) else None,
            "next_poll_at": iso_utc(next_poll) if isinstance(next_poll, float) else None,
            "group": row.group,
            "labels": row.labels,
            "delivered": row.terminal and row.execution_id not in undelivered,
            "stalled_since": _stalled_since(None if row.terminal else (plan or row.schedule)),
        }


def _stalled_since(schedule: Mapping[str, Any] | None) -> str | None:
    """From the schedule the scheduler exports (monitor.schedule.persist): stalled now, since when."""
    stall = (schedule or {}).get("stall")
    since = stall.get("since") if isinstance(stall, dict) else None
    return iso_utc(since) if isinstance(since, int | float) else None
