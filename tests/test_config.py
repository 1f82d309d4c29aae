"""load_config: defaults, file, environment and flags; one clear line for every kind of mistake."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from monitor.config import (
    ENV_KEYS,
    ApiConfig,
    Config,
    ConfigError,
    ControlConfig,
    LoggingConfig,
    PolicyName,
    PollingConfig,
    SinkEvents,
    StateConfig,
    find_config_path,
    load_config,
)
from monitor.config_values import SCHEMA, SINK_KEYS
from monitor.errors import UsageError
from monitor.rates import RateLimit
from monitor.records import Outcome
from monitor.secrets import REDACTED, redact

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def _write(tmp_path: Path, text: str, name: str = "execmon.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None, env: dict[str, str] | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {}, overrides={k.replace("__", "."): v for k, v in overrides.items()})
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


# --- defaults and the example ----------------------------------------------------------------------


def test_no_file_gives_the_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.source == "<defaults>"
    assert config.sinks == []
    assert config.api.rate_limit == RateLimit(30, 60.0)
    assert config.polling.policy is PolicyName.ADAPTIVE
    assert config.control.listen == ("127.0.0.1", 8787)


def test_the_example_loads_and_documents_every_default() -> None:
    config = load_config(EXAMPLE, env={})
    defaults = Config()
    for section in ("api", "polling", "state", "control", "logging"):
        assert getattr(config, section) == getattr(defaults, section), section
    [sink] = config.sinks
    assert (sink.type, sink.index, sink.options) == ("stdout", 1, {})
    assert sink.on == tuple(Outcome)
    assert sink.events == (SinkEvents.EXECUTION,)
    assert (sink.max_age, sink.pause_after_failures, sink.max_attempts) == (86400.0, 5, None)
    assert (sink.backoff_base_s, sink.backoff_cap_s) == (1.0, 300.0)
    assert (sink.timeout_s, sink.queue_size) == (10.0, 1000)


def test_the_example_mentions_every_key_and_holds_no_secret() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), f"{section}.{key} is not documented"
    for key in SINK_KEYS:
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), f"sinks.{key} is not documented"
    assert not re.search(r"sk_(live|test)_", text)
    assert "current directory" in text  # how relative paths resolve is said


# --- precedence ------------------------------------------------------------------------------------


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[api]\nbase_url = "http://file.example:1"\nrate_limit = "10/10s"\n')
    env = {"EXECMON_BASE_URL": "http://env.example:2"}
    flag = {"api.base_url": "http://flag.example:3"}
    assert load_config(path, env={}).api.base_url == "http://file.example:1"
    assert load_config(path, env=env).api.base_url == "http://env.example:2"
    assert load_config(path, env=env, overrides=flag).api.base_url == "http://flag.example:3"
    assert load_config(path, env=env, overrides={"api.base_url": None}).api.base_url == "http://env.example:2"
    assert load_config(path, env={"EXECMON_BASE_URL": ""}).api.base_url == "http://file.example:1"
    assert load_config(path, env=env).api.rate_limit == RateLimit(10, 10.0)  # untouched keys stay


def test_every_environment_variable_sets_its_key() -> None:
    env = {
        "EXECMON_BASE_URL": "https://api.example.com/",
        "EXECMON_RATE_LIMIT": "30/3s",
        "EXECMON_POLICY": "backoff",
        "EXECMON_STATE": "/tmp/x.db",
        "EXECMON_STATE_FAULT_GRACE_S": "90s",
        "EXECMON_STATE_RETENTION": "2d",
        "EXECMON_STATE_URL": "postgresql://execmon@db.example.com/execmon",
        "EXECMON_LOG_LEVEL": "DEBUG",
        "EXECMON_CONTROL_LISTEN": "[::1]:0",
    }
    assert set(env) == set(ENV_KEYS.values())
    config = load_config(None, env=env)
    assert config.api.base_url == "https://api.example.com"
    assert config.api.rate_limit == RateLimit(30, 3.0)
    assert config.polling.policy is PolicyName.BACKOFF
    assert config.state.path == "/tmp/x.db"
    assert config.state.fault_grace_s == 90.0
    assert config.state.retention == 2 * 86400.0
    assert config.state.url == "postgresql://execmon@db.example.com/execmon"
    assert config.logging.level == "debug"
    assert config.control.listen == ("::1", 0)


def test_flags_accept_text_and_typed_values() -> None:
    config = load_config(
        None,
        env={},
        overrides={
            "api.rate_limit": RateLimit(5, 1.0),
            "polling.max_in_flight": "8",
            "polling.deadline_s": "15m",
            "api.request_timeout_s": 2.5,
            "polling.policy": PolicyName.BACKOFF,
        },
    )
    assert config.api.rate_limit == RateLimit(5, 1.0)
    assert config.polling.max_in_flight == 8
    assert config.polling.deadline_s == 900.0
    assert config.api.request_timeout_s == 2.5
    assert config.polling.policy is PolicyName.BACKOFF


def test_durations_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[polling]\ndeadline_s = "2h"\nmax_interval_s = 45\n[control]\ngrace_s = "1.5s"\n')
    config = load_config(path, env={})
    assert (config.polling.deadline_s, config.polling.max_interval_s, config.control.grace_s) == (
        7200,
        45,
        1.5,
    )


def test_relative_paths_stay_relative_to_the_current_directory(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = _write(sub, '[state]\npath = "data/state.db"\n[[sinks]]\ntype = "jsonl"\npath = "out.jsonl"\n')
    config = load_config(path, env={})
    assert config.state.path == "data/state.db"
    assert config.sinks[0].options == {"path": "out.jsonl"}


# --- mistakes --------------------------------------------------------------------------------------


def test_unknown_key_names_it_the_file_and_the_known_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, '[polling]\npolcy = "adaptive"\n')
    message = _error(path)
    assert f"unknown key 'polling.polcy' in {path}" in message
    assert "did you mean 'polling.policy'?" in message
    assert "known keys: polling.policy, polling.max_in_flight" in message


def test_unknown_section_and_unknown_flag(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, '[apii]\nbase_url = "http://x"\n'))
    assert "unknown key 'apii'" in message
    assert "did you mean 'api'?" in message
    assert "unknown key 'api.base_uri' in command line" in _error(None, api__base_uri="http://x")


@pytest.mark.parametrize(
    ("toml", "key", "expected", "found"),
    [
        ("[polling]\nmax_in_flight = 0", "polling.max_in_flight", "an integer >= 1", "0"),
        ("[polling]\nmax_in_flight = 2.5", "polling.max_in_flight", "an integer >= 1", "2.5"),
        ("[polling]\npolicy = 'fast'", "polling.policy", "one of 'adaptive', 'backoff'", "'fast'"),
        ("[api]\nrate_limit = '30 per minute'", "api.rate_limit", "a rate limit 'N/T'", "'30 per minute'"),
        ("[api]\nrate_limit = 30", "api.rate_limit", "a rate limit 'N/T'", "30"),
        ("[api]\nrequest_timeout_s = -1", "api.request_timeout_s", "a number of seconds > 0", "-1"),
        ("[api]\nrequest_timeout_s = 0", "api.request_timeout_s", "a number of seconds > 0", "0"),
        ("[api]\nrequest_timeout_s = true", "api.request_timeout_s", "a number of seconds", "True"),
        ("[api]\nretry_after_cap_s = nan", "api.retry_after_cap_s", "a number of seconds >= 0", "nan"),
        ("[api]\nbase_url = 'ftp://x'", "api.base_url", "an http:// or https:// URL", "'ftp://x'"),
        ("[api]\nbase_url = ''", "api.base_url", "a non-empty string", "''"),
        ("[api]\napi_key_env = 5", "api.api_key_env", "a non-empty string", "5"),
        ("[control]\nlisten = '8787'", "control.listen", "'HOST:PORT'", "'8787'"),
        ("[control]\nlisten = 'h:99999'", "control.listen", "'HOST:PORT'", "'h:99999'"),
        ("[logging]\nlevel = 'loud'", "logging.level", "one of 'debug'", "'loud'"),
        ("[logging]\nformat = 'xml'", "logging.format", "one of 'auto', 'json', 'console'", "'xml'"),
        ("[polling]\nbackoff_factor = 0.5", "polling.backoff_factor", "a number >= 1", "0.5"),
        ("[state]\npath = ['a']", "state.path", "a non-empty string", "['a']"),
        ("api = 3", "api", "a table [api]", "3"),
        ("sinks = 3", "sinks", "[[sinks]] tables", "3"),
    ],
)
def test_bad_values_name_file_key_expected_and_found(
    tmp_path: Path, toml: str, key: str, expected: str, found: str
) -> None:
    path = _write(tmp_path, toml + "\n")
    message = _error(path)
    assert message.startswith(f"{path}: key '{key}': expected {expected}"), message
    assert message.endswith(f"found {found}"), message


def test_cross_key_rules(tmp_path: Path) -> None:
    path = _write(tmp_path, "[polling]\ninitial_interval_s = 10\nmax_interval_s = 5\n")
    assert "key 'polling.max_interval_s': expected a value >= polling.initial_interval_s (10)" in _error(path)
    path = _write(tmp_path, "[polling]\nerror_backoff_cap_s = 0.5\n")
    assert "key 'polling.error_backoff_cap_s'" in _error(path)
    path = _write(tmp_path, '[api]\napi_key_env = "K"\napi_key_file = "k.txt"\n')
    assert "'api.api_key_env' and 'api.api_key_file': expected only one of them" in _error(path)


def test_bad_environment_value_names_the_variable() -> None:
    message = _error(None, env={"EXECMON_RATE_LIMIT": "lots"})
    assert message.startswith("environment variable EXECMON_RATE_LIMIT (key 'api.rate_limit'): expected")
    assert message.endswith("found 'lots'")
    assert "EXECMON_POLICY (key 'polling.policy')" in _error(None, env={"EXECMON_POLICY": "eager"})


def test_bad_flag_value_says_command_line() -> None:
    message = _error(None, polling__policy="eager")
    assert message.startswith("command line: key 'polling.policy': expected one of")


def test_toml_syntax_error_gives_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[api]\nbase_url = "http://x"\nrate_limit = 30/60s\n')
    message = _error(path)
    assert message.startswith(f"{path}: invalid TOML:")
    assert "line 3" in message


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert _error(missing) == f"config file {missing} not found"
    assert "is a directory" in _error(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[api]\n")
    assert "not UTF-8" in _error(binary)


def test_config_error_is_a_usage_error_and_config_is_frozen() -> None:
    assert issubclass(ConfigError, UsageError)
    config = load_config(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.api = ApiConfig()  # type: ignore[misc]
    for part in (
        config.api,
        config.polling,
        StateConfig(),
        ControlConfig(),
        LoggingConfig(),
        PollingConfig(),
    ):
        assert dataclasses.is_dataclass(part)


# --- secrets ---------------------------------------------------------------------------------------


def test_api_key_from_the_named_variable_is_a_registered_secret(tmp_path: Path) -> None:
    key = "sk_test_config_key_42"
    config = load_config(_write(tmp_path, '[api]\napi_key_env = "MY_KEY"\n'), env={"MY_KEY": key})
    assert config.api_key().reveal() == key
    assert redact(f"x {key} y") == f"x {REDACTED} y"
    assert key not in repr(config)
    assert key not in str(config)


def test_missing_api_key_says_which_variable_to_set() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}).api_key()
    assert "set the environment variable EXECMON_API_KEY" in str(info.value)


def test_api_key_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("sk_test_from_file_77\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    path = _write(tmp_path, f'[api]\napi_key_file = "{tmp_path / "key.txt"}"\n')
    assert load_config(path, env={"EXECMON_API_KEY": "ignored_key"}).api_key().reveal() == "sk_test_from_file_77"
    missing = _write(tmp_path, f'[api]\napi_key_file = "{tmp_path / "gone.txt"}"\n', "m.toml")
    with pytest.raises(ConfigError, match=r"key 'api.api_key_file': cannot read .*gone\.txt"):
        load_config(missing, env={}).api_key()
    empty = _write(tmp_path, f'[api]\napi_key_file = "{tmp_path / "empty.txt"}"\n', "e.toml")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty, env={}).api_key()


def test_control_token_from_environment_file_or_none(tmp_path: Path) -> None:
    assert load_config(None, env={}).control_token() is None
    token = load_config(None, env={"EXECMON_CONTROL_TOKEN": "ctl-token-123"}).control_token()
    assert token is not None
    assert token.reveal() == "ctl-token-123"
    (tmp_path / "tok").write_text("ctl-file-token-9\n", encoding="utf-8")
    path = _write(tmp_path, f'[control]\ntoken_file = "{tmp_path / "tok"}"\n')
    from_file = load_config(path, env={}).control_token()
    assert from_file is not None
    assert from_file.reveal() == "ctl-file-token-9"


# --- sinks -----------------------------------------------------------------------------------------

SINKS = """
[[sinks]]
type = "jsonl"
path = "results.jsonl"

