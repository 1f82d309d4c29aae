"""The configuration: TOML file, environment and command-line flags merged into frozen dataclasses.

Precedence per key: flag (`overrides`, dotted keys such as "api.rate_limit") > environment >
file > default. Unknown keys are errors. Every bad value raises `ConfigError`, one line naming
where it came from (file, variable or flag), the key, what was expected and what was found.
Relative paths (state.path, api_key_file, sink paths) are relative to the current directory.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.config_values import (
    ALL_KEYS,
    ENV_KEYS,
    SCHEMA,
    SINK_KEYS,
    Invalid,
    Parser,
    SinkEvents,
)
from monitor.errors import UsageError
from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit
from monitor.records import Outcome
from monitor.schedule.base import DEFAULT_BACKOFF_FACTOR, DEFAULT_INITIAL_INTERVAL_S, DEFAULT_MAX_INTERVAL_S, PolicyName
from monitor.secrets import Secret

__all__ = [
    "ENV_KEYS",
    "ApiConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "LoggingConfig",
    "PolicyName",
    "PollingConfig",
    "SinkConfig",
    "SinkEvents",
    "StateConfig",
    "find_config_path",
    "load_config",
]

DEFAULTS_SOURCE = "<defaults>"
FLAG_SOURCE = "command line"
CONFIG_ENV = "EXECMON_CONFIG"
DEFAULT_CONFIG_NAME = "execmon.toml"


class ConfigError(UsageError):
    """A bad configuration file or value; the message is one line that says where and what."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str = "http://127.0.0.1:8080"
    api_key_env: str = "EXECMON_API_KEY"
    api_key_file: str | None = None
    rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT  # None: no limit ("none")
    request_timeout_s: float = 10.0
    max_connections: int = 10
    retry_after_cap_s: float = 300.0


@dataclass(frozen=True, slots=True)
class PollingConfig:
    policy: PolicyName = PolicyName.ADAPTIVE
    max_in_flight: int = 4
    initial_interval_s: float = DEFAULT_INITIAL_INTERVAL_S
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR
    max_interval_s: float = DEFAULT_MAX_INTERVAL_S
    error_backoff_base_s: float = 1.0
    error_backoff_cap_s: float = 60.0
    not_found_confirmations: int = 3
    not_found_min_span_s: float = 5.0
    deadline_s: float = 0.0  # 0 = no deadline
    stall_after: float | None = None  # seconds without a change that make a stall; None: "auto"


@dataclass(frozen=True, slots=True)
class StateConfig:
    path: str = "execmon.db"
    fault_grace_s: float = 300.0  # how long a failing store (disk full, I/O, busy) may pause work
    retention: float = 7 * 86400.0  # seconds an ended, delivered execution is kept before it is pruned
    url: str | None = None  # postgresql://...: the state lives in PostgreSQL (replicas), `path` is unused
    lease_s: float = 30.0  # PostgreSQL: a replica that stops renewing loses its executions after this


@dataclass(frozen=True, slots=True)
class ControlConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8787)  # port 0 picks a free port
    token_env: str = "EXECMON_CONTROL_TOKEN"  # noqa: S105 - the name of a variable, not a token
    token_file: str | None = None
    max_body_bytes: int = 1048576
    grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"  # one of monitor.logs.LEVELS
    format: str = "auto"  # auto | json | console


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """One `[[sinks]]` table: common keys typed, the rest in `options` for the sink to validate."""

    type: str
    index: int  # 1-based position among the [[sinks]] tables, for messages
    source: str  # the file (or "command line") it came from
    on: tuple[Outcome, ...] = tuple(Outcome)
    events: tuple[SinkEvents, ...] = (SinkEvents.EXECUTION,)
    max_attempts: int | None = None  # an optional cap on attempts; None: until max_age
    max_age: float = 86400.0  # seconds after entering the outbox before a failing result is dead
    pause_after_failures: int = 5  # consecutive failed attempts that pause the whole sink (0: never)
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    timeout_s: float = 10.0
    queue_size: int = 1000
    options: dict[str, Any] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """E.g. "c.toml: [[sinks]] #2 key 'url'"."""
        return f"{self.source}: [[sinks]] #{self.index} key '{key}'"

    def error(self, key: str, expected: str, found: object) -> ConfigError:
        """A ConfigError about one of this sink's keys, for the sink registry to raise."""
        return ConfigError(f"{self.where(key)}: expected {expected}, found {_show(found)}")


