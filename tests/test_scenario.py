"""Scenario files: parsing (errors name file and key), and plans (distributions, mixes, determinism)."""

from __future__ import annotations

import math
import statistics
import tomllib
from pathlib import Path
from typing import Any

import pytest

from monitor.errors import UsageError
from monitor.rates import RateLimit
from monitor.simulator.scenario import (
    PlannedExecution,
    Scenario,
    default_scenario,
    load_scenario,
    parse_scenario,
)

PUBLIC_STYLE = """
name = "hundreds-1h"
seed = 7
rate_limit = "30/60s"

[[groups]]
count = 300
arrival = { from_s = 0, to_s = 60 }
duration = { dist = "lognormal", median_s = 3600, sigma = 0.5, min_s = 60, max_s = 21600 }
outcomes = { completed = 0.93, failed = 0.05, cancelled = 0.02 }
progress = { model = "linear", noise = 1.5 }
not_found = 0.0
"""


def group(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"count": 2000, "duration": {"dist": "fixed", "s": 100}}
    base.update(overrides)
    return base


def scenario(*groups: dict[str, Any], seed: int = 1) -> Scenario:
    return parse_scenario({"name": "t", "seed": seed, "groups": list(groups)}, "t.toml")


def test_load_public_style_file(tmp_path: Path) -> None:
    path = tmp_path / "hundreds-1h.toml"
    path.write_text(PUBLIC_STYLE)
    loaded = load_scenario(path)
    assert loaded.name == "hundreds-1h"
    assert loaded.seed == 7
    assert loaded.rate_limit == RateLimit(30, 60.0)
    plan = loaded.plan()
    assert len(plan) == 300
    assert [p.arrival_s for p in plan] == sorted(p.arrival_s for p in plan)
    assert all(0 <= p.arrival_s <= 60 for p in plan)
    assert all(60 <= p.duration_s <= 21600 for p in plan)
    assert len({p.execution_id for p in plan}) == 300
    assert all(p.execution_id.startswith("exec_") and len(p.execution_id) == 17 for p in plan)
    assert all(p.exists for p in plan)


def test_the_shared_public_scenarios_load() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "scenarios"
    files = sorted([*shared.glob("*.toml"), *shared.glob("beyond-linear/*.toml")])
    if not files:
        pytest.skip(f"no public scenarios at {shared}; test_load_public_style_file covers the format")
    for path in files:
        assert load_scenario(path).plan(), path


def test_the_in_repo_beyond_linear_scenarios_load() -> None:
    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "scenarios" / "public" / "beyond-linear"
    files = sorted(folder.glob("*.toml"))
    assert len(files) >= 5
    for path in files:
        assert load_scenario(path).plan(), path


def test_plan_is_deterministic_and_per_index() -> None:
    first = scenario(group(count=50, arrival={"from_s": 0, "to_s": 100})).plan()
    again = scenario(group(count=50, arrival={"from_s": 0, "to_s": 100})).plan()
    assert first == again
    # Execution i depends only on (name, seed, i): a longer group keeps the first 50 unchanged.
    longer = scenario(group(count=80, arrival={"from_s": 0, "to_s": 100})).plan()
    by_id = {p.execution_id: p for p in longer}
    assert all(by_id[p.execution_id] == p for p in first)
    other_seed = scenario(group(count=50), seed=2).plan()
    assert {p.execution_id for p in other_seed}.isdisjoint(p.execution_id for p in first)


def test_lognormal_median_sigma_and_clipping() -> None:
    plan = scenario(group(duration={"dist": "lognormal", "median_s": 600, "sigma": 0.5})).plan()
    durations = [p.duration_s for p in plan]
    assert statistics.median(durations) == pytest.approx(600, rel=0.08)
    assert statistics.stdev(math.log(d) for d in durations) == pytest.approx(0.5, rel=0.08)
    clipped = scenario(
        group(duration={"dist": "lognormal", "median_s": 600, "sigma": 1.0, "min_s": 300, "max_s": 900})
    ).plan()
    values = [p.duration_s for p in clipped]
    assert min(values) == 300
    assert max(values) == 900
    assert sum(v == 300 for v in values) > 100  # clipped, not re-drawn


