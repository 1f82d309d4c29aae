"""The population models beyond a straight line, checked answer by answer against their definitions.

Each test serves the real simulator on 127.0.0.1 on a virtual-time loop (monitor/vtime.py) and
polls it over HTTP for hours of virtual time: queue, progress curve, stall (resume and fail, from
a scenario and from POST /_sim/executions), `updated_at` as the time of the last change, and
`metadata.execution_time` on terminal answers.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from monitor import vtime
from monitor.clock import Clock, parse_iso
from monitor.simulator.progress import SimExecution
from monitor.simulator.scenario import ProgressModel, parse_scenario
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

KEY = "sk_test_local"
ISO_TOLERANCE_S = 2e-3  # timestamps carry milliseconds; an answer takes a few virtual microseconds
Answer = tuple[float, dict[str, Any]]  # (loop time of asking, body)
Test = Callable[[Simulator, aiohttp.ClientSession, str], Awaitable[None]]


def on_virtual_time(test: Test, **settings: Any) -> None:
    async def main() -> None:
        runner, url = await start_simulator(SimulatorSettings(rate_limit=None, **settings))
        try:
            async with aiohttp.ClientSession() as http:
                await test(simulator_of(runner), http, url)
        finally:
            await runner.cleanup()

    vtime.run(main())


async def poll(http: aiohttp.ClientSession, url: str, execution_id: str, *, every: float, until: float) -> list[Answer]:
    """Answers for one ID every `every` seconds until loop time `until`."""
    loop = asyncio.get_running_loop()
    answers = []
    while loop.time() < until:
        asked = loop.time()
        async with http.get(f"{url}/api/v1/executions/{execution_id}/status", headers={"X-API-Key": KEY}) as r:
            answers.append((asked, await r.json()))
        await asyncio.sleep(every)
    return answers


async def truth_rows(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with http.get(f"{url}/_sim/executions") as r:
        return {row["execution_id"]: row for row in (await r.json())["executions"]}


def loop_time(sim: Simulator, iso: str) -> float:
    epoch = parse_iso(iso)
    assert epoch is not None, iso
    return sim.clock.to_loop(epoch)


def plan_of(**group: Any) -> list[Any]:
    base: dict[str, Any] = {"count": 1, "duration": {"dist": "fixed", "s": 1200}, "outcomes": {"completed": 1}}
    return parse_scenario({"name": "m", "seed": 3, "groups": [base | group]}, "m.toml").plan()


def test_queue_waits_at_zero_queued_then_runs() -> None:
    async def check(sim: Simulator, http: aiohttp.ClientSession, url: str) -> None:
        [planned] = plan_of(queue={"dist": "fixed", "s": 600}, progress={"model": "linear", "noise": 2.0}, kind="etl")
        sim.add_plan([planned])
        created = sim.now()
        answers = await poll(http, url, planned.execution_id, every=15.0, until=created + 2000)
        for asked, body in answers:
            age = asked - created
            if age < 600:
                assert (body["status"], body["progress"], body["current_step"]) == ("running", 0, "Queued")
                assert loop_time(sim, body["updated_at"]) == pytest.approx(created, abs=ISO_TOLERANCE_S)
            elif age < 1800:
                assert body["current_step"] != "Queued"
                assert abs(body["progress"] - 100 * (age - 600) / 1200) <= 2.0 * 5 + 1
                assert created + 600 - ISO_TOLERANCE_S <= loop_time(sim, body["updated_at"]) <= asked
            else:
                assert body["status"] == "completed"
                assert body["metadata"]["execution_time"] == 1200.0  # the run, not the queue
                assert loop_time(sim, body["completed_at"]) == pytest.approx(created + 1800, abs=ISO_TOLERANCE_S)
        assert sum(1 for asked, _ in answers if asked - created < 600) >= 39
        assert (await truth_rows(http, url))[planned.execution_id]["kind"] == "etl"

    on_virtual_time(check)


@pytest.mark.parametrize("shape", [0.6, 1.5])
def test_curve_is_100_f_to_the_shape_plus_noise(shape: float) -> None:
    async def check(sim: Simulator, http: aiohttp.ClientSession, url: str) -> None:
        plan = plan_of(
            count=20, duration={"dist": "fixed", "s": 1000}, progress={"model": "curve", "shape": shape, "noise": 1.0}
        )
        sim.add_plan(plan)
        created = sim.now()
        series = await asyncio.gather(*(poll(http, url, p.execution_id, every=10.0, until=created + 999) for p in plan))
        residuals, off_line = [], []
        for asked, body in itertools.chain.from_iterable(series):
            f = (asked - created) / 1000
            model = 100 * f**shape
            if 5 <= model <= 94:  # away from the clamps at 0 and 99
                residuals.append(body["progress"] - model)
                off_line.append(abs(body["progress"] - 100 * f))
        assert len(residuals) > 1000
        assert max(abs(r) for r in residuals) <= 5.5
        assert abs(statistics.mean(residuals)) < 0.2
        assert statistics.stdev(residuals) == pytest.approx(1.04, abs=0.15)  # noise 1, plus rounding
        assert statistics.mean(off_line) > 8  # not a straight line

    on_virtual_time(check)


def test_curve_without_noise_is_exact() -> None:
    for shape in (0.6, 1.5):
        e = SimExecution.create(
            execution_id="x",
            created_at=0.0,
            duration_s=100.0,
            end_s=100.0,
            outcome="completed",
            progress=ProgressModel("curve", 0.0, shape),
            seed=1,
        )
        times = [t / 4 for t in range(400)]
        assert [e.reported_progress(t) for t in times] == [min(round(100 * (t / 100) ** shape), 99) for t in times]


@pytest.mark.parametrize("model", ["linear", "curve", "steps", "none"])
def test_updated_at_is_the_last_change_of_progress_or_step(model: str) -> None:
    """With a queue and a stall: polled every second, updated_at moves exactly when an answer changes."""
    progress: dict[str, Any] = {"model": model} | ({"shape": 0.6} if model == "curve" else {})
    stall = {"fraction": 1.0, "for_s": {"dist": "fixed", "s": 60}, "then": "resume"}

    async def check(sim: Simulator, http: aiohttp.ClientSession, url: str) -> None:
        [planned] = plan_of(
            queue={"dist": "fixed", "s": 30}, duration={"dist": "fixed", "s": 300}, progress=progress, stall=stall
        )
        assert planned.stall is not None
        sim.add_plan([planned])
        created = sim.now()
        answers = [
            a
            for a in await poll(http, url, planned.execution_id, every=1.0, until=created + 400)
            if a[1]["status"] == "running"
        ]
        assert len(answers) > 380
        changes = 0
        for (before, previous), (asked, body) in itertools.pairwise(answers):
            updated = loop_time(sim, body["updated_at"])
            assert updated <= asked + ISO_TOLERANCE_S
            if (body["progress"], body["current_step"]) != (previous["progress"], previous["current_step"]):
                changes += 1
                assert before - ISO_TOLERANCE_S < updated <= asked + ISO_TOLERANCE_S
            else:
                assert body["updated_at"] == previous["updated_at"]
        assert changes >= 5  # the step names at least ("Queued" -> "Starting" -> ... -> "Finalizing")
        frozen = [
            (b["progress"], b["current_step"], b["updated_at"])
            for t, b in answers
            if 0 <= t - created - planned.stall.at_s < 60
        ]
        assert len(frozen) >= 59
        assert len(set(frozen)) == 1
        assert loop_time(sim, frozen[0][2]) <= created + planned.stall.at_s + ISO_TOLERANCE_S

    on_virtual_time(check)


def test_updated_at_ignores_the_noise() -> None:
    def updated(noise: float) -> list[float]:
        e = SimExecution.create(
            execution_id="x",
            created_at=0.0,
            duration_s=500.0,
            end_s=500.0,
            outcome="completed",
            progress=ProgressModel("steps", noise),
            seed=4,
        )
        return [e.last_change(t) for t in range(500)]

    assert updated(5.0) == updated(0.0)
    assert len(set(updated(5.0))) >= 8  # the checkpoints and the step names


def stall_request(then: str) -> dict[str, Any]:
    return {
        "ids": [f"exec_stall_{then}"],
        "duration_s": 1200,
        "outcome": "completed",
        "progress": {"model": "linear", "noise": 2.0},
        "stall": {"at_s": 400, "for_s": 600, "then": then},
    }


@pytest.mark.parametrize("then", ["resume", "fail"])
def test_the_admin_stall_freezes_then_resumes_or_fails(then: str) -> None:
    """On --speed 2: the stall's seconds are the execution's own, halved like its duration."""

    async def check(sim: Simulator, http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(f"{url}/_sim/executions", json=stall_request(then)) as r:
            assert r.status == 200
        created = sim.now()
        execution_id = f"exec_stall_{then}"
        answers = await poll(http, url, execution_id, every=2.0, until=created + 950)
        frozen = {(b["progress"], b["current_step"], b["updated_at"]) for t, b in answers if 200 <= t - created < 500}
        assert len(frozen) == 1
        [(level, _, since)] = frozen
        assert level == 33  # 400 s of 1200 at the stall
        assert created + 195 - ISO_TOLERANCE_S <= loop_time(sim, since) <= created + 200 + ISO_TOLERANCE_S
        for asked, body in answers:
            age = 2 * (asked - created)  # seconds of the execution's own clock
            if age < 400:
                assert abs(body["progress"] - 100 * age / 1200) <= 11
            elif then == "resume" and 1010 <= age < 1800:  # (the first change after it: level 34 at 1002)
                assert abs(body["progress"] - 100 * (age - 600) / 1200) <= 11
                assert loop_time(sim, body["updated_at"]) >= created + 500 - ISO_TOLERANCE_S
        ended = [body for asked, body in answers if body["status"] != "running"]
        end_s = 900.0 if then == "resume" else 500.0  # (1200 + 600) / 2, or (400 + 600) / 2
        assert ended[0]["status"] == ("completed" if then == "resume" else "failed")
        assert ended[0]["metadata"]["execution_time"] == end_s
        assert all(asked - created >= end_s for asked, body in answers if body["status"] != "running")
        row = (await truth_rows(http, url))[execution_id]
        assert loop_time(sim, row["stalled_from"]) == pytest.approx(created + 200, abs=ISO_TOLERANCE_S)
        assert loop_time(sim, row["stalled_until"]) == pytest.approx(created + 500, abs=ISO_TOLERANCE_S)
        assert loop_time(sim, row["ended_at"]) == pytest.approx(created + end_s, abs=ISO_TOLERANCE_S)
        assert "kind" not in row

    on_virtual_time(check, speed=2.0)


def test_a_scenario_stall_that_fails_ends_failed_at_the_end_of_the_stall() -> None:
    async def check(sim: Simulator, http: aiohttp.ClientSession, url: str) -> None:
        stall = {"fraction": 1.0, "for_s": {"dist": "fixed", "s": 900}, "then": "fail"}
        [planned] = plan_of(progress={"model": "steps", "noise": 3.0}, stall=stall)
        assert planned.stall is not None
        sim.add_plan([planned])
        created = sim.now()
        answers = await poll(http, url, planned.execution_id, every=5.0, until=created + planned.stall.until_s + 30)
        at, until = created + planned.stall.at_s, created + planned.stall.until_s
        assert len({(b["progress"], b["updated_at"]) for t, b in answers if at <= t < until}) == 1
        assert all(b["status"] == "running" for t, b in answers if t < until)
        failed = [b for t, b in answers if t >= until]
        assert failed
        assert all(b["status"] == "failed" for b in failed)
        assert failed[0]["metadata"]["execution_time"] == pytest.approx(planned.stall.until_s, abs=1e-3)
        assert loop_time(sim, failed[0]["failed_at"]) == pytest.approx(until, abs=ISO_TOLERANCE_S)

    on_virtual_time(check)


async def test_execution_time_counts_the_run_only() -> None:
    clock = Clock(asyncio.get_running_loop())
    for outcome in ("completed", "failed", "cancelled"):
        e = SimExecution.create(
            execution_id="x",
            created_at=0.0,
            duration_s=100.0,
            end_s=50.0 + (100.0 if outcome == "completed" else 40.0),
            outcome=outcome,
            progress=ProgressModel("linear"),
            seed=1,
            queue_s=50.0,
        )
        assert e.body(500.0, clock)["metadata"]["execution_time"] == (100.0 if outcome == "completed" else 40.0)
    never = SimExecution.create(
        execution_id="y",
        created_at=0.0,
        duration_s=100.0,
        end_s=100.0,
        outcome="completed",
        progress=ProgressModel("linear"),
        seed=1,
    )
    assert never.stalled_from is None
    assert never.stalled_until is None