@dataclass(frozen=True, slots=True)
class Config:
    api: ApiConfig = ApiConfig()
    polling: PollingConfig = PollingConfig()
    state: StateConfig = StateConfig()
    control: ControlConfig = ControlConfig()
    logging: LoggingConfig = LoggingConfig()
    sinks: list[SinkConfig] = field(default_factory=list)
    source: str = DEFAULTS_SOURCE
    # Read from the environment at load time and wrapped at once, so that logs redact them.
    env_api_key: Secret | None = field(default=None, repr=False, compare=False)
    env_control_token: Secret | None = field(default=None, repr=False, compare=False)

    def api_key(self) -> Secret:
        """The API key from api.api_key_file if set, else from the variable named by api.api_key_env."""
        if self.api.api_key_file is not None:
            return _read_secret_file(self.api.api_key_file, "api.api_key_file", self.source)
        if self.env_api_key is None:
            raise ConfigError(
                f"no API key: set the environment variable {self.api.api_key_env} "
                f"(named by api.api_key_env) or api.api_key_file in the config file"
            )
        return self.env_api_key

    def control_token(self) -> Secret | None:
        """The control API's bearer token (control.token_file, else control.token_env), or None."""
        if self.control.token_file is not None:
            return _read_secret_file(self.control.token_file, "control.token_file", self.source)
        return self.env_control_token


# --- loading -------------------------------------------------------------------------------------


_URL_PASSWORD = re.compile(r"(?<=://)([^/@:]*):[^/@]*@")


