"""Result records: what every sink receives, exactly as in the contract."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from monitor.api.models import ExecutionStatus, StatusRecord
from monitor.clock import iso_utc


class Outcome(StrEnum):
    """How an execution ended, as far as the user is concerned."""

    COMPLETED = "completed"  # the server said completed
    FAILED = "failed"  # the server said failed
    CANCELLED = "cancelled"  # the server said cancelled
    NOT_FOUND = "not_found"  # 404 confirmed several times, spread over time
    TIMED_OUT = "timed_out"  # still running at its deadline (the execution may go on)

    @classmethod
    def from_status(cls, status: ExecutionStatus) -> Outcome:
        return cls(status.value)


@dataclass(frozen=True, slots=True)
class TerminalEvent:
    """The scheduler's final word on one execution (times are epoch seconds)."""

    execution_id: str
    outcome: Outcome
    observed_at: float
    tracked_since: float
    polls: int
    status: StatusRecord | None = None
    group: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrackResult:
    """What a `track` call did: IDs newly tracked, and IDs left as they were."""

    added: list[str] = field(default_factory=list)
    already_tracked: list[str] = field(default_factory=list)
    batch: str | None = None  # with a group: the batch the added IDs joined (one digest per batch)


def event_id(execution_id: str, outcome: Outcome | str) -> str:
    """Stable per execution and outcome, so that a receiver can drop a redelivery."""
    digest = hashlib.sha256(f"execution:{execution_id}:{outcome}".encode()).hexdigest()
    return f"ev_{digest[:32]}"


def group_event_id(group: str, batch: str) -> str:
    """Stable per batch: each use of a group name is its own batch, with its own digest."""
    return "evg_" + hashlib.sha256(f"group:{group}:{batch}".encode()).hexdigest()[:32]


def new_batch_id(now_epoch_s: float | None = None) -> str:
    """A fresh batch ID: the UTC time it started (readable) plus randomness (unique)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_epoch_s))
    return f"b_{stamp}_{secrets.token_hex(4)}"


def build_result_record(event: TerminalEvent) -> dict[str, Any]:
    """The contract's result record for one terminal outcome."""
    status = event.status
    return {
        "event_id": event_id(event.execution_id, event.outcome),
        "kind": "execution",
        "execution_id": event.execution_id,
        "outcome": event.outcome.value,
        "result": status.result if status else None,
        "error": status.error if status else None,
        "metadata": status.metadata if status else None,
        "progress": status.progress if status else None,
        "finished_at": status.finished_at if status else None,
        "observed_at": iso_utc(event.observed_at),
        "tracked_since": iso_utc(event.tracked_since),
        "polls": event.polls,
        "group": event.group,
        "labels": dict(event.labels),
        "raw": status.raw if status else None,
    }


def build_group_record(group: str, batch: str, members: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One digest for a batch of a group whose members are all terminal; `members` are their records."""
    records = list(members)
    outcomes = Counter(str(r["outcome"]) for r in records)
    failed = sorted(r["execution_id"] for r in records if r["outcome"] != Outcome.COMPLETED.value)
    finished = sorted(str(r.get("finished_at") or r["observed_at"]) for r in records)
    return {
        "event_id": group_event_id(group, batch),
        "kind": "group",
        "group": group,
        "batch": batch,
        "total": len(records),
        "outcomes": dict(sorted(outcomes.items())),
        "failed_ids": failed,
        "first_finished_at": finished[0] if finished else None,
        "last_finished_at": finished[-1] if finished else None,
    }
