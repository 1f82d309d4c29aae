"""The Sink protocol: where result records go. Built-ins and plugins implement the same shape.

A sink class is found by name through the `execmon.sinks` entry-point group (or given as
`"package.module:Class"`) and built with `Class.from_options(options, common)`, which validates
its own keys and raises ConfigError (a UsageError) naming the `[[sinks]]` table and the key.
`send` either returns (the record is durably accepted) or raises DeliveryError.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from monitor.config import ConfigError, SinkConfig
from monitor.errors import ExecmonError


class DeliveryError(ExecmonError):
    """One failed attempt. `retryable=False` makes it a dead letter at once."""

    def __init__(self, reason: str, *, retryable: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@runtime_checkable
class Sink(Protocol):
    """What the delivery engine drives. One instance per `[[sinks]]` table."""

    name: str

    async def open(self) -> None:
        """Acquire resources (files, sessions); raise UsageError for a setting that cannot work."""

    async def send(self, record: dict[str, Any]) -> None:
        """Deliver one record, or raise DeliveryError. The engine bounds each call by `timeout_s`
        (plus `hold_s` for a sink that declares it: see BaseSink)."""

    async def close(self) -> None:
        """Release resources; pending work is abandoned (the outbox still holds it)."""


class SinkFactory(Protocol):
    """A sink class: how the registry builds one from its `[[sinks]]` table."""

    def from_options(self, options: dict[str, Any], common: SinkConfig) -> Sink: ...


class BaseSink:
    """Defaults for the built-ins: a name set by the registry, one worker, nothing to open or close."""

    name: str = "sink"
    concurrency: int = 1  # how many attempts the engine runs at once for this sink
    hold_s: float = 0.0  # how long send() may hold a record on purpose before sending (notify's folding)
    KEYS: ClassVar[tuple[str, ...]] = ()  # the type-specific keys this sink accepts

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @classmethod
    def check_keys(cls, options: Mapping[str, Any], common: SinkConfig) -> None:
        """Reject keys this sink does not know, naming the table and the key."""
        for key in options:
            if key not in cls.KEYS:
                known = ", ".join(cls.KEYS) or "none"
                raise ConfigError(
                    f"{common.source}: [[sinks]] #{common.index}: unknown key '{key}' for a "
                    f"{common.type} sink; its own keys: {known}"
                )


def required_str(options: Mapping[str, Any], common: SinkConfig, key: str, what: str) -> str:
    value = options.get(key)
    if not isinstance(value, str) or not value.strip():
        raise common.error(key, what, value)
    return value


def optional_str(options: Mapping[str, Any], common: SinkConfig, key: str, what: str) -> str | None:
    if key not in options:
        return None
    return required_str(options, common, key, what)


def optional_bool(options: Mapping[str, Any], common: SinkConfig, key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise common.error(key, "true or false", value)
    return value


def optional_int(options: Mapping[str, Any], common: SinkConfig, key: str, default: int, low: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise common.error(key, f"an integer >= {low}", value)
    return value


def optional_str_map(options: Mapping[str, Any], common: SinkConfig, key: str) -> dict[str, str]:
    value = options.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "\n" not in k + v and "\r" not in k + v for k, v in value.items()
    ):
        raise common.error(key, "a table of text values (no line breaks)", value)
    return dict(value)


def encode_record(record: Mapping[str, Any]) -> bytes:
    """The exact bytes a record travels as (one JSON object, no newline), in the record's key order."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_kind(record: Mapping[str, Any]) -> str:
    return str(record.get("kind", "execution"))


def outcome_of(record: Mapping[str, Any]) -> str | None:
    value = record.get("outcome")
    return str(value) if value is not None else None


def wants(record: Mapping[str, Any], on: Collection[str], events: Collection[str]) -> bool:
    """Does a sink with these filters receive this record? `on` filters execution records only."""
    kind = record_kind(record)
    if kind not in events:
        return False
    return kind != "execution" or outcome_of(record) in on
