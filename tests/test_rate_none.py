"""An unlimited budget: `rate_limit = "none"` in the config, `--rate-limit none`, `rate_limit="none"`."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from monitor import Monitor, Outcome
from monitor.config import ConfigError, load_config
from monitor.rates import RateLimit, format_rate_limit, parse_rate_limit, parse_rate_limit_or_none
from monitor.schedule.adaptive import AdaptivePolicy
from monitor.simulator.server import SimulatorSettings, simulator_of, start_simulator
from monitor.watch_view import LiveView, WatchStats

KEY = "sk_test_unlimited"


@pytest.mark.parametrize("text", ["none", "None", " NONE "])
def test_none_parses_as_no_limit(text: str) -> None:
    assert parse_rate_limit_or_none(text) is None


def test_a_rate_still_parses_and_garbage_is_still_refused() -> None:
    assert parse_rate_limit_or_none("30/60s") == RateLimit(30, 60.0)
    with pytest.raises(ValueError, match="N/T"):
        parse_rate_limit_or_none("unlimited")
    with pytest.raises(ValueError, match="N/T"):
        parse_rate_limit("none")  # the strict parser (the simulator's scenarios) has no "none"


def test_format_names_no_limit() -> None:
    assert format_rate_limit(None) == "none"
    assert format_rate_limit(RateLimit(30, 60.0)) == "30/60s"


def test_config_file_env_and_flag_accept_none(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[api]\nrate_limit = "none"\n', encoding="utf-8")
    assert load_config(path, env={}).api.rate_limit is None
    assert load_config(None, env={"EXECMON_RATE_LIMIT": "none"}).api.rate_limit is None
    assert load_config(None, env={}, overrides={"api.rate_limit": "none"}).api.rate_limit is None
    flagged = load_config(path, env={}, overrides={"api.rate_limit": "10/1s"})
    assert flagged.api.rate_limit == RateLimit(10, 1.0)  # a flag still wins over the file


def test_a_bad_rate_limit_names_none_as_an_option(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[api]\nrate_limit = "lots"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="or 'none'"):
        load_config(path, env={})


def test_adaptive_floor_is_the_shortest_gap_with_no_limit() -> None:
    policy = AdaptivePolicy()
    policy.bind_rate(lambda: math.inf)
    assert policy.floor_interval(0.0) == policy.min_gap_s


def test_the_live_view_says_there_is_no_limit() -> None:
    stats = WatchStats(total=2, rate=None, requests=40, budget_used=3)
    stats.progress.update({"exec_a": 10})
    view = LiveView(stats)
    out = io.StringIO()
    view.console = Console(file=out, width=120, height=20, force_terminal=False)
    view.console.print(view._render())
    assert "| budget no limit | requests 40" in out.getvalue()


async def test_a_monitor_with_no_limit_polls_an_unlimited_simulator(tmp_path: Path) -> None:
    runner, url = await start_simulator(SimulatorSettings(api_keys=[KEY], rate_limit=None))
    try:
        simulator = simulator_of(runner)
        ids = simulator.create(count=20, duration_s=1.0, outcome="completed")
        state = tmp_path / "state.db"
        async with Monitor(base_url=url, api_key=KEY, rate_limit="none", policy="backoff", state=state) as mon:
            assert mon.config.api.rate_limit is None
            await mon.track(ids)
            done = await mon.wait(ids, timeout=30)
            stats = mon.budget.stats()
            assert stats.limit is None
            assert stats.free is None
            assert mon.budget.requests == simulator.stats()["requests_total"]
        # Paced at the default 30 per 60 s, the first 20 polls alone would take 40 s: past the timeout.
        assert {r.outcome for r in done.values()} == {Outcome.COMPLETED}
        assert simulator.stats()["requests_total"] >= 2 * len(ids)  # each seen running, then ended
        assert simulator.stats()["responses"]["429"] == 0
    finally:
        await runner.cleanup()
