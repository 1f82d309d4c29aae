"""Turning `[[sinks]]` tables (or `--sink SPEC` flags) into ready-to-open sinks.

A sink type is a name in the `execmon.sinks` entry-point group (the built-ins are registered
there by execmon's own package metadata; a plugin package adds its own), or a direct
`"package.module:Class"` reference. Everything is checked at start, before any polling: an
unknown type or a bad option is a UsageError (exit 2) naming the table and the key.

Each sink has a name, the key of its rows in the outbox: the table's `name` key if given, else
its type when only one sink has that type, else `type#N` (N = its position). Keep names stable
across restarts, or pending deliveries of the old name wait for a sink that no longer exists.
"""

from __future__ import annotations

import pkgutil
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Any, cast

from monitor.config import SinkConfig, SinkEvents
from monitor.errors import UsageError
from monitor.sinks.base import Sink, SinkFactory, wants

ENTRY_POINT_GROUP = "execmon.sinks"
SPEC_KEYS = {"jsonl": "path", "webhook": "url", "command": "command"}  # `--sink KIND:VALUE`
_NAME = re.compile(r"[A-Za-z0-9_.:#@/-]{1,100}")


@dataclass(frozen=True, slots=True)
class SinkHandle:
    """A built sink plus its delivery settings and filters, as the delivery engine uses it."""

    name: str
    sink: Sink
    config: SinkConfig
    concurrency: int = 1

    def wants(self, record: Mapping[str, Any]) -> bool:
        """Does this sink receive this record (its `on` outcomes and its `events` kinds)?"""
        return wants(record, self.config.on, self.config.events)

    @property
    def wants_groups(self) -> bool:
        return SinkEvents.GROUP in self.config.events


def available_types() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def resolve_sink_class(type_name: str, where: str) -> SinkFactory:
    """The class for a sink type: an entry-point name or `package.module:Class`."""
    if ":" in type_name:
        try:
            found: object = pkgutil.resolve_name(type_name)
        except Exception as exc:  # any import-time failure of someone else's module is a usage error
            raise UsageError(f"{where}: sink type {type_name!r} cannot be imported: {exc}") from None
    else:
        candidates = list(entry_points(group=ENTRY_POINT_GROUP, name=type_name))
        if not candidates:
            known = ", ".join(available_types()) or "none"
            raise UsageError(
                f"{where}: no sink type {type_name!r} is installed (known: {known}); "
                "a plugin sink can also be given as 'package.module:Class'"
            )
        try:
            found = candidates[0].load()
        except Exception as exc:  # as above
            raise UsageError(
                f"{where}: sink type {type_name!r} ({candidates[0].value}) cannot be loaded: {exc}"
            ) from None
    if not callable(getattr(found, "from_options", None)):
        raise UsageError(f"{where}: sink type {type_name!r} has no from_options(options, common) classmethod")
    return cast(SinkFactory, found)


def build_sinks(sink_configs: Sequence[SinkConfig], *, source: str | None = None) -> list[SinkHandle]:
    """Validate and build every sink (not opened yet). `source` names the origin when a table lacks one."""
    type_counts = Counter(c.type for c in sink_configs)
    handles: list[SinkHandle] = []
    for config in sink_configs:
        origin = config.source or source or "configuration"
        where = f"{origin}: [[sinks]] #{config.index}"
        options = dict(config.options)
        name = _sink_name(options.pop("name", None), config, type_counts[config.type] > 1, where)
        if any(h.name == name for h in handles):
            raise UsageError(f"{where}: sink name {name!r} is used twice; give each sink its own 'name'")
        factory = resolve_sink_class(config.type, where)
        sink = factory.from_options(options, config)
        if not isinstance(sink, Sink):
            raise UsageError(f"{where}: sink type {config.type!r} did not build a sink (open/send/close)")
        handles.append(handle_for(sink, name, config, where))
    return handles


def handle_for(sink: Sink, name: str, config: SinkConfig, where: str) -> SinkHandle:
    """A built sink as the delivery engine uses it: named, with its own concurrency and hold time."""
    sink.name = name
    return SinkHandle(name, sink, _with_hold(config, sink, where), _concurrency(sink, where))


def _sink_name(raw: object, config: SinkConfig, shared_type: bool, where: str) -> str:
    if raw is None:
        return f"{config.type}#{config.index}" if shared_type else config.type
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise UsageError(f"{where} key 'name': expected letters, digits and _.:#@/- (1-100), found {raw!r}")
    return raw


def _concurrency(sink: Sink, where: str) -> int:
    value = getattr(sink, "concurrency", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: the sink's concurrency must be a positive integer, found {value!r}")
    return value


def _with_hold(config: SinkConfig, sink: Sink, where: str) -> SinkConfig:
    """A sink that holds records on purpose (`hold_s`) gets that much longer than `timeout_s` per attempt."""
    hold = getattr(sink, "hold_s", 0.0)
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold < float("inf"):
        raise UsageError(f"{where}: the sink's hold_s must be a number of seconds >= 0, found {hold!r}")
    return replace(config, timeout_s=config.timeout_s + hold) if hold else config


def parse_sink_spec(spec: str) -> dict[str, Any]:
    """A `--sink` flag as a `[[sinks]]` table for `load_config(overrides={"sinks": [...]})`.

    `stdout`, `jsonl:PATH`, `webhook:URL`, `command:CMD`; anything else is a sink type by itself
    (a plugin's name, or `package.module:Class`).
    """
    text = spec.strip()
    kind, sep, value = text.partition(":")
    if sep and kind in SPEC_KEYS:
        if not value.strip():
            raise UsageError(f"--sink {spec!r}: expected {kind}:{SPEC_KEYS[kind].upper()}, found nothing after ':'")
        return {"type": kind, SPEC_KEYS[kind]: value}
    if kind in SPEC_KEYS:
        raise UsageError(f"--sink {spec!r}: expected {kind}:{SPEC_KEYS[kind].upper()}")
    if not text:
        raise UsageError("--sink: expected stdout, jsonl:PATH, webhook:URL, command:CMD or a plugin type")
    return {"type": text}
