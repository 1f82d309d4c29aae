"""The [state] keys of the configuration: fault_grace_s (how long a failing store may pause work), retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import ConfigError, load_config


def test_fault_grace_defaults_to_five_minutes() -> None:
    assert load_config(None, env={}).state.fault_grace_s == 300.0


def test_fault_grace_from_file_environment_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "execmon.toml"
    path.write_text("[state]\nfault_grace_s = 60\n", encoding="utf-8")
    env = {"EXECMON_STATE_FAULT_GRACE_S": "2m"}
    assert load_config(path, env={}).state.fault_grace_s == 60.0
    assert load_config(path, env=env).state.fault_grace_s == 120.0
    assert load_config(path, env=env, overrides={"state.fault_grace_s": 5}).state.fault_grace_s == 5.0


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_fault_grace_must_be_positive(tmp_path: Path, value: str) -> None:
    path = tmp_path / "execmon.toml"
    path.write_text(f"[state]\nfault_grace_s = {value!r}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'state.fault_grace_s': expected a number of seconds > 0"):
        load_config(path, env={})


def test_retention_defaults_to_seven_days() -> None:
    assert load_config(None, env={}).state.retention == 7 * 86400.0


def test_retention_from_file_environment_and_flag_in_days_or_any_unit(tmp_path: Path) -> None:
    path = tmp_path / "execmon.toml"
    path.write_text('[state]\nretention = "3d"\n', encoding="utf-8")
    env = {"EXECMON_STATE_RETENTION": "36h"}
    assert load_config(path, env={}).state.retention == 3 * 86400.0
    assert load_config(path, env=env).state.retention == 36 * 3600.0
    assert load_config(path, env=env, overrides={"state.retention": 600}).state.retention == 600.0


@pytest.mark.parametrize("value", ["0", "-1d", "a week"])
def test_retention_must_be_a_positive_duration(tmp_path: Path, value: str) -> None:
    path = tmp_path / "execmon.toml"
    path.write_text(f"[state]\nretention = {value!r}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'state.retention': expected a number of seconds > 0"):
        load_config(path, env={})
