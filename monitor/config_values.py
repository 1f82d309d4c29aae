"""Value parsers and the key schema of the configuration (loaded by `monitor.config`).

Each parser returns the typed value or raises `Invalid("what was expected")`; the loader adds
where the value came from and what was found. Strings are accepted for numbers, because the
environment and flags only carry text ("90s", "15m" for seconds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from monitor.api.client import check_base_url
from monitor.errors import UsageError
from monitor.logs import FORMATS, LEVELS
from monitor.rates import RateLimit, parse_duration, parse_rate_limit, parse_rate_limit_or_none
from monitor.records import Outcome
from monitor.schedule.base import PolicyName

# Environment variables that set a key (below flags, above the file).
ENV_KEYS = {
    "api.base_url": "EXECMON_BASE_URL",
    "api.rate_limit": "EXECMON_RATE_LIMIT",
    "polling.policy": "EXECMON_POLICY",
    "state.path": "EXECMON_STATE",
    "state.fault_grace_s": "EXECMON_STATE_FAULT_GRACE_S",
    "state.retention": "EXECMON_STATE_RETENTION",
    "state.url": "EXECMON_STATE_URL",
    "logging.level": "EXECMON_LOG_LEVEL",
    "control.listen": "EXECMON_CONTROL_LISTEN",
}


class SinkEvents(StrEnum):
    """Which kinds of records a sink receives."""

    EXECUTION = "execution"  # one record per terminal execution
    GROUP = "group"  # one digest per group once all its members are terminal
    STALLED = "stalled"  # a running execution whose progress stood still for polling.stall_after
    RESUMED = "resumed"  # a stalled execution that moved again


class Invalid(Exception):
    """A parser's complaint: what was expected."""


Parser = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value


def _state_url(value: Any) -> str | None:
    """A PostgreSQL URL; what was found is never echoed, since a URL may carry a password."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        raise Invalid("a PostgreSQL URL (postgresql://user@host/db; keep the password in ~/.pgpass or PGPASSFILE)")
    return value


def _lease(value: Any) -> float:
    seconds = float(_seconds(positive=True)(value))
    if seconds < 3:
        raise Invalid("at least 3 seconds (replicas renew their leases every lease_s / 3)")
    return seconds


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _choice(choices: tuple[str, ...], convert: Callable[[str], Any] = str) -> Parser:
    def parse(value: Any) -> Any:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise Invalid("one of " + ", ".join(repr(str(c)) for c in choices))
        return convert(value.strip().lower())

    return parse


def _number(value: Any) -> float:
    """A finite number; strings (from the environment or flags) may carry a unit: '90s', '15m'."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    number = parse_duration(value) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


def _seconds(*, positive: bool = False) -> Parser:
    expected = f"a number of seconds {'> 0' if positive else '>= 0'} (or a duration such as '90s', '15m')"

    def parse(value: Any) -> float:
        try:
            seconds = _number(value)
        except (TypeError, ValueError):
            raise Invalid(expected) from None
        if seconds < 0 or (positive and seconds == 0):
            raise Invalid(expected)
        return seconds

    return parse


def _stall_after(value: Any) -> float | None:
    """`auto` (None: learned per kind) or a duration; below 10 min only when given explicitly."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return float(_seconds(positive=True)(value))
    except Invalid:
        raise Invalid("'auto' or a duration > 0 such as '30m' or 1800") from None


def _factor(value: Any) -> float:
    try:
        number = _number(value)
    except (TypeError, ValueError):
        number = 0.0
    if number < 1:
        raise Invalid("a number >= 1")
    return number


def _integer(minimum: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)  # from the environment or a flag
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise Invalid(f"an integer >= {minimum}")
        return value

    return parse


def _rate(value: Any) -> RateLimit | None:
    """A RateLimit, or None for "none": no limit (the budget hands out requests at once)."""
    if isinstance(value, RateLimit):
        return value
    try:
        return parse_rate_limit_or_none(value) if isinstance(value, str) else parse_rate_limit("")
    except ValueError:
        raise Invalid("a rate limit 'N/T' with N >= 1 and T > 0, such as '30/60s', or 'none'") from None


def _base_url(value: Any) -> str:
    text = _text(value)
    try:
        check_base_url(text)
    except UsageError:
        raise Invalid("an http:// or https:// URL with a host, e.g. 'http://127.0.0.1:8080'") from None
    return text.rstrip("/")


def _listen(value: Any) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:8787') into (host, port)."""
    host, sep, port = value.strip().rpartition(":") if isinstance(value, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise Invalid("'HOST:PORT' such as '127.0.0.1:8787' (IPv6: '[::1]:8787')")
    return host, int(port)


def _names(value: Any, allowed: tuple[str, ...]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed for v in value):
        raise Invalid("a list of " + ", ".join(repr(str(a)) for a in allowed))
    return list(dict.fromkeys(value))  # duplicates dropped, order kept


def _outcomes(value: Any) -> tuple[Outcome, ...]:
    return tuple(Outcome(v) for v in _names(value, tuple(Outcome)))


def _events(value: Any) -> tuple[SinkEvents, ...]:
    return tuple(SinkEvents(v) for v in _names(value, tuple(SinkEvents)))


SCHEMA: dict[str, dict[str, Parser]] = {
    "api": {
        "base_url": _base_url,
        "api_key_env": _text,
        "api_key_file": _optional_text,
        "rate_limit": _rate,
        "request_timeout_s": _seconds(positive=True),
        "max_connections": _integer(1),
        "retry_after_cap_s": _seconds(),
    },
    "polling": {
        "policy": _choice(tuple(PolicyName), PolicyName),
        "max_in_flight": _integer(1),
        "initial_interval_s": _seconds(positive=True),
        "backoff_factor": _factor,
        "max_interval_s": _seconds(positive=True),
        "error_backoff_base_s": _seconds(positive=True),
        "error_backoff_cap_s": _seconds(positive=True),
        "not_found_confirmations": _integer(1),
        "not_found_min_span_s": _seconds(),
        "deadline_s": _seconds(),
        "stall_after": _stall_after,
    },
    "state": {
        "path": _text,
        "fault_grace_s": _seconds(positive=True),
        "retention": _seconds(positive=True),
        "url": _state_url,
        "lease_s": _lease,
    },
    "control": {
        "listen": _listen,
        "token_env": _text,
        "token_file": _optional_text,
        "max_body_bytes": _integer(1),
        "grace_s": _seconds(),
    },
    "logging": {"level": _choice(LEVELS), "format": _choice(FORMATS)},
}
SINK_KEYS: dict[str, Parser] = {
    "type": _text,
    "on": _outcomes,
    "events": _events,
    "max_attempts": _integer(1),  # optional extra cap; max_age is the horizon
    "max_age": _seconds(positive=True),
    "pause_after_failures": _integer(0),
    "backoff_base_s": _seconds(positive=True),
    "backoff_cap_s": _seconds(positive=True),
    "timeout_s": _seconds(positive=True),
    "queue_size": _integer(1),
}
ALL_KEYS = [f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys]
