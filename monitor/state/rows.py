"""What the store hands in and out: plain typed rows, JSON decoded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from monitor.records import Outcome


class DeliveryState(StrEnum):
    """Where one (record, sink) delivery stands."""

    PENDING = "pending"  # not yet confirmed by the sink; retried when due
    DELIVERED = "delivered"  # the sink confirmed it
    DEAD = "dead"  # gave up (permanent error, past the sink's max_age or max_attempts): a dead letter


@dataclass(frozen=True, slots=True)
class TrackRequest:
    """One execution to start tracking (times are epoch seconds)."""

    execution_id: str
    tracked_since: float
    deadline_at: float | None = None
    group: str | None = None
    batch: str | None = None  # the use of `group` this execution belongs to (one digest per batch)
    labels: Mapping[str, str] = field(default_factory=dict)
    schedule: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TrackedRow:
    """One tracked execution as stored. `schedule` and `last_status` are the caller's own JSON."""

    execution_id: str
    tracked_since: float
    deadline_at: float | None
    group: str | None
    labels: dict[str, str]
    schedule: dict[str, Any] | None
    last_status: dict[str, Any] | None
    polls: int
    outcome: Outcome | None
    terminal_at: float | None
    record: dict[str, Any] | None

    @property
    def terminal(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One record waiting for (or done with) one sink."""

    seq: int
    event_id: str
    sink: str
    kind: str
    execution_id: str | None
    record: dict[str, Any]
    attempts: int
    next_attempt_at: float
    state: DeliveryState
    last_error: str | None
    updated_at: float
    created_at: float = 0.0  # when it entered the outbox (epoch s): a sink's max_age counts from here


@dataclass(frozen=True, slots=True)
class FinishResult:
    """What `finish` did: whether the ID became terminal now, and the group digest it produced."""

    newly_terminal: bool
    enqueued: int = 0
    group_record: dict[str, Any] | None = None


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _loads_obj(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


class Row(Protocol):
    """A row read by name: an sqlite3.Row, or a psycopg dict row."""

    def __getitem__(self, key: str, /) -> Any: ...


def tracked_from(row: Row) -> TrackedRow:
    outcome = row["terminal_outcome"]
    return TrackedRow(
        execution_id=row["execution_id"],
        tracked_since=row["tracked_since"],
        deadline_at=row["deadline_at"],
        group=row["grp"],
        labels={str(k): str(v) for k, v in (_loads_obj(row["labels_json"]) or {}).items()},
        schedule=_loads_obj(row["schedule_json"]),
        last_status=_loads_obj(row["last_status_json"]),
        polls=row["polls"],
        outcome=Outcome(outcome) if outcome is not None else None,
        terminal_at=row["terminal_at"],
        record=_loads_obj(row["record_json"]),
    )


def outbox_from(row: Row) -> OutboxRow:
    return OutboxRow(
        seq=row["seq"],
        event_id=row["event_id"],
        sink=row["sink"],
        kind=row["kind"],
        execution_id=row["execution_id"],
        record=_loads_obj(row["record_json"]) or {},
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        state=DeliveryState(row["state"]),
        last_error=row["last_error"],
        updated_at=row["updated_at"],
        created_at=row["created_at"],
    )
