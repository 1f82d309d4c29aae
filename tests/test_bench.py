"""`execmon bench`: the real scheduler, client, outbox and simulator on virtual time; informed and oracle."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from monitor import bench, vtime
from monitor.cli import main
from monitor.rates import RateLimit
from monitor.schedule.scheduler import Scheduler
from monitor.schedule.state import ExecState
from monitor.simulator.scenario import PlannedExecution, PlannedOutcome, ProgressModel, load_scenario
from monitor.simulator.server import Simulator

SMALL = """
name = "small"
seed = 4
rate_limit = "30/60s"

[[groups]]
count = 24
arrival = { from_s = 0, to_s = 30 }
duration = { dist = "uniform", min_s = 60, max_s = 400 }
outcomes = { completed = 0.8, failed = 0.1, cancelled = 0.1 }
progress = { model = "linear", noise = 1.5 }

[[groups]]
count = 8
arrival = { from_s = 0, to_s = 200 }
duration = { dist = "fixed", s = 150 }
progress = { model = "none" }
not_found = 0.5
"""

# Every optional model at once, beside a plain group.
BEYOND_LINEAR = """
name = "beyond"
seed = 5
rate_limit = "30/60s"

[[groups]]
count = 16
kind = "batch"
arrival = { from_s = 0, to_s = 60 }
queue = { dist = "fixed", s = 30 }
handover = { from = 0.2, to = 0.8 }
duration = { dist = "uniform", min_s = 300, max_s = 900 }
outcomes = { completed = 0.7, failed = 0.3 }
progress = { model = "curve", shape = 0.6, noise = 1.0 }
stall = { fraction = 0.4, for_s = { dist = "fixed", s = 120 }, then = "fail" }

