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


class StallKind(StrEnum):
    """The records of a freeze: one when it crosses `polling.stall_after`, one if it moves again."""

    STALLED = "stalled"
    RESUMED = "resumed"


@dataclass(frozen=True, slots=True)
class StallEvent:
    """The scheduler's word that a running execution stalled or resumed (times are epoch seconds).

    `freeze` names the frozen stretch (the server's `updated_at` when it gives one), so that the
    event_id is the same however often, and after however many restarts, the freeze is seen.
    """

    kind: StallKind
    execution_id: str
    freeze: str
    last_change_at: float  # when progress or updated_at last changed before the freeze
    observed_at: float
    stall_after_s: float  # the threshold it crossed
    progress: int | None = None
    current_step: str | None = None
    resumed_at: float | None = None  # resumed: when it moved again
    group: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def stalled_for_s(self) -> float:
        end = self.resumed_at if self.resumed_at is not None else self.observed_at
        return max(0.0, end - self.last_change_at)


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


def stall_event_id(kind: StallKind, execution_id: str, freeze: str) -> str:
    """Stable per freeze of one execution: a restart never reports the same freeze twice."""
    return "evs_" + hashlib.sha256(f"{kind.value}:{execution_id}:{freeze}".encode()).hexdigest()[:32]


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


def build_stall_record(event: StallEvent) -> dict[str, Any]:
    """The contract's `stalled` record, or its `resumed` counterpart (with `resumed_at`)."""
    record: dict[str, Any] = {
        "event_id": stall_event_id(event.kind, event.execution_id, event.freeze),
        "kind": event.kind.value,
        "execution_id": event.execution_id,
        "progress": event.progress,
        "current_step": event.current_step,
        "last_change_at": iso_utc(event.last_change_at),
        "stalled_for_s": round(event.stalled_for_s, 3),
        "observed_at": iso_utc(event.observed_at),
    }
    if event.kind is StallKind.STALLED:
        record["stall_after_s"] = round(event.stall_after_s, 3)
    if event.resumed_at is not None:
        record["resumed_at"] = iso_utc(event.resumed_at)
    record["group"] = event.group
    record["labels"] = dict(event.labels)
    return record


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