def test_uniform_and_fixed() -> None:
    plan = scenario(group(duration={"dist": "uniform", "min_s": 100, "max_s": 300})).plan()
    durations = [p.duration_s for p in plan]
    assert 100 <= min(durations) < 110
    assert 290 < max(durations) <= 300
    assert statistics.mean(durations) == pytest.approx(200, rel=0.05)
    fixed = scenario(group(count=10, duration={"dist": "fixed", "s": 42, "max_s": 40})).plan()
    assert {p.duration_s for p in fixed} == {40}
    assert {p.duration_s for p in scenario(group(count=10)).plan()} == {100}


def test_outcome_mix_and_end_times() -> None:
    plan = scenario(group(outcomes={"completed": 0.6, "failed": 0.3, "cancelled": 0.1})).plan()
    share = {o: sum(p.outcome == o for p in plan) / len(plan) for o in ("completed", "failed", "cancelled")}
    assert share["completed"] == pytest.approx(0.6, abs=0.04)
    assert share["failed"] == pytest.approx(0.3, abs=0.04)
    assert share["cancelled"] == pytest.approx(0.1, abs=0.03)
    for p in plan:
        if p.outcome == "completed":
            assert p.end_s == p.duration_s
        else:
            assert 0 <= p.end_s < p.duration_s
    early = [p.end_s / p.duration_s for p in plan if p.outcome != "completed"]
    assert statistics.mean(early) == pytest.approx(0.5, abs=0.05)  # uniform inside the duration


def test_default_outcomes_and_progress_when_omitted() -> None:
    plan = scenario(group()).plan()
    assert {p.outcome for p in plan} == {"completed", "failed", "cancelled"}
    assert sum(p.outcome == "completed" for p in plan) / len(plan) == pytest.approx(0.93, abs=0.03)
    assert plan[0].progress.model == "linear"


def test_not_found_fraction() -> None:
    plan = scenario(group(not_found=0.25)).plan()
    assert sum(not p.exists for p in plan) / len(plan) == pytest.approx(0.25, abs=0.03)
    assert all(p.exists for p in scenario(group(count=100)).plan())


def test_progress_model_is_passed_to_every_execution() -> None:
    plan = scenario(group(count=5, progress={"model": "steps", "noise": 2})).plan()
    assert {(p.progress.model, p.progress.noise) for p in plan} == {("steps", 2.0)}


def test_several_groups_share_one_sorted_plan() -> None:
    plan = scenario(
        group(count=10, arrival={"from_s": 100, "to_s": 200}),
        group(count=10, arrival={"from_s": 0, "to_s": 50}, progress={"model": "none"}),
    ).plan()
    assert [p.progress.model for p in plan[:10]] == ["none"] * 10
    assert [p.arrival_s for p in plan] == sorted(p.arrival_s for p in plan)


