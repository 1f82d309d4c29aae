"""Compact per-execution schedule state, and the lazy-deletion heap the policies choose from.

At 100,000 tracked executions memory matters: `ExecState` uses __slots__, keeps progress samples in
one `array('d')` (bounded, thinned when full) and never keeps whole status records.
"""

from __future__ import annotations

import heapq
import itertools
import math
from array import array

MAX_SAMPLES = 12  # progress samples kept per execution (pairs of loop time, progress)


class ExecState:
    """Everything the scheduler and its policy know about one tracked execution (loop times)."""

    __slots__ = (
        "changed_at",
        "check_at",
        "delay",
        "due",
        "errors",
        "eta",
        "execution_id",
        "expires_at",
        "exposed_to",
        "freeze",
        "group",
        "in_flight",
        "labels",
        "last_poll",
        "live",
        "longest",
        "misses",
        "nf_count",
        "nf_first",
        "polls",
        "progress",
        "queued",
        "raw_status",
        "same",
        "samples",
        "seen",
        "stall_key",
        "stall_since",
        "stamp_tol",
        "tracked_since",
        "ver",
        "weight",
        "zero_at",
    )

    def __init__(
        self,
        execution_id: str,
        tracked_since: float,
        *,
        group: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.tracked_since = tracked_since
        self.expires_at: float | None = None  # deadline (loop time) -> timed_out
        self.group = group
        self.labels = labels or None
        self.polls = 0  # requests made for it (every answer, errors included)
        self.errors = 0  # consecutive transient errors (for the retry backoff)
        self.nf_count = 0  # consecutive 404s
        self.nf_first = 0.0  # loop time of the first of them
        self.last_poll = tracked_since  # loop time of the last answer that said "running"
        self.exposed_to = tracked_since  # adaptive: running time already counted in the hazard
        self.progress: int | None = None
        self.raw_status: str | None = None
        self.samples: array[float] | None = None  # flat (t, progress) pairs, oldest first
        self.same = 1  # readings averaged into the last sample (answers with one updated_at)
        self.stamp_tol = 0.0  # how far a difference of two updated_at may be from the true one; 0: no stamp yet
        self.in_flight = False
        self.live = True  # False once terminal or untracked
        self.ver = 0  # bumped whenever its heap entries go stale
        # Policy fields.
        self.due = math.inf  # when the policy wants the next poll
        self.delay = 0.0  # backoff: the next gap
        self.misses = 0  # adaptive: polls at a predicted end that found it still running
        self.eta = math.inf  # adaptive: predicted end
        self.weight = 0.0  # adaptive: sqrt of the hazard it was last scheduled with
        # Stall fields (monitor.schedule.stalls): the current stretch without a change, and the freeze
        # that was reported stalled, if any.
        self.seen: str | None = None  # the last answer's updated_at (or progress, without one)
        self.changed_at = tracked_since  # loop time the current stretch began (its last change)
        self.freeze = ""  # the stretch's name: the server's updated_at when it gives one
        self.queued = False  # the stretch is a wait in a queue (progress 0, never moved)
        self.longest = -1.0  # seconds: the longest stretch it has ended so far (a lower bound); -1: none
        self.stall_key: str | None = None  # the freeze reported stalled (None: not stalled)
        self.stall_since = 0.0  # loop time that freeze began
        self.check_at = math.inf  # adaptive: when it crosses the stall threshold unless it changes first
        self.zero_at = -math.inf  # adaptive: the last poll that found it at 0 % before any progress

    def __repr__(self) -> str:
        return f"ExecState({self.execution_id!r}, polls={self.polls}, due={self.due:.1f})"

    def add_sample(self, t: float, progress: float) -> None:
        """Remember a progress sample; when full, drop the one closest in time to its predecessor.

        A reading stamped like the last one (the same `updated_at`: nothing changed in between but
        the noise) is averaged into it: repeated readings of one level sharpen it.
        """
        if self.samples is None:
            self.samples = array("d")
        samples = self.samples
        if samples and abs(t - samples[-2]) < 1e-6 and 0 < progress < 99 and 0 < samples[-1] < 99:
            self.same += 1
            samples[-1] += (progress - samples[-1]) / self.same
            return
        self.same = 1
        samples.append(t)
        samples.append(float(progress))
        count = len(samples) // 2
        if count > MAX_SAMPLES:
            # Keep the first and the last; thin where samples are densest.
            victim = min(range(1, count - 1), key=lambda i: samples[2 * i] - samples[2 * i - 2])
            del samples[2 * victim : 2 * victim + 2]

    def sample_pairs(self) -> list[tuple[float, float]]:
        samples = self.samples
        if samples is None:
            return []
        return [(samples[i], samples[i + 1]) for i in range(0, len(samples), 2)]


class LazyHeap:
    """A min-heap of executions by key; an entry is stale once its execution's `ver` has moved on.

    Stale entries are skipped when they reach the top and purged when they outnumber live ones,
    so every operation is O(log n) amortised.
    """

    __slots__ = ("_counter", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, ExecState]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, key: float, state: ExecState) -> None:
        heapq.heappush(self._heap, (key, next(self._counter), state.ver, state))

    def top(self) -> tuple[float, ExecState] | None:
        """The smallest live entry, stale entries above it discarded."""
        heap = self._heap
        while heap:
            key, _, ver, state = heap[0]
            if ver == state.ver and state.live:
                return key, state
            heapq.heappop(heap)
        return None

    def pop(self) -> tuple[float, ExecState] | None:
        entry = self.top()
        if entry is not None:
            heapq.heappop(self._heap)
        return entry

    def compact(self, live_count: int) -> None:
        """Drop stale entries when they are more than the live ones (amortised O(1) per push)."""
        if len(self._heap) > 2 * live_count + 64:
            self._heap = [e for e in self._heap if e[2] == e[3].ver and e[3].live]
            heapq.heapify(self._heap)
