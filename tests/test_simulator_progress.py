"""The three progress models and the vendor bodies, at chosen loop times (no server, no waiting)."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from monitor.clock import Clock
from monitor.simulator.progress import SimExecution
from monitor.simulator.scenario import ProgressModel

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


def execution(model: str, noise: float = 0.0, outcome: str = "completed", end_s: float = 100.0) -> SimExecution:
    return SimExecution.create(
        execution_id="exec_1",
        created_at=1000.0,
        duration_s=100.0,
        end_s=end_s,
        outcome=outcome,
        progress=ProgressModel(model, noise),
        seed=5,
    )


def test_linear_without_noise_is_exact() -> None:
    e = execution("linear")
    assert [e.reported_progress(1000.0 + t) for t in (0, 10, 45.4, 45.6, 99.9)] == [0, 10, 45, 46, 99]
    assert e.reported_progress(1100.0) == 100
    assert e.status(1099.99) == "running"
    assert e.status(1100.0) == "completed"


def test_linear_noise_is_gaussian_around_the_line_and_clamped() -> None:
    e = execution("linear", noise=3.0)
    samples = [e.reported_progress(1050.0) - 50 for _ in range(2000)]
    mean = sum(samples) / len(samples)
    spread = (sum((s - mean) ** 2 for s in samples) / len(samples)) ** 0.5
    assert abs(mean) < 0.3
    assert spread == pytest.approx(3.0, rel=0.1)
    assert min(e.reported_progress(1000.5) for _ in range(500)) == 0
    assert max(e.reported_progress(1099.5) for _ in range(500)) == 99  # never 100 before the end


def test_none_reports_zero_until_the_end() -> None:
    e = execution("none", noise=5.0)
    assert {e.reported_progress(1000.0 + t) for t in range(100)} == {0}
    assert e.reported_progress(1100.0) == 100


def test_steps_jump_a_few_uneven_times() -> None:
    for seed in range(20):
        e = SimExecution.create(
            execution_id="x",
            created_at=0.0,
            duration_s=100.0,
            end_s=100.0,
            outcome="completed",
            progress=ProgressModel("steps", 0.0),
            seed=seed,
        )
        values = [e.reported_progress(t / 10) for t in range(1000)]
        assert values == sorted(values)  # without noise it never goes back
        jumps = sum(1 for a, b in itertools.pairwise(values) if b != a)
        assert 4 <= jumps <= 8
        gaps = [b[0] - a[0] for a, b in zip(e.steps, e.steps[1:], strict=False)]
        assert len({round(g, 6) for g in gaps}) > 1  # uneven


def test_failed_and_cancelled_end_early_with_the_model_progress() -> None:
    failed = execution("linear", noise=2.0, outcome="failed", end_s=40.0)
    assert failed.status(1039.9) == "running"
    assert failed.status(1040.0) == "failed"
    assert failed.final_progress() == 40
    cancelled = execution("none", outcome="cancelled", end_s=70.0)
    assert cancelled.final_progress() == 0


async def test_bodies_have_the_vendor_shapes() -> None:
    clock = Clock(asyncio.get_running_loop(), wall_anchor=1_762_857_000.0)
    now = clock.now()
    running = SimExecution.create(
        execution_id="exec_r",
        created_at=now,
        duration_s=10.0,
        end_s=10.0,
        outcome="completed",
        progress=ProgressModel("linear", 0.0),
        seed=1,
    )
    body = running.body(now + 5.0, clock)
    assert set(body) == {"execution_id", "status", "progress", "current_step", "updated_at"}
    assert body["status"] == "running"
    assert body["progress"] == 50
    assert ISO_Z.match(body["updated_at"])
    done = running.body(now + 12.0, clock)
    assert set(done) == {"execution_id", "status", "progress", "result", "metadata", "completed_at"}
    assert done["progress"] == 100
    assert isinstance(done["result"], str)
    assert set(done["metadata"]) == {"execution_time", "tokens_used"}
    assert done["metadata"]["execution_time"] == 10.0
    assert done["completed_at"] == clock.iso(now + 10.0)  # the end, not the time of asking
    failed = execution("linear", outcome="failed", end_s=3.0).body(2000.0, clock)
    assert set(failed) == {"execution_id", "status", "error", "metadata", "failed_at"}
    assert set(failed["error"]) == {"code", "message", "details"}
    assert failed["metadata"] == {"execution_time": 3.0}
    cancelled = execution("linear", outcome="cancelled", end_s=30.0).body(2000.0, clock)
    assert set(cancelled) == {"execution_id", "status", "progress", "metadata", "cancelled_at"}
    assert cancelled["metadata"] == {"execution_time": 30.0}
    assert cancelled["progress"] == 30
    assert ISO_Z.match(cancelled["cancelled_at"])
