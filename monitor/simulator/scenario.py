"""Scenario files (TOML): which executions the simulator creates, when, how long they run, how they end.

A scenario is a list of groups; `Scenario.plan()` turns it into one `PlannedExecution` per execution.
Every random choice for execution number i comes from its own `random.Random` seeded from
(name, seed, i), so the plan depends only on the file, never on the order in which anything is asked.
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from monitor.errors import UsageError
from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit, parse_rate_limit


class PlannedOutcome(StrEnum):
    """How a simulated execution ends."""

    COMPLETED = "completed"  # progress reaches 100, a result
    FAILED = "failed"  # ends early with an error body
    CANCELLED = "cancelled"  # ends early with a cancelled body


class ProgressKind(StrEnum):
    """How a running execution reports progress."""

    LINEAR = "linear"  # proportional to elapsed time, plus gaussian noise
    NONE = "none"  # 0 until the end
    STEPS = "steps"  # a few uneven jumps, as a job that reports at checkpoints


class DurationDist(StrEnum):
    """Distributions of nominal durations."""

    LOGNORMAL = "lognormal"  # median_s, sigma
    UNIFORM = "uniform"  # min_s, max_s
    FIXED = "fixed"  # s


class ScenarioError(UsageError):
    """A scenario file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ProgressModel:
    model: str  # a ProgressKind value
    noise: float = 0.0  # standard deviation, in percentage points, of the noise on each answer


@dataclass(frozen=True)
class Duration:
    dist: str  # a DurationDist value
    median_s: float = 0.0
    sigma: float = 0.0
    s: float = 0.0
    min_s: float | None = None
    max_s: float | None = None

    def sample(self, rng: random.Random) -> float:
        if self.dist == DurationDist.LOGNORMAL:
            value = self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        elif self.dist == DurationDist.UNIFORM:
            value = rng.uniform(self.min_s or 0.0, self.max_s or 0.0)
        else:
            value = self.s
        if self.min_s is not None:
            value = max(value, self.min_s)
        if self.max_s is not None:
            value = min(value, self.max_s)
        return value


@dataclass(frozen=True)
class Group:
    count: int
    arrival_from_s: float
    arrival_to_s: float
    duration: Duration
    outcomes: tuple[tuple[str, float], ...]  # (PlannedOutcome value, weight)
    progress: ProgressModel
    not_found: float = 0.0


DEFAULT_OUTCOMES: tuple[tuple[str, float], ...] = (
    (PlannedOutcome.COMPLETED, 0.93),
    (PlannedOutcome.FAILED, 0.05),
    (PlannedOutcome.CANCELLED, 0.02),
)
DEFAULT_PROGRESS = ProgressModel(ProgressKind.LINEAR, 1.5)
# `execmon simulate --executions N`: short executions so that a demo shows results within minutes.
DEFAULT_DURATION = Duration(DurationDist.LOGNORMAL, median_s=60.0, sigma=0.5, min_s=5.0, max_s=600.0)


@dataclass(frozen=True)
class PlannedExecution:
    execution_id: str
    arrival_s: float  # seconds after the start of the scenario when it is created and handed over
    duration_s: float  # nominal duration
    outcome: str  # a PlannedOutcome value
    end_s: float  # seconds after creation when it ends (== duration_s for completed)
    progress: ProgressModel
    exists: bool = True  # False: an ID handed to the monitor that never existed (not_found)
    seed: int = 0  # seeds this execution's progress steps and noise


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: int
    rate_limit: RateLimit
    groups: tuple[Group, ...]

    def plan(self) -> list[PlannedExecution]:
        """Every execution of every group, sorted by arrival time; the same list on every call."""
        planned: list[PlannedExecution] = []
        taken: set[str] = set()
        index = 0
        for group in self.groups:
            for _ in range(group.count):
                planned.append(plan_one(f"{self.name}:{self.seed}", index, group, taken))
                index += 1
        return sorted(planned, key=lambda p: p.arrival_s)  # stable: ties keep the index order


def plan_one(seed: str, index: int, group: Group, taken: set[str]) -> PlannedExecution:
    """Execution number `index` of a scenario; `taken` keeps IDs unique across the plan.

    `seed` is the scenario's name and seed: two scenarios in one simulator get different IDs.
    """
    rng = random.Random(f"execmon-scenario:{seed}:{index}")
    # Draw everything in a fixed order, whatever the branches, so one field never shifts another.
    execution_id = unique_id(rng, taken)
    arrival_s = rng.uniform(group.arrival_from_s, group.arrival_to_s)
    duration_s = group.duration.sample(rng)
    outcome = pick_outcome(rng, group.outcomes)
    end_fraction = rng.random()
    exists = rng.random() >= group.not_found
    exec_seed = rng.getrandbits(63)
    end_s = duration_s if outcome == PlannedOutcome.COMPLETED else duration_s * end_fraction
    return PlannedExecution(
        execution_id=execution_id,
        arrival_s=arrival_s,
        duration_s=duration_s,
        outcome=outcome,
        end_s=end_s,
        progress=group.progress,
        exists=exists,
        seed=exec_seed,
    )


def unique_id(rng: random.Random, taken: set[str]) -> str:
    """An ID in the vendor's style (`exec_` + 12 hex digits) that is not in `taken` (which it joins)."""
    while True:
        candidate = f"exec_{rng.getrandbits(48):012x}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate


