"""`execmon watch` on the command line: a bad flag value is named by its flag (not by the config
key it overrides), and an invalid ID among valid ones makes the exit status 1."""

from __future__ import annotations

import argparse
import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import API_KEY, RATE, Sim, assert_delivered_once, clean_env, execmon, sim_args, watch

from monitor.cli import main
from monitor.commands import watch as watch_command

BAD_FLAGS = [
    ("--rate-limit", "nonsense", "api.rate_limit"),
    ("--rate-limit", "0/3s", "api.rate_limit"),
    ("--base-url", "not-a-url", "api.base_url"),
    ("--base-url", "ftp://example.com", "api.base_url"),
    ("--policy", "fastest", "polling.policy"),
    ("--log-level", "loud", "logging.level"),
    ("--timeout", "soon", None),
]


@pytest.mark.parametrize(("flag", "value", "key"), BAD_FLAGS)
def test_a_bad_flag_value_is_one_line_naming_the_flag(
    flag: str, value: str, key: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXECMON_API_KEY", API_KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO("exec_abc123\n"))
    code = main(["watch", flag, value, "-"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"execmon watch: {flag}: "), err
    assert repr(value) in err  # what was found
    if key is not None:
        assert key not in err  # the user typed a flag, not a config key


def test_good_flag_values_still_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXECMON_RATE_LIMIT", raising=False)
    monkeypatch.delenv("EXECMON_POLICY", raising=False)
    parser = argparse.ArgumentParser()
    watch_command.add_arguments(parser)
    args = parser.parse_args(["--rate-limit", "5/2s", "--policy", "backoff", "x"])
    config = watch_command._load(args)
    assert str(config.api.rate_limit) == "5/2s"
    assert config.polling.policy.value == "backoff"


def test_the_issue_command_exits_2_with_one_line_naming_rate_limit() -> None:
    done = subprocess.run(
        execmon("watch", "--rate-limit", "nonsense", "x"),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=clean_env({"EXECMON_API_KEY": API_KEY}),
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--rate-limit" in done.stderr
    assert "api.rate_limit" not in done.stderr


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


@pytest.mark.slow
def test_an_invalid_id_among_valid_ones_makes_the_exit_status_1(sim: Sim, tmp_path: Path) -> None:
    good = sim.create(2, duration_s=1, outcome="completed")
    invalid = "exec_bad/id"
    result = watch([*sim_args(sim), "-"], tmp=tmp_path, ids=[good[0], invalid, good[1]], timeout_s=30)
    assert result.rc == 1, result  # every valid one completed, but not every ID given was watched
    assert_delivered_once(sim, result.records(), good)
    assert invalid in result.stderr, result
