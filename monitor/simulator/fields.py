"""Strict, typed reads from one decoded TOML table, for scenario files: each failure names the file and the
dotted key, and unknown keys are errors (as in the config file)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from monitor.errors import UsageError


class ScenarioError(UsageError):
    """A scenario file that cannot be used; the message names the file and the key."""


def shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class Fields:
    """Typed reads from one TOML table, each failure naming `source` and the dotted key."""

    def __init__(self, data: Mapping[str, Any], source: str, where: str) -> None:
        self.data = data
        self.source = source
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, expected: str) -> ScenarioError:
        found = shown(self.data[name]) if name in self.data else "nothing"
        return ScenarioError(f"{self.source}: {self.key(name)}: expected {expected}, found {found}")

    def only(self, *allowed: str) -> None:
        for name in self.data:
            if name not in allowed:
                raise ScenarioError(f"{self.source}: {self.key(name)}: unknown key (allowed: {', '.join(allowed)})")

    def string(self, name: str, *, default: str) -> str:
        value = self.data.get(name, default)
        if not isinstance(value, str):
            raise self.fail(name, "a string")
        return value

    def integer(self, name: str, *, default: int | None = None, minimum: int | None = None) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self.fail(name, "an integer" + ("" if minimum is None else f" >= {minimum}"))
        return value

    def number(
        self,
        name: str,
        *,
        default: float | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive: bool = False,
    ) -> float:
        value = self.optional_number(name, minimum=minimum, maximum=maximum, exclusive=exclusive)
        if value is None:
            if default is None:
                raise self.fail(name, "a number")
            return default
        return value

    def optional_number(
        self,
        name: str,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive: bool = False,
    ) -> float | None:
        if name not in self.data:
            return None
        value = self.data[name]
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and minimum is not None:
            ok = value > minimum if exclusive else value >= minimum
        if ok and maximum is not None:
            ok = value <= maximum
        if not ok:
            bounds = "" if minimum is None else (f" > {minimum:g}" if exclusive else f" >= {minimum:g}")
            bounds += "" if maximum is None else f" and <= {maximum:g}"
            raise self.fail(name, f"a number{bounds}")
        return float(value)

    def choice(self, name: str, kinds: type[StrEnum], *, default: str | None = None) -> str:
        value = self.data.get(name, default)
        allowed = [k.value for k in kinds]
        if value not in allowed:
            raise self.fail(name, "one of " + ", ".join(repr(a) for a in allowed))
        return str(value)

    def table(self, name: str, *, default: Mapping[str, Any] | None = None) -> Fields:
        value = self.data.get(name, default)
        if not isinstance(value, Mapping):
            raise self.fail(name, "a table, e.g. " + name + " = { ... }")
        return Fields(value, self.source, self.key(name))

    def optional_table(self, name: str) -> Fields | None:
        return self.table(name) if name in self.data else None