[[groups]]
count = 4
arrival = { from_s = 0, to_s = 60 }
duration = { dist = "fixed", s = 200 }
"""

KEYS = {
    "mean_s",
    "p50_s",
    "p90_s",
    "p99_s",
    "max_s",
    "requests",
    "requests_per_execution",
    "http_429",
    "max_requests_in_window",
    "undetected",
    "poll_mean_s",
    "poll_p99_s",
    "poll_max_s",
}


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL, encoding="utf-8")
    return path


def planned(execution_id: str, arrival: float, end: float, *, exists: bool = True) -> PlannedExecution:
    return PlannedExecution(execution_id, arrival, end, "completed", end, ProgressModel("none"), exists=exists)


def test_percentiles_interpolate_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 0.5) == pytest.approx(50.5)
    assert bench.percentile(values, 0.99) == pytest.approx(99.01)
    assert bench.percentile([7.0], 0.9) == 7.0
    assert bench.percentile([], 0.5) == 0.0


def test_oracle_polls_once_at_the_first_token_after_each_end() -> None:
    plan = [
        planned("exec_a", 0, 100),
        planned("exec_b", 0, 100),
        planned("exec_c", 50, 60),
        planned("x", 0, 5, exists=False),
    ]
    result = bench.oracle(plan, RateLimit(30, 60.0))
    # Ends at 100, 100, 110: tokens at 100, 102 (2 s apart), 110.
    assert result.mean_s == pytest.approx((0 + 2 + 0) / 3)
    assert result.max_s == pytest.approx(2.0)
    assert result.requests == 3
    assert result.not_found == 1
    assert result.max_requests_in_window <= 30


def test_both_policies_detect_everything_within_the_budget(small: Path) -> None:
    scenario = load_scenario(small)
    plan = scenario.plan()
    missing = sum(1 for p in plan if not p.exists)
    assert missing > 0
    for policy in ("backoff", "adaptive"):
        result = bench.bench_policy(scenario, policy)
        assert result.undetected == 0
        assert result.not_found == missing
        assert result.http_429 == 0
        assert result.max_requests_in_window <= 30
        assert 0 < result.mean_s <= result.p90_s <= result.max_s
        assert result.requests >= len(plan)


def test_bench_survives_server_errors(small: Path) -> None:
    scenario = load_scenario(small)
    result = vtime.run(bench.run_policy(scenario, "adaptive", error_rate=0.2))
    assert result.undetected == 0
    assert result.http_429 == 0


def test_cli_json_has_the_contract_shape(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", str(small), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "small"
    assert out["seed"] == 4
    assert "confirmed by the sink" in out["delay"]
    assert list(out["policies"]) == ["backoff", "adaptive", "informed", "oracle"]
    for row in out["policies"].values():
        assert set(row) == KEYS
    policies, ratios = out["policies"], out["ratios"]
    assert set(ratios) == {"adaptive/backoff", "adaptive/informed"}
    for key in ("mean_s", "p99_s", "max_s"):
        assert ratios["adaptive/informed"][key] == pytest.approx(policies["adaptive"][key] / policies["informed"][key])
        assert ratios["adaptive/backoff"][key] == pytest.approx(policies["adaptive"][key] / policies["backoff"][key])


def test_cli_table_shows_the_ratio(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", str(small), "--policy", "adaptive", "--policy", "backoff"]) == 0
    out = capsys.readouterr().out
    assert "adaptive/backoff" in out
    assert "adaptive/informed" in out
    assert "oracle" in out
    assert "confirmed by the sink" in out
    assert "up to the poll's answer" in out


def test_cli_one_policy_only(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", str(small), "--policy", "backoff", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"backoff", "informed", "oracle"}
    assert out["ratios"] == {}


def test_cli_bad_scenario_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--scenario", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read scenario file" in capsys.readouterr().err


def test_cli_seed_replaces_the_file_seed(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(path: Path, *extra: str) -> Any:
        assert main(["bench", "--scenario", str(path), "--policy", "backoff", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    reseeded = tmp_path / "small-9.toml"
    reseeded.write_text(SMALL.replace("seed = 4", "seed = 9"), encoding="utf-8")
    with_flag = run(small, "--seed", "9")
    assert with_flag == run(reseeded)
    assert with_flag != run(small)


def test_bench_hands_ids_over_at_their_fraction_with_their_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "beyond.toml"
    path.write_text(BEYOND_LINEAR, encoding="utf-8")
    scenario = load_scenario(path)
    created: dict[str, float] = {}
    tracked: dict[str, tuple[float, Any]] = {}
    add_planned, track = Simulator.add_planned, Scheduler.track

    def creating(self: Simulator, planned: PlannedExecution) -> None:
        created[planned.execution_id] = self.now()
        add_planned(self, planned)

    def tracking(self: Scheduler, execution_id: str, **kwargs: Any) -> bool:
        tracked[execution_id] = (asyncio.get_running_loop().time(), kwargs.get("labels"))
        return track(self, execution_id, **kwargs)

    monkeypatch.setattr(Simulator, "add_planned", creating)
    monkeypatch.setattr(Scheduler, "track", tracking)
    result = bench.bench_policy(scenario, "adaptive")
    assert (result.undetected, result.http_429) == (0, 0)
    assert result.max_requests_in_window <= 30
    plan = scenario.plan()
    assert any(p.stall is not None and p.outcome == PlannedOutcome.FAILED for p in plan)
    for p in plan:
        at, labels = tracked[p.execution_id]
        assert at - created[p.execution_id] == pytest.approx(p.handover_s, abs=1e-3)
        if p.kind is None:
            assert (labels, p.handover_s) == (None, 0.0)  # at creation, as before
        else:
            assert labels == {"kind": "batch"}
            assert 0.2 <= (p.handover_s - p.queue_s) / (p.end_s - p.queue_s) <= 0.8  # of its run


def test_informed_polls_known_ends_first_and_keeps_their_token() -> None:
    ends = {"exec_a": 100.0, "exec_b": 50.0}
    policy = bench.InformedPolicy(ends.get)
    policy.bind_rate(lambda: 0.5)  # a token every 2 s
    states = {i: ExecState(i, 0.0) for i in ("exec_a", "exec_b", "exec_c")}  # exec_c: nothing known
    for state in states.values():
        policy.add(state, 0.0)
    # Nothing has ended: the round robin, longest unanswered first (ties: in order of arrival).
    assert policy.ready_at(0.0) == 0.0
    first = policy.choose(0.0)
    assert first is states["exec_a"]
    policy.polled(first, 0.0)
    # At 47 a round-robin poll could go (its token would come at 47), and the next at 49 < 50: it may go.
    assert policy.ready_at(47.0) == 0.0
    second = policy.choose(47.0)
    assert second is states["exec_b"]
    policy.polled(second, 47.0)
    # At 48.5 a round-robin poll could only go at 49 (2 s after the last): it would hold the token
    # that exec_b's end at 50 needs, so the policy waits for that end.
    assert policy.ready_at(48.5) == 50.0
    assert policy.choose(50.0) is states["exec_b"]
    # A known end that has come goes before the round robin.
    assert policy.choose(100.0) is states["exec_a"]
    assert policy.choose(100.0) is states["exec_c"]
    assert policy.choose(100.0) is None


def test_nominal_end_is_the_completion_for_completed_runs(tmp_path: Path) -> None:
    path = tmp_path / "beyond.toml"
    path.write_text(BEYOND_LINEAR, encoding="utf-8")
    plan = load_scenario(path).plan()
    assert any(p.outcome != PlannedOutcome.COMPLETED for p in plan)
    for p in plan:
        if p.outcome == PlannedOutcome.COMPLETED:
            assert bench.nominal_end_s(p) == pytest.approx(p.end_s)
        else:  # failed or cancelled: when it would have completed (never before its end)
            assert bench.nominal_end_s(p) >= p.end_s - 1e-9


def test_informed_keeps_the_budget_and_beats_backoff(small: Path) -> None:
    scenario = load_scenario(small)
    missing = sum(1 for p in scenario.plan() if not p.exists)
    informed = bench.bench_policy(scenario, "informed")
    backoff = bench.bench_policy(scenario, "backoff")
    assert (informed.undetected, informed.http_429, informed.not_found) == (0, 0, missing)
    assert informed.max_requests_in_window <= 30
    assert informed.mean_s < 0.5 * backoff.mean_s
    assert informed.p50_s < 1.0  # most runs complete, and are found as they do
    # Not a formula: a real poller pays for the failures it has to look for.
    assert informed.mean_s > bench.oracle(scenario.plan(), scenario.rate_limit).mean_s


def test_delay_is_measured_when_the_sink_confirmed(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = load_scenario(small)
    fast = bench.bench_policy(scenario, "adaptive")
    assert fast.mean_s >= fast.poll_mean_s
    assert fast.max_s >= fast.poll_max_s
    assert fast.mean_s - fast.poll_mean_s < 0.01  # the outbox costs loop iterations, not seconds

    send = bench._BenchSink.send

    async def slow(self: bench._BenchSink, record: dict[str, Any]) -> None:
        await asyncio.sleep(5.0)  # a sink that takes 5 s to confirm
        await send(self, record)

    monkeypatch.setattr(bench._BenchSink, "send", slow)
    slowed = bench.bench_policy(scenario, "adaptive")
    assert slowed.undetected == 0
    assert slowed.poll_mean_s == pytest.approx(fast.poll_mean_s)  # polling is not held up by the sink
    assert slowed.mean_s >= slowed.poll_mean_s + 5.0 - 1e-6
    assert slowed.max_s >= slowed.poll_max_s + 5.0 - 1e-6
