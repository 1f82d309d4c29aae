"""One simulated execution: its state at any loop time, computed lazily, and the vendor's JSON bodies.

Nothing runs in the background: `status(now)` and `body(now, clock)` derive everything from the
creation time and the plan. Only the noise on reported progress is drawn per answer, from the
execution's own random generator (so one execution's answers never depend on another's polls).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from monitor.clock import Clock
from monitor.simulator.scenario import PlannedOutcome, ProgressKind, ProgressModel

RUNNING = "running"
_STEP_NAMES = (
    (0.10, "Queued"),
    (0.30, "Preparing inputs"),
    (0.70, "Analyzing data"),
    (0.95, "Generating output"),
    (1.00, "Finalizing"),
)
_MIN_STEPS, _MAX_STEPS = 4, 8


@dataclass(slots=True)
class SimExecution:
    """An execution the simulator answers for. Times are loop times."""

    execution_id: str
    created_at: float
    duration_s: float  # after --speed
    end_at: float  # loop time at which it ends (scheduled in advance)
    outcome: str  # a PlannedOutcome value
    progress: ProgressModel
    rng: random.Random
    steps: tuple[tuple[float, float], ...] = ()  # (fraction of the duration, progress from then on)
    tokens_used: int = 0
    polls: int = 0
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
    ) -> SimExecution:
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
        )

    def status(self, now: float) -> str:
        return RUNNING if now < self.end_at else self.outcome

    def ended_at(self, now: float) -> float | None:
        return None if now < self.end_at else self.end_at

    def model_progress(self, at: float) -> float:
        """Progress (0-100, no noise, not rounded) that the model gives at loop time `at`."""
        fraction = min(max((at - self.created_at) / self.duration_s, 0.0), 1.0)
        if self.progress.model == ProgressKind.LINEAR:
            return 100.0 * fraction
        if self.progress.model == ProgressKind.STEPS:
            level = 0.0
            for step_at, step_level in self.steps:
                if fraction < step_at:
                    break
                level = step_level
            return level
        return 0.0

    def reported_progress(self, now: float) -> int:
        """What an answer at `now` says: the model plus noise while running, clamped to 0-99."""
        if now >= self.end_at:
            return self.final_progress()
        value = self.model_progress(now)
        if self.progress.noise > 0 and self.progress.model != ProgressKind.NONE:
            value += self.rng.gauss(0.0, self.progress.noise)
        return min(max(round(value), 0), 99)

    def final_progress(self) -> int:
        """100 when completed; otherwise the model's value at the moment it ended (no noise)."""
        if self._end_progress is None:
            if self.outcome == PlannedOutcome.COMPLETED:
                self._end_progress = 100
            else:
                self._end_progress = min(max(round(self.model_progress(self.end_at)), 0), 99)
        return self._end_progress

    def current_step(self, now: float) -> str:
        fraction = (now - self.created_at) / self.duration_s
        for upper, name in _STEP_NAMES:
            if fraction < upper:
                return name
        return _STEP_NAMES[-1][1]

    def body(self, now: float, clock: Clock) -> dict[str, Any]:
        """The vendor's 200 body for this execution at loop time `now`."""
        status = self.status(now)
        if status == RUNNING:
            return {
                "execution_id": self.execution_id,
                "status": RUNNING,
                "progress": self.reported_progress(now),
                "current_step": self.current_step(now),
                "updated_at": clock.iso(now),
            }
        if status == PlannedOutcome.COMPLETED:
            return {
                "execution_id": self.execution_id,
                "status": "completed",
                "progress": 100,
                "result": f"Task completed successfully with detailed results for {self.execution_id}",
                "metadata": {
                    "execution_time": round(self.end_at - self.created_at, 3),
                    "tokens_used": self.tokens_used,
                },
                "completed_at": clock.iso(self.end_at),
            }
        if status == PlannedOutcome.FAILED:
            return {
                "execution_id": self.execution_id,
                "status": "failed",
                "error": {
                    "code": "execution_error",
                    "message": "Task execution failed",
                    "details": f"Simulated failure after {self.end_at - self.created_at:.1f} s",
                },
                "failed_at": clock.iso(self.end_at),
            }
        return {
            "execution_id": self.execution_id,
            "status": "cancelled",
            "progress": self.final_progress(),
            "cancelled_at": clock.iso(self.end_at),
        }


def _plan_steps(rng: random.Random) -> tuple[tuple[float, float], ...]:
    """4 to 8 jumps at random fractions of the duration; each jump reports the fraction reached.

    Between jumps the reported value is stale, as with a job that reports at checkpoints.
    """
    count = rng.randint(_MIN_STEPS, _MAX_STEPS)
    fractions = sorted(rng.random() for _ in range(count))
    return tuple((f, 100.0 * f) for f in fractions)