def _show(value: Any) -> str:
    """What was found, for an error; a password in a URL is masked (a state.url may carry one)."""
    shown = repr(_URL_PASSWORD.sub(r"\1:***@", value) if isinstance(value, str) else value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _parse(parser: Parser, value: Any, where: str) -> Any:
    try:
        return parser(value)
    except Invalid as exc:
        raise ConfigError(f"{where}: expected {exc}, found {_show(value)}") from None


def _unknown(key: str, where: str, known: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"unknown key '{key}' in {where}{hint}; known keys: {', '.join(known)}")


def find_config_path(explicit: str | Path | None, *, env: Mapping[str, str] = os.environ) -> Path | None:
    """The file a command reads: the flag, else $EXECMON_CONFIG, else ./execmon.toml if it exists."""
    if explicit is not None:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.is_file() else None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _read_secret_file(path: str, key: str, source: str) -> Secret:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{source}: key '{key}': cannot read {path!r}: {reason}") from None
    if not value:
        raise ConfigError(f"{source}: key '{key}': the file {path!r} is empty")
    return Secret(value)


def _section(name: str, table: Any, source: str, env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """One section's explicitly given values (flag > environment > file); defaults fill the rest."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: key '{name}': expected a table [{name}], found {_show(table)}")
    for key in table:
        if key not in SCHEMA[name]:
            raise _unknown(f"{name}.{key}", source, [f"{name}.{k}" for k in SCHEMA[name]])
    values: dict[str, Any] = {}
    for key, parser in SCHEMA[name].items():
        dotted = f"{name}.{key}"
        variable = ENV_KEYS.get(dotted)
        if flags.get(dotted) is not None:
            values[key] = _parse(parser, flags[dotted], f"{FLAG_SOURCE}: key '{dotted}'")
        elif variable and env.get(variable):
            values[key] = _parse(parser, env[variable], f"environment variable {variable} (key '{dotted}')")
        elif key in table:
            values[key] = _parse(parser, table[key], f"{source}: key '{dotted}'")
    return values


def _check_pairs(sections: dict[str, dict[str, Any]], source: str) -> None:
    """Cross-key rules: one key source at a time; maxima not below their minima."""
    for section, by_env, by_file in (
        ("api", "api_key_env", "api_key_file"),
        ("control", "token_env", "token_file"),
    ):
        if by_env in sections[section] and sections[section].get(by_file) is not None:
            raise ConfigError(
                f"{source}: keys '{section}.{by_env}' and '{section}.{by_file}': expected only one of them, found both"
            )
    polling = PollingConfig(**sections["polling"])
    for low, high in (
        ("initial_interval_s", "max_interval_s"),
        ("error_backoff_base_s", "error_backoff_cap_s"),
    ):
        if getattr(polling, high) < getattr(polling, low):
            raise ConfigError(
                f"{source}: key 'polling.{high}': expected a value >= polling.{low} "
                f"({getattr(polling, low):g}), found {getattr(polling, high):g}"
            )


def _parse_sink(index: int, table: Any, source: str) -> SinkConfig:
    where = f"{source}: [[sinks]] #{index}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, found {_show(table)}")
    if "type" not in table:
        raise ConfigError(f"{where} key 'type': expected a sink type such as 'jsonl', found nothing")
    common = {k: _parse(SINK_KEYS[k], v, f"{where} key '{k}'") for k, v in table.items() if k in SINK_KEYS}
    options = {k: v for k, v in table.items() if k not in SINK_KEYS}
    sink = SinkConfig(index=index, source=source, options=options, **common)
    if sink.backoff_cap_s < sink.backoff_base_s:
        raise sink.error("backoff_cap_s", f"a value >= backoff_base_s ({sink.backoff_base_s:g})", sink.backoff_cap_s)
    return sink


def _parse_sinks(value: Any, source: str) -> list[SinkConfig]:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: key 'sinks': expected [[sinks]] tables, found {_show(value)}")
    return [_parse_sink(i, table, source) for i, table in enumerate(value, start=1)]


def _env_secret(env: Mapping[str, str], name: str) -> Secret | None:
    value = env.get(name, "").strip()
    return Secret(value) if value else None


def load_config(
    path: str | Path | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the file (None: defaults only), apply the environment and flags, validate everything.

    `overrides`: dotted keys from command-line flags ({"api.base_url": ...}; None means "not
    given"), and optionally "sinks": a list of sink tables that replaces the file's.
    """
    flags = dict(overrides or {})
    source = DEFAULTS_SOURCE if path is None else str(path)
    data = {} if path is None else _read_file(Path(path))
    for key in data:
        if key not in (*SCHEMA, "sinks"):
            raise _unknown(key, source, [*SCHEMA, "sinks"])
    for key in flags:
        if key not in (*ALL_KEYS, "sinks"):
            raise _unknown(key, FLAG_SOURCE, ALL_KEYS)
    sections = {name: _section(name, data.get(name, {}), source, env, flags) for name in SCHEMA}
    _check_pairs(sections, source)
    if flags.get("sinks") is not None:
        sinks = _parse_sinks(flags["sinks"], FLAG_SOURCE)
    else:
        sinks = _parse_sinks(data.get("sinks", []), source)
    api = ApiConfig(**sections["api"])
    control = ControlConfig(**sections["control"])
    return Config(
        api=api,
        polling=PollingConfig(**sections["polling"]),
        state=StateConfig(**sections["state"]),
        control=control,
        logging=LoggingConfig(**sections["logging"]),
        sinks=sinks,
        source=source,
        env_api_key=_env_secret(env, api.api_key_env),
        env_control_token=_env_secret(env, control.token_env),
    )