[[sinks]]
type = "webhook"
url = "https://hooks.example.com/execmon"
secret_env = "EXECMON_WEBHOOK_SECRET"
on = ["failed", "cancelled", "failed"]
events = ["execution", "group"]
max_attempts = 3
max_age = "90m"
pause_after_failures = 0
timeout_s = "30s"
headers = { X-Team = "ml" }
"""


def test_sinks_keep_common_keys_typed_and_the_rest_as_options(tmp_path: Path) -> None:
    path = _write(tmp_path, SINKS)
    jsonl, webhook = load_config(path, env={}).sinks
    assert (jsonl.type, jsonl.index, jsonl.source, jsonl.options) == (
        "jsonl",
        1,
        str(path),
        {"path": "results.jsonl"},
    )
    assert jsonl.on == tuple(Outcome)
    assert webhook.index == 2
    assert webhook.on == (Outcome.FAILED, Outcome.CANCELLED)
    assert webhook.events == (SinkEvents.EXECUTION, SinkEvents.GROUP)
    assert (webhook.max_attempts, webhook.timeout_s, webhook.queue_size) == (3, 30.0, 1000)
    assert (webhook.max_age, webhook.pause_after_failures) == (5400.0, 0)
    assert webhook.options == {
        "url": "https://hooks.example.com/execmon",
        "secret_env": "EXECMON_WEBHOOK_SECRET",
        "headers": {"X-Team": "ml"},
    }
    assert webhook.where("url") == f"{path}: [[sinks]] #2 key 'url'"
    assert str(webhook.error("url", "an http(s) URL", "ftp://x")) == (
        f"{path}: [[sinks]] #2 key 'url': expected an http(s) URL, found 'ftp://x'"
    )


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ('path = "x"', "[[sinks]] #1 key 'type': expected a sink type"),
        ('type = "jsonl"\non = ["done"]', "[[sinks]] #1 key 'on': expected a list of 'completed'"),
        ('type = "jsonl"\non = "failed"', "[[sinks]] #1 key 'on': expected a list of"),
        (
            'type = "jsonl"\nevents = ["all"]',
            "[[sinks]] #1 key 'events': expected a list of 'execution', 'group'",
        ),
        ('type = "jsonl"\nmax_attempts = 0', "[[sinks]] #1 key 'max_attempts': expected an integer >= 1"),
        ('type = "jsonl"\nmax_age = "soon"', "[[sinks]] #1 key 'max_age': expected a number of seconds > 0"),
        ('type = "jsonl"\nmax_age = 0', "[[sinks]] #1 key 'max_age': expected a number of seconds > 0"),
        ('type = "jsonl"\npause_after_failures = -1', "[[sinks]] #1 key 'pause_after_failures': expected an integer"),
        (
            'type = "jsonl"\nbackoff_base_s = 5\nbackoff_cap_s = 1',
            "[[sinks]] #1 key 'backoff_cap_s': expected",
        ),
        ('type = ""', "[[sinks]] #1 key 'type': expected a non-empty string"),
    ],
)
def test_bad_sink_tables(tmp_path: Path, table: str, fragment: str) -> None:
    path = _write(tmp_path, f"[[sinks]]\n{table}\n")
    assert _error(path).startswith(f"{path}: {fragment}")


def test_sinks_from_flags_replace_the_files(tmp_path: Path) -> None:
    path = _write(tmp_path, SINKS)
    config = load_config(path, env={}, overrides={"sinks": [{"type": "stdout"}]})
    [sink] = config.sinks
    assert (sink.type, sink.source, sink.index) == ("stdout", "command line", 1)


# --- finding the file ------------------------------------------------------------------------------


def test_find_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config_path(None, env={}) is None
    assert find_config_path("given.toml", env={"EXECMON_CONFIG": "env.toml"}) == Path("given.toml")
    assert find_config_path(None, env={"EXECMON_CONFIG": "env.toml"}) == Path("env.toml")
    (tmp_path / "execmon.toml").write_text("", encoding="utf-8")
    assert find_config_path(None, env={}) == Path("execmon.toml")


@pytest.mark.parametrize("url", ["mysql://bob:hunter2@db/x", "db.example.com", "sqlite:///x.db"])
def test_a_state_url_that_is_not_postgresql_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"EXECMON_STATE_URL": url})
    assert "state.url" in str(caught.value)
    assert "PostgreSQL URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_lease_s_below_three_seconds_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 3 seconds"):
        load_config(None, env={}, overrides={"state.lease_s": "2"})
