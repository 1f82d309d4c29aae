"""Scenario files: parsing (errors name file and key), and plans (distributions, mixes, determinism)."""

from __future__ import annotations

import math
import statistics
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
    files = sorted(shared.glob("*.toml"))
    if not files:
        pytest.skip(f"no public scenarios at {shared}; test_load_public_style_file covers the format")
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
