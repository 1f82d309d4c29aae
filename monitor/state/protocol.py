"""`StateStore`: what the rest of execmon asks of a state store, so that a second implementation
(PostgreSQL, for replicas) can stand in for the SQLite `Store`.

Rules every implementation keeps:
- A corrupt, foreign or newer store is refused when it is opened (StateError); after that, a call
  that fails because the store cannot be reached or written (disk full, I/O error, busy, a dropped
  connection) raises `monitor.errors.StoreFault`, and what it was asked to write did not happen.
- `finish` marks an execution terminal and enqueues its outbox rows in one transaction.
- `save_poll` and `complete_request` may be buffered; `flush_polls` writes them and keeps them on
  a fault; reads of executions see them (during a fault they may read what is stored).
  `record_request` is stored, safe from a killed process, before it returns.
Times are epoch seconds.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from monitor.records import Outcome
from monitor.state.rows import FinishResult, OutboxRow, TrackedRow, TrackRequest


class StateStore(Protocol):
    """The state store's interface (implemented by `monitor.state.store.Store`)."""

    def close(self) -> None:
        """Flush buffered bookkeeping (best effort) and release the store."""

    def probe(self) -> None:
        """A tiny durable write; raises StoreFault while the store still cannot write."""

    # -- executions ---------------------------------------------------------------------------

    def track_many(self, rows: Iterable[TrackRequest]) -> list[str]:
        """Start tracking; returns the IDs that were new (a tracked ID keeps its schedule)."""

    def untrack(self, execution_id: str) -> bool:
        """Forget an ID; False if it was not tracked."""

    def get(self, execution_id: str) -> TrackedRow | None: ...

    def load_active(self) -> list[TrackedRow]:
        """Every tracked ID that is not terminal, oldest first."""

    def list_executions(
        self, status_filter: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[TrackedRow]: ...

    def count_executions(self, status_filter: str | None = None) -> int: ...

    def save_poll(
        self,
        execution_id: str,
        schedule: Mapping[str, Any] | None,
        last_status: Mapping[str, Any] | None,
        polls: int,
    ) -> None:
        """The schedule and last status after a poll (may be buffered until `flush_polls`)."""

    def flush_polls(self) -> int:
        """Write buffered bookkeeping in one transaction; returns how many entries were written."""

    def finish(
        self,
        execution_id: str,
        outcome: Outcome | str,
        record: Mapping[str, Any],
        sinks: Sequence[str],
        *,
        terminal_at: float | None = None,
    ) -> FinishResult:
        """Mark terminal and enqueue the record for `sinks` in one transaction. Idempotent."""

    def enqueue_event(self, record: Mapping[str, Any], sinks: Sequence[str]) -> int:
        """Enqueue a record that ends nothing (a stall) for `sinks` in one transaction; idempotent."""

    def undelivered_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these executions have a result some sink has not confirmed (pending or dead)."""

    def results(self, execution_ids: Iterable[str] | None = None) -> dict[str, Outcome]: ...

    def terminal_records(self, execution_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The result record of each given ID that is terminal."""

    def tracked_among(self, execution_ids: Iterable[str]) -> set[str]:
        """Which of these IDs are tracked (terminal ones included)."""

    def set_group_sinks(self, names: Sequence[str]) -> None:
        """The sinks that receive group digests."""

    def prune(self, now: float, retention_s: float, *, batch: int = 500) -> int:
        """Forget one batch (one short transaction) of ended executions and delivered outbox rows older
        than `retention_s`; never pending rows or dead letters. Returns rows deleted: call again while > 0."""

    # -- what the policy learned ----------------------------------------------------------------

    def load_learning(self) -> str | None:
        """The policy's learned run times (JSON text) as last saved, or None."""

    def save_learning(self, text: str) -> None:
        """Replace them (one small row, so a restart or tomorrow's batch starts informed)."""

    # -- budget history -----------------------------------------------------------------------

    def record_request(self, stamp: float) -> int:
        """A request is about to be sent; durable against a killed process before it returns."""

    def complete_request(self, row_id: int, stamp: float) -> None: ...

    def recent_requests(self, since: float) -> list[tuple[float, bool]]: ...

    # -- the outbox ---------------------------------------------------------------------------

    def pending_keys(self, sink: str, after_seq: int = 0) -> list[tuple[int, str, float]]: ...

    def get_delivery(self, event_id: str, sink: str) -> OutboxRow | None: ...

    def mark_delivered(self, event_id: str, sink: str) -> bool: ...

    def mark_failed(self, event_id: str, sink: str, error: str, next_attempt_at: float) -> int: ...

    def mark_dead(self, event_id: str, sink: str, reason: str, *, count_attempt: bool = True) -> bool: ...

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[OutboxRow]: ...

    def retry_dead(self, event_id: str | None = None, sink: str | None = None) -> int: ...

    def pending_count(self, sink: str | None = None) -> int: ...

    def dead_count(self) -> int: ...

    def expire_pending(
        self, sink: str, created_before: float, why: str, keep: Collection[str] = (), limit: int = 1000
    ) -> list[str]:
        """Dead-letter pending rows of `sink` older than `created_before` (max_age), except `keep`."""
