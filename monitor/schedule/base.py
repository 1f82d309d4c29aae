"""What every polling policy is to the scheduler: a queue of executions that hands out the next poll.

The policies themselves are in `monitor.schedule.policy` (backoff, and `make_policy`) and
`monitor.schedule.adaptive`; both build on this module and nothing here knows either of them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import ClassVar

from monitor.records import Outcome
from monitor.schedule.state import ExecState, LazyHeap


class PolicyName(StrEnum):
    """Which polling policy the scheduler runs (`make_policy` builds it)."""

    ADAPTIVE = "adaptive"  # spends the budget where a finish is likely (progress-based ETA)
    BACKOFF = "backoff"  # the vendor page's poll_with_backoff, the baseline


EPS = 1e-6  # seconds: comparisons of sums and differences may disagree in the last bit

# The [polling] interval settings' defaults (the vendor page's loop), here so that the policies and
# `monitor.config` share one definition without the schedule package importing the config.
DEFAULT_INITIAL_INTERVAL_S = 1.0
DEFAULT_BACKOFF_FACTOR = 1.5
DEFAULT_MAX_INTERVAL_S = 30.0


class Policy(ABC):
    """The part of the scheduler that orders polls. Not thread-safe; one per scheduler."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._held = LazyHeap()
        self._first: deque[tuple[int, ExecState]] = deque()  # (ver, state): polled before anything else
        self._count = 0
        self._rate: Callable[[], float] = lambda: 0.5

    def bind_rate(self, rate_per_s: Callable[[], float]) -> None:
        """Where the policy reads the budget's sustained rate (requests per second)."""
        self._rate = rate_per_s

    @property
    def count(self) -> int:
        return self._count

    # -- the scheduler's calls ------------------------------------------------------------------

    def add(self, state: ExecState, now: float) -> None:
        """A newly tracked (or restored) execution."""
        self._count += 1
        self._on_add(state, now)
        self._enqueue(state)

    def remove(self, state: ExecState, now: float) -> None:
        """Terminal or untracked: its heap entries go stale."""
        self._count -= 1
        state.ver += 1
        self._on_remove(state, now)

    def _on_remove(self, state: ExecState, now: float) -> None:  # noqa: B027  # optional hook
        """Something left the queue at `now`."""

    def hold(self, state: ExecState, until: float) -> None:
        """Poll it at `until` ahead of the cadence (error retry, 404 confirmation, a lost poll)."""
        state.ver += 1
        self._held.push(until, state)

    def poll_first(self, state: ExecState) -> None:
        """Poll it before anything else, in the order asked (an execution taken over from a replica
        that stopped: nobody has polled it for a while). Its queued entries go stale meanwhile."""
        state.ver += 1
        self._first.append((state.ver, state))

    def choose(self, now: float) -> ExecState | None:
        """The execution to spend a token on now, taken out of the queue; None: nothing worth it."""
        state = self._first_live()
        if state is not None:
            self._first.popleft()
        else:
            self._release_held(now)
            state = self._pick(now)
        if state is not None:
            state.ver += 1
        return state

    def _first_live(self) -> ExecState | None:
        while self._first:
            ver, state = self._first[0]
            if ver == state.ver and state.live:
                return state
            self._first.popleft()  # polled, untracked or rescheduled since
        return None

    def ready_at(self, now: float) -> float:
        """The earliest time `choose` may return something (inf: not before something changes)."""
        if self._first_live() is not None:
            return now
        held = self._held.top()
        return min(held[0] if held else math.inf, self._ready_at(now))

    def polled(self, state: ExecState, now: float) -> None:
        """It answered "running" at `now` (samples already recorded): schedule the next poll."""
        self._on_running(state, now)
        self._enqueue(state)

    def export_learning(self) -> dict[str, object] | None:
        """What it learned that should outlive the process (JSON-able), or None when nothing."""
        return None

    def import_learning(self, data: object) -> None:  # noqa: B027  # optional hook
        """Start from what `export_learning` gave an earlier process (malformed parts ignored)."""

    def finished(  # noqa: B027  # optional hook
        self, state: ExecState, ended_at: float, outcome: Outcome, run_s: float | None = None
    ) -> None:
        """It ended at about `ended_at` (loop time) after running `run_s` seconds (the server's
        `metadata.execution_time`, None when not given): something to learn from."""

    def _release_held(self, now: float) -> None:
        while (entry := self._held.top()) is not None and entry[0] <= now:
            self._held.pop()
            state = entry[1]
            state.due = entry[0]
            self._enqueue(state)

    # -- what each policy defines -------------------------------------------------------------------

    @abstractmethod
    def _on_add(self, state: ExecState, now: float) -> None: ...

    @abstractmethod
    def _on_running(self, state: ExecState, now: float) -> None: ...

    @abstractmethod
    def _enqueue(self, state: ExecState) -> None:
        """Bump the version and push fresh heap entries for the state's current keys."""

    @abstractmethod
    def _pick(self, now: float) -> ExecState | None: ...

    @abstractmethod
    def _ready_at(self, now: float) -> float: ...