def test_default_scenario() -> None:
    plan = default_scenario(20, seed=3).plan()
    assert len(plan) == 20
    assert all(p.arrival_s == 0 and 5 <= p.duration_s <= 600 for p in plan)
    assert isinstance(plan[0], PlannedExecution)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('seed = 1\n[[groups]]\ncount = 1\nduration = { dist = "normal", s = 1 }', "groups[0].duration.dist"),
        (
            'rate_limit = "30 per minute"\n[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }',
            "rate_limit",
        ),
        ("seed = 1", "groups"),
        ('[[groups]]\ncount = -1\nduration = { dist = "fixed", s = 1 }', "groups[0].count"),
        ('[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }\nnot_found = 2', "groups[0].not_found"),
        ('[[groups]]\ncount = 1\nduration = { dist = "uniform", min_s = 1 }', "groups[0].duration.min_s"),
        (
            '[[groups]]\ncount = 1\nduration = { dist = "lognormal", sigma = 1 }',
            "groups[0].duration.median_s",
        ),
        ('[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }\ncolour = 3', "groups[0].colour"),
        (
            '[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }\nprogress = { model = "log" }',
            "model",
        ),
        (
            '[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }\noutcomes = { completed = 0 }',
            "outcomes",
        ),
        (
            '[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }\noutcomes = { lost = 1 }',
            "outcomes.lost",
        ),
        (
            '[[groups]]\ncount = 1\narrival = { from_s = 10, to_s = 5 }\nduration = { dist = "fixed", s = 1}',
            "to_s",
        ),
        ("seed = 1\n[[groups]]\ncount = 1", "groups[0].duration"),
        ('seed = "x"\n[[groups]]\ncount = 1\nduration = { dist = "fixed", s = 1 }', "seed"),
    ],
)
def test_bad_scenarios_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert str(path) in message
    assert needle in message
    assert "\n" not in message


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(UsageError, match=r"cannot read scenario file .*missing\.toml"):
        load_scenario(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    with pytest.raises(UsageError, match=r"broken\.toml: not valid TOML"):
        load_scenario(broken)
    with pytest.raises(UsageError, match="cannot read scenario file"):
        load_scenario(tmp_path)  # a directory


# ---------------------------------------------------------------------------------------------
# The optional models: kind, queue, progress curve, handover, stall.


def test_a_file_without_the_optional_keys_plans_as_before() -> None:
    plan = parse_scenario(tomllib.loads(PUBLIC_STYLE), "x").plan()
    # Pinned from the plan before the optional models existed: the public files keep their meaning.
    first = [(p.execution_id, p.arrival_s, p.duration_s, p.outcome, p.end_s) for p in plan[:3]]
    assert first == [
        ("exec_9b5e89da2a21", 0.12919394245635374, 5383.18229423792, "completed", 5383.18229423792),
        ("exec_23557d981767", 0.23789125947508927, 3452.970825660904, "completed", 3452.970825660904),
        ("exec_3d6b4dcc530c", 0.34206559891931887, 3751.3602377835946, "failed", 1145.345073035759),
    ]
    assert [p.seed for p in plan[:3]] == [8773629855736549542, 984856325933477238, 3540955739032948381]
    assert all(p.queue_s == 0 and p.stall is None and p.handover_s == 0 and p.kind is None for p in plan)


def test_the_optional_models_shift_no_other_field() -> None:
    plain = scenario(group(count=200, arrival={"from_s": 0, "to_s": 100})).plan()
    rich = scenario(
        group(
            count=200,
            arrival={"from_s": 0, "to_s": 100},
            kind="etl",
            queue={"dist": "lognormal", "median_s": 60, "sigma": 1.0},
            handover={"from": 0.1, "to": 0.9},
            stall={"fraction": 0.5, "for_s": {"dist": "uniform", "min_s": 10, "max_s": 20}, "then": "resume"},
            progress={"model": "curve", "shape": 0.6, "noise": 1.0},
        )
    ).plan()
    same = ("execution_id", "arrival_s", "duration_s", "exists", "seed")
    assert [[getattr(p, f) for f in same] for p in plain] == [[getattr(p, f) for f in same] for p in rich]
    assert {p.kind for p in rich} == {"etl"}
    assert {(p.progress.model, p.progress.shape, p.progress.noise) for p in rich} == {("curve", 0.6, 1.0)}


def test_queue_comes_before_the_run() -> None:
    plan = scenario(group(queue={"dist": "lognormal", "median_s": 120, "sigma": 1.0}, outcomes={"completed": 1})).plan()
    queues = [p.queue_s for p in plan]
    assert statistics.median(queues) == pytest.approx(120, rel=0.1)
    assert statistics.stdev(math.log(q) for q in queues) == pytest.approx(1.0, rel=0.08)
    assert all(p.end_s == pytest.approx(p.queue_s + p.duration_s) for p in plan)  # the run is after the queue
    early = scenario(group(queue={"dist": "fixed", "s": 50}, outcomes={"failed": 1})).plan()
    assert all(50 <= p.end_s < 150 for p in early)  # failures end inside the run, not inside the queue


def test_handover_is_a_uniform_fraction_of_the_run() -> None:
    plan = scenario(group(queue={"dist": "fixed", "s": 30}, handover={"from": 0.2, "to": 0.8}, not_found=0.0)).plan()
    fractions = [(p.handover_s - p.queue_s) / (p.end_s - p.queue_s) for p in plan]
    assert 0.2 <= min(fractions) < 0.22
    assert 0.78 < max(fractions) <= 0.8
    assert statistics.mean(fractions) == pytest.approx(0.5, abs=0.02)
    assert all(p.handover_s <= p.end_s for p in plan)  # never after its end, failures included
    fixed = scenario(group(count=50, handover={"from": 0.5})).plan()
    assert {round(p.handover_s / p.end_s, 9) for p in fixed} == {0.5}


@pytest.mark.parametrize("then", ["resume", "fail"])
def test_stall_picks_a_share_of_runs_and_a_point_inside_each(then: str) -> None:
    spec = {"fraction": 0.25, "for_s": {"dist": "uniform", "min_s": 600, "max_s": 3600}, "then": then}
    base = scenario(group(queue={"dist": "fixed", "s": 40})).plan()
    plan = scenario(group(queue={"dist": "fixed", "s": 40}, stall=spec)).plan()
    stalled = [(b, p) for b, p in zip(base, plan, strict=True) if p.stall is not None]
    assert len(stalled) / len(plan) == pytest.approx(0.25, abs=0.03)
    for before, p in stalled:
        assert p.stall is not None
        assert p.stall.then == then
        assert 600 <= p.stall.for_s <= 3600
        assert 40 <= p.stall.at_s < before.end_s  # inside the run as it would have gone
        if then == "resume":
            assert p.outcome == before.outcome
            assert p.end_s == pytest.approx(before.end_s + p.stall.for_s)
        else:
            assert p.outcome == "failed"
            assert p.end_s == pytest.approx(p.stall.until_s)
    points = [(p.stall.at_s - 40) / (b.end_s - 40) for b, p in stalled if p.stall is not None]
    assert statistics.mean(points) == pytest.approx(0.5, abs=0.05)
    assert all(p == b for b, p in zip(base, plan, strict=True) if p.stall is None)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"kind": 3}, "groups[0].kind"),
        ({"kind": ""}, "groups[0].kind"),
        ({"queue": {"dist": "fixed"}}, "groups[0].queue.s"),
        ({"queue": 5}, "groups[0].queue"),
        ({"progress": {"model": "curve"}}, "groups[0].progress.shape"),
        ({"progress": {"model": "curve", "shape": 0}}, "groups[0].progress.shape"),
        ({"progress": {"model": "linear", "shape": 2}}, "groups[0].progress.shape"),
        ({"handover": {"from": 0.5, "to": 0.4}}, "groups[0].handover.to"),
        ({"handover": {"from": 0.5, "to": 1.5}}, "groups[0].handover.to"),
        ({"handover": {"start": 0.5}}, "groups[0].handover.start"),
        ({"stall": {"fraction": 0.1}}, "groups[0].stall.for_s"),
        ({"stall": {"fraction": 2, "for_s": {"dist": "fixed", "s": 1}}}, "groups[0].stall.fraction"),
        ({"stall": {"fraction": 0.1, "for_s": {"dist": "fixed", "s": 1}, "then": "retry"}}, "groups[0].stall.then"),
        ({"stall": {"fraction": 0.1, "for_s": {"dist": "fixed", "s": 1}, "at": 3}}, "groups[0].stall.at"),
    ],
)
def test_bad_optional_keys_name_the_key(extra: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as caught:
        scenario(group(count=1, **extra))
    assert needle in str(caught.value)
    assert str(caught.value).startswith("t.toml: ")
