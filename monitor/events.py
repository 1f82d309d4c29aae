"""What a running Monitor reports to its subscribers (the live view, logs, an embedding program).

Each event is a small immutable value; `Monitor.subscribe(callback)` calls the callback with
every one, on the event loop, in order. A callback that raises fails the Monitor (loudly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.api.models import StatusRecord
from monitor.errors import MonitorFailed
from monitor.records import StallEvent, TerminalEvent
from monitor.results import Result


@dataclass(frozen=True, slots=True)
class Polled:
    """One answer for one execution: a status, or the error text of a failed request."""

    execution_id: str
    status: StatusRecord | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Ended:
    """An execution reached its outcome; the result is durably in the outbox already."""

    result: Result
    event: TerminalEvent


@dataclass(frozen=True, slots=True)
class Stalled:
    """A running execution's progress stood still for `polling.stall_after`; the record is durably
    in the outbox already (for the sinks with `events = ["stalled"]`)."""

    event: StallEvent


@dataclass(frozen=True, slots=True)
class Resumed:
    """A stalled execution moved again (its `resumed` record is in the outbox already)."""

    event: StallEvent


@dataclass(frozen=True, slots=True)
class KeyRejected:
    """The API key was rejected (401): nothing more is sent with it until it is replaced."""

    reason: str


@dataclass(frozen=True, slots=True)
class KeyRestored:
    """A new key was loaded after a rejection: polling goes on."""


@dataclass(frozen=True, slots=True)
class StoreFaulted:
    """The state store cannot record answers (disk full, I/O error, busy): polling is paused."""

    reason: str


@dataclass(frozen=True, slots=True)
class StoreRecovered:
    """The state store records again: polling resumes."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The Monitor cannot go on (an internal task died, or the store stayed down too long)."""

    error: MonitorFailed


Event = Polled | Ended | Stalled | Resumed | KeyRejected | KeyRestored | StoreFaulted | StoreRecovered | Failed
Subscriber = Callable[[Event], None]