def pick_outcome(rng: random.Random, outcomes: tuple[tuple[str, float], ...]) -> str:
    total = sum(weight for _, weight in outcomes)
    point = rng.random() * total
    for outcome, weight in outcomes:
        point -= weight
        if point < 0:
            return outcome
    return outcomes[-1][0]


def default_scenario(count: int, seed: int) -> Scenario:
    """What `execmon simulate --executions N` creates: N executions at once with the default mix."""
    group = Group(count, 0.0, 0.0, DEFAULT_DURATION, DEFAULT_OUTCOMES, DEFAULT_PROGRESS)
    return Scenario("default", seed, DEFAULT_RATE_LIMIT, (group,))


# ---------------------------------------------------------------------------------------------
# Parsing: strict, like the config file. Unknown keys are errors; each message names file and key.


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises ScenarioError (a UsageError) with a one-line message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ScenarioError(f"cannot read scenario file {path}: {reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, str(path))


def parse_scenario(data: dict[str, Any], source: str) -> Scenario:
    """Validate an already decoded scenario. `source` names it in messages (usually the file path)."""
    fields = _Fields(data, source, "")
    fields.only("name", "seed", "rate_limit", "groups")
    name = fields.string("name", default=Path(source).stem)
    seed = fields.integer("seed", default=0)
    rate_text = fields.string("rate_limit", default=str(DEFAULT_RATE_LIMIT))
    try:
        rate_limit = parse_rate_limit(rate_text)
    except ValueError as exc:
        raise ScenarioError(f"{source}: rate_limit: {exc}") from None
    raw_groups = data.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        found = _shown(raw_groups)
        raise ScenarioError(f"{source}: groups: expected at least one [[groups]] table, found {found}")
    groups = tuple(_parse_group(item, source, f"groups[{i}]") for i, item in enumerate(raw_groups))
    return Scenario(name=name, seed=seed, rate_limit=rate_limit, groups=groups)


def _parse_group(item: object, source: str, where: str) -> Group:
    if not isinstance(item, dict):
        raise ScenarioError(f"{source}: {where}: expected a table, found {_shown(item)}")
    fields = _Fields(item, source, where)
    fields.only("count", "arrival", "duration", "outcomes", "progress", "not_found")
    count = fields.integer("count", minimum=0)
    arrival = fields.table("arrival", default={"from_s": 0, "to_s": 0})
    arrival.only("from_s", "to_s")
    from_s = arrival.number("from_s", default=0.0, minimum=0.0)
    to_s = arrival.number("to_s", default=from_s, minimum=from_s)
    duration = _parse_duration(fields.table("duration"))
    outcomes = _parse_outcomes(fields.table("outcomes", default=dict(DEFAULT_OUTCOMES)))
    progress_fields = fields.table("progress", default={"model": DEFAULT_PROGRESS.model})
    progress_fields.only("model", "noise")
    model = progress_fields.choice("model", ProgressKind)
    noise = progress_fields.number("noise", default=0.0, minimum=0.0)
    not_found = fields.number("not_found", default=0.0, minimum=0.0, maximum=1.0)
    return Group(count, from_s, to_s, duration, outcomes, ProgressModel(model, noise), not_found)


def _parse_duration(fields: _Fields) -> Duration:
    fields.only("dist", "median_s", "sigma", "min_s", "max_s", "s")
    dist = fields.choice("dist", DurationDist)
    min_s = fields.optional_number("min_s", minimum=0.0)
    max_s = fields.optional_number("max_s", minimum=min_s or 0.0)
    if dist == DurationDist.LOGNORMAL:
        median_s = fields.number("median_s", minimum=0.0, exclusive=True)
        sigma = fields.number("sigma", default=0.0, minimum=0.0)
        return Duration(dist, median_s=median_s, sigma=sigma, min_s=min_s, max_s=max_s)
    if dist == DurationDist.UNIFORM:
        if min_s is None or max_s is None:
            raise ScenarioError(f"{fields.source}: {fields.key('min_s')}: uniform needs both min_s and max_s")
        return Duration(dist, min_s=min_s, max_s=max_s)
    s = fields.number("s", minimum=0.0, exclusive=True)
    return Duration(dist, s=s, min_s=min_s, max_s=max_s)


def _parse_outcomes(fields: _Fields) -> tuple[tuple[str, float], ...]:
    fields.only(*PlannedOutcome)
    pairs = tuple((o.value, fields.number(o.value, default=0.0, minimum=0.0)) for o in PlannedOutcome)
    if sum(weight for _, weight in pairs) <= 0:
        raise ScenarioError(f"{fields.source}: {fields.where}: the outcome weights must not all be 0")
    return tuple(pair for pair in pairs if pair[1] > 0)


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class _Fields:
    """Typed reads from one TOML table, each failure naming `source` and the dotted key."""

    def __init__(self, data: Mapping[str, Any], source: str, where: str) -> None:
        self.data = data
        self.source = source
        self.where = where

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, expected: str) -> ScenarioError:
        found = _shown(self.data[name]) if name in self.data else "nothing"
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

    def choice(self, name: str, kinds: type[StrEnum]) -> str:
        value = self.data.get(name)
        allowed = [k.value for k in kinds]
        if value not in allowed:
            raise self.fail(name, "one of " + ", ".join(repr(a) for a in allowed))
        return str(value)

    def table(self, name: str, *, default: Mapping[str, Any] | None = None) -> _Fields:
        value = self.data.get(name, default)
        if not isinstance(value, Mapping):
            raise self.fail(name, "a table, e.g. " + name + " = { ... }")
        return _Fields(value, self.source, self.key(name))
