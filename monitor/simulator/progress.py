"""One simulated execution: its state at any loop time, computed lazily, and the vendor's JSON bodies.

Nothing runs in the background: `status(now)` and `body(now, clock)` derive everything from the
creation time and the plan. Only the noise on reported progress is drawn per answer, from the
execution's own random generator (so one execution's answers never depend on another's polls).

The timeline of one execution, in loop times: created -> (queued: progress 0, "Queued") -> started
-> run, whose own clock stands still during a stall -> end. `updated_at` is the last time the shown
progress (noise aside: the noise is the reading's, not the job's) or the current step changed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from monitor.clock import Clock, iso_utc
from monitor.simulator.scenario import PlannedOutcome, ProgressKind, ProgressModel, Stall

RUNNING = "running"
QUEUED_STEP = "Queued"  # only while waiting in the queue; the run's own steps follow
_STEPS = (  # (fraction of the run from which it is shown, name)
    (0.0, "Starting"),
    (0.10, "Preparing inputs"),
    (0.30, "Analyzing data"),
    (0.70, "Generating output"),
    (0.95, "Finalizing"),
)
_MIN_STEPS, _MAX_STEPS = 4, 8


@dataclass(slots=True)
class SimExecution:
    """An execution the simulator answers for. Times are loop times."""

    execution_id: str
    created_at: float
    duration_s: float  # of the run, after --speed, stall aside
    end_at: float  # loop time at which it ends (scheduled in advance)
    outcome: str  # a PlannedOutcome value
    progress: ProgressModel
    rng: random.Random
    steps: tuple[tuple[float, float], ...] = ()  # (fraction of the duration, progress from then on)
    tokens_used: int = 0
    polls: int = 0
    started_at: float = 0.0  # the end of the queue
    stalled_from: float | None = None
    stalled_until: float | None = None
    kind: str | None = None
    _end_progress: int | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        *,
        execution_id: str,
        created_at: float,
        duration_s: float,
        end_s: float,
        outcome: str,
        progress: ProgressModel,
        seed: int,
        queue_s: float = 0.0,
        stall: Stall | None = None,
        kind: str | None = None,
    ) -> SimExecution:
        """Times in seconds after creation, already divided by --speed; end_s counts the queue and any stall."""
        rng = random.Random(seed)
        steps = _plan_steps(rng) if progress.model == ProgressKind.STEPS else ()
        return cls(
            execution_id=execution_id,
            created_at=created_at,
            duration_s=max(duration_s, 1e-9),
            end_at=created_at + end_s,
            outcome=outcome,
            progress=progress,
            rng=rng,
            steps=steps,
            tokens_used=rng.randint(100, 5000),
            started_at=created_at + queue_s,
            stalled_from=None if stall is None else created_at + stall.at_s,
            stalled_until=None if stall is None else created_at + stall.until_s,
            kind=kind,
        )

    def status(self, now: float) -> str:
        return RUNNING if now < self.end_at else self.outcome

    def ended_at(self, now: float) -> float | None:
        return None if now < self.end_at else self.end_at

    def stalled(self, now: float) -> bool:
        if self.stalled_from is None or self.stalled_until is None:
            return False
        return self.stalled_from <= now < self.stalled_until

    def run_elapsed(self, at: float) -> float:
        """Seconds of the run done at loop time `at`: 0 while queued, standing still while stalled."""
        elapsed = at - self.started_at
        if elapsed <= 0:
            return 0.0
        if self.stalled_from is None or self.stalled_until is None or at < self.stalled_from:
            return elapsed
        if at < self.stalled_until:
            return self.stalled_from - self.started_at
        return elapsed - (self.stalled_until - self.stalled_from)

    def model_progress(self, at: float) -> float:
        """Progress (0-100, no noise, not rounded) that the model gives at loop time `at`."""
        return self._model_at(min(self.run_elapsed(at) / self.duration_s, 1.0))

    def _model_at(self, fraction: float) -> float:
        if self.progress.model == ProgressKind.LINEAR:
            return 100.0 * fraction
        if self.progress.model == ProgressKind.CURVE:
            return 100.0 * float(fraction**self.progress.shape)
        if self.progress.model == ProgressKind.STEPS:
            level = 0.0
            for step_at, step_level in self.steps:
                if fraction < step_at:
                    break
                level = step_level
            return level
        return 0.0

    def reported_progress(self, now: float) -> int:
        """What an answer at `now` says: the model plus noise while it runs (0 while queued, frozen while
        stalled), clamped to 0-99; the final value once ended."""
        if now >= self.end_at:
            return self.final_progress()
        if now < self.started_at:
            return 0
        value = self.model_progress(now)
        if self.stalled(now):
            return _shown(value)  # frozen: no fresh noise either
        if self.progress.noise > 0 and self.progress.model != ProgressKind.NONE:
            value += self.rng.gauss(0.0, self.progress.noise)
        return _shown(value)

    def final_progress(self) -> int:
        """100 when completed; otherwise the model's value at the moment it ended (no noise)."""
        if self._end_progress is None:
            if self.outcome == PlannedOutcome.COMPLETED:
                self._end_progress = 100
            else:
                self._end_progress = _shown(self.model_progress(self.end_at))
        return self._end_progress

    def current_step(self, now: float) -> str:
        if now < self.started_at:
            return QUEUED_STEP
        return _step(self.run_elapsed(now) / self.duration_s)[1]

    def last_change(self, now: float) -> float:
        """Loop time of the last change of the shown progress (noise aside) or of the current step."""
        if now < self.started_at:
            return self.created_at
        fraction = self.run_elapsed(now) / self.duration_s
        since = min(max(self._level_since(fraction), _step(fraction)[0]), fraction)
        return min(self._time_of(since * self.duration_s), now)

    def _level_since(self, fraction: float) -> float:
        """The run fraction from which the shown progress (no noise) has had its value at `fraction`."""
        level = _shown(self._model_at(min(fraction, 1.0)))
        if level == 0:
            return 0.0
        if self.progress.model == ProgressKind.STEPS:
            return next(at for at, value in self.steps if _shown(value) >= level)
        threshold = (level - 0.5) / 100.0  # where round() reaches the level
        if self.progress.model == ProgressKind.CURVE:
            return float(threshold ** (1.0 / self.progress.shape))
        return threshold

    def _time_of(self, elapsed: float) -> float:
        """The loop time at which the run had done `elapsed` seconds (the first such, before any stall)."""
        at = self.started_at + elapsed
        if self.stalled_from is not None and self.stalled_until is not None and at > self.stalled_from:
            at += self.stalled_until - self.stalled_from
        return at

    def execution_time(self) -> float:
        """`metadata.execution_time`: seconds from the start of the run (after the queue) to its end."""
        return round(self.end_at - self.started_at, 3)

    def body(self, now: float, clock: Clock, *, whole_seconds: bool = False) -> dict[str, Any]:
        """The vendor's 200 body for this execution at loop time `now`; timestamps in milliseconds,
        or cut to `whole_seconds` as the vendor's page shows them."""

        def iso(at: float) -> str:
            wall = clock.wall(at)
            return iso_utc(math.floor(wall) if whole_seconds else wall)

        status = self.status(now)
        if status == RUNNING:
            return {
                "execution_id": self.execution_id,
                "status": RUNNING,
                "progress": self.reported_progress(now),
                "current_step": self.current_step(now),
                "updated_at": iso(self.last_change(now)),
            }
        if status == PlannedOutcome.COMPLETED:
            return {
                "execution_id": self.execution_id,
                "status": "completed",
                "progress": 100,
                "result": f"Task completed successfully with detailed results for {self.execution_id}",
                "metadata": {"execution_time": self.execution_time(), "tokens_used": self.tokens_used},
                "completed_at": iso(self.end_at),
            }
        if status == PlannedOutcome.FAILED:
            return {
                "execution_id": self.execution_id,
                "status": "failed",
                "error": {
                    "code": "execution_error",
                    "message": "Task execution failed",
                    "details": f"Simulated failure after {self.execution_time():.1f} s",
                },
                "metadata": {"execution_time": self.execution_time()},
                "failed_at": iso(self.end_at),
            }
        return {
            "execution_id": self.execution_id,
            "status": "cancelled",
            "progress": self.final_progress(),
            "metadata": {"execution_time": self.execution_time()},
            "cancelled_at": iso(self.end_at),
        }


def _shown(value: float) -> int:
    """Progress as a running answer shows it: a whole number from 0 to 99."""
    return min(max(round(value), 0), 99)


def _step(fraction: float) -> tuple[float, str]:
    """The step of the run at this fraction of it: (the fraction at which it began, its name)."""
    current = _STEPS[0]
    for step in _STEPS[1:]:
        if fraction < step[0]:
            break
        current = step
    return current


def _plan_steps(rng: random.Random) -> tuple[tuple[float, float], ...]:
    """4 to 8 jumps at random fractions of the duration; each jump reports the fraction reached.

    Between jumps the reported value is stale, as with a job that reports at checkpoints.
    """
    count = rng.randint(_MIN_STEPS, _MAX_STEPS)
    fractions = sorted(rng.random() for _ in range(count))
    return tuple((f, 100.0 * f) for f in fractions)
