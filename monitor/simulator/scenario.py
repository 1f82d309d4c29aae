"""Scenario files (TOML): which executions the simulator creates, when, how long they run, how they end.

A scenario is a list of groups; `Scenario.plan()` turns it into one `PlannedExecution` per execution.
Every random choice for execution number i comes from its own `random.Random` seeded from
(name, seed, i), so the plan depends only on the file, never on the order in which anything is asked.

The optional models of a group (`kind`, `queue`, `handover`, `stall`, progress `curve`) are off by
default and draw after everything else, so a file that does not use them plans exactly as before.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit, parse_rate_limit
from monitor.simulator.fields import Fields, ScenarioError, shown


class PlannedOutcome(StrEnum):
    """How a simulated execution ends."""

    COMPLETED = "completed"  # progress reaches 100, a result
    FAILED = "failed"  # ends early with an error body
    CANCELLED = "cancelled"  # ends early with a cancelled body


class ProgressKind(StrEnum):
    """How a running execution reports progress."""

    LINEAR = "linear"  # proportional to the run's elapsed time, plus gaussian noise
    CURVE = "curve"  # 100 * f**shape of the run fraction f, plus gaussian noise
    NONE = "none"  # 0 until the end
    STEPS = "steps"  # a few uneven jumps, as a job that reports at checkpoints


class DurationDist(StrEnum):
    """Distributions of nominal durations."""

    LOGNORMAL = "lognormal"  # median_s, sigma
    UNIFORM = "uniform"  # min_s, max_s
    FIXED = "fixed"  # s


class StallThen(StrEnum):
    """What a stalled run does once its stall is over."""

    RESUME = "resume"  # goes on where it stopped; its end moves later by the stall's length
    FAIL = "fail"  # ends failed at the end of the stall


@dataclass(frozen=True)
class ProgressModel:
    model: str  # a ProgressKind value
    noise: float = 0.0  # standard deviation, in percentage points, of the noise on each answer
    shape: float = 1.0  # the exponent of the curve model (1: a straight line)


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
class StallSpec:
    """A group's `stall` key: which share of its runs freeze, for how long, and what then."""

    fraction: float
    for_s: Duration
    then: str  # a StallThen value


@dataclass(frozen=True)
class Stall:
    """One execution's stall, in seconds after its creation: progress and updated_at stand still in [at, until)."""

    at_s: float
    for_s: float
    then: str  # a StallThen value

    @property
    def until_s(self) -> float:
        return self.at_s + self.for_s

    def at_speed(self, speed: float) -> Stall:
        """The same stall on a clock running `speed` times faster."""
        return Stall(self.at_s / speed, self.for_s / speed, self.then)


@dataclass(frozen=True)
class Group:
    count: int
    arrival_from_s: float
    arrival_to_s: float
    duration: Duration
    outcomes: tuple[tuple[str, float], ...]  # (PlannedOutcome value, weight)
    progress: ProgressModel
    not_found: float = 0.0
    kind: str | None = None  # handed to the monitor as the label kind
    queue: Duration | None = None  # the wait before the run starts (None: it starts at creation)
    handover: tuple[float, float] | None = None  # fractions of the run (None: handed over at creation)
    stall: StallSpec | None = None


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
    arrival_s: float  # seconds after the start of the scenario when it is created
    duration_s: float  # nominal duration of the run (after any queue, stall aside)
    outcome: str  # a PlannedOutcome value
    end_s: float  # seconds after creation when it ends: queue + run (duration_s for completed) + stall
    progress: ProgressModel
    exists: bool = True  # False: an ID handed to the monitor that never existed (not_found)
    seed: int = 0  # seeds this execution's progress steps and noise
    queue_s: float = 0.0  # seconds after creation when the run starts
    stall: Stall | None = None
    handover_s: float = 0.0  # seconds after creation when the bench hands it to the monitor
    kind: str | None = None


def stalled_end(outcome: str, end_s: float, stall: Stall | None) -> tuple[str, float]:
    """The outcome and the end (seconds after creation) of a run that would end at end_s, once `stall` applies."""
    if stall is None:
        return outcome, end_s
    if stall.then == StallThen.FAIL:
        return PlannedOutcome.FAILED, stall.until_s
    return outcome, end_s + stall.for_s


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
    # The optional models: one fixed draw each (a sub-generator where a distribution is sampled).
    queue_rng = random.Random(rng.getrandbits(64))
    handover_draw, stall_roll, stall_point = rng.random(), rng.random(), rng.random()
    stall_rng = random.Random(rng.getrandbits(64))

    queue_s = 0.0 if group.queue is None else group.queue.sample(queue_rng)
    run_s = duration_s if outcome == PlannedOutcome.COMPLETED else duration_s * end_fraction
    stall = None
    if group.stall is not None and stall_roll < group.stall.fraction:
        stall = Stall(queue_s + stall_point * run_s, group.stall.for_s.sample(stall_rng), group.stall.then)
    outcome, end_s = stalled_end(outcome, queue_s + run_s, stall)
    handover_s = 0.0
    if group.handover is not None:
        low, high = group.handover
        handover_s = queue_s + (low + (high - low) * handover_draw) * (end_s - queue_s)  # of the run as it goes
    return PlannedExecution(
        execution_id=execution_id,
        arrival_s=arrival_s,
        duration_s=duration_s,
        outcome=outcome,
        end_s=end_s,
        progress=group.progress,
        exists=exists,
        seed=exec_seed,
        queue_s=queue_s,
        stall=stall,
        handover_s=handover_s,
        kind=group.kind,
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

_GROUP_KEYS = ("count", "arrival", "duration", "outcomes", "progress", "not_found")
_OPTIONAL_GROUP_KEYS = ("kind", "queue", "handover", "stall")  # the models beyond a straight line


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
    fields = Fields(data, source, "")
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
        found = shown(raw_groups)
        raise ScenarioError(f"{source}: groups: expected at least one [[groups]] table, found {found}")
    groups = tuple(_parse_group(item, source, f"groups[{i}]") for i, item in enumerate(raw_groups))
    return Scenario(name=name, seed=seed, rate_limit=rate_limit, groups=groups)


def _parse_group(item: object, source: str, where: str) -> Group:
    if not isinstance(item, dict):
        raise ScenarioError(f"{source}: {where}: expected a table, found {shown(item)}")
    fields = Fields(item, source, where)
    fields.only(*_GROUP_KEYS, *_OPTIONAL_GROUP_KEYS)
    count = fields.integer("count", minimum=0)
    arrival = fields.table("arrival", default={"from_s": 0, "to_s": 0})
    arrival.only("from_s", "to_s")
    from_s = arrival.number("from_s", default=0.0, minimum=0.0)
    to_s = arrival.number("to_s", default=from_s, minimum=from_s)
    duration = _parse_duration(fields.table("duration"))
    outcomes = _parse_outcomes(fields.table("outcomes", default=dict(DEFAULT_OUTCOMES)))
    progress = _parse_progress(fields.table("progress", default={"model": DEFAULT_PROGRESS.model}))
    not_found = fields.number("not_found", default=0.0, minimum=0.0, maximum=1.0)
    kind = fields.data.get("kind")
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise fields.fail("kind", "a non-empty string")
    queue = fields.optional_table("queue")
    handover = fields.optional_table("handover")
    stall = fields.optional_table("stall")
    return Group(
        count,
        from_s,
        to_s,
        duration,
        outcomes,
        progress,
        not_found,
        kind=kind,
        queue=None if queue is None else _parse_duration(queue),
        handover=None if handover is None else _parse_handover(handover),
        stall=None if stall is None else _parse_stall(stall),
    )


def _parse_progress(fields: Fields) -> ProgressModel:
    fields.only("model", "noise", "shape")
    model = fields.choice("model", ProgressKind)
    noise = fields.number("noise", default=0.0, minimum=0.0)
    if model != ProgressKind.CURVE:
        if "shape" in fields.data:
            raise ScenarioError(f'{fields.source}: {fields.key("shape")}: only model = "curve" takes a shape')
        return ProgressModel(model, noise)
    return ProgressModel(model, noise, fields.number("shape", minimum=0.0, exclusive=True))


def _parse_duration(fields: Fields) -> Duration:
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


def _parse_outcomes(fields: Fields) -> tuple[tuple[str, float], ...]:
    fields.only(*PlannedOutcome)
    pairs = tuple((o.value, fields.number(o.value, default=0.0, minimum=0.0)) for o in PlannedOutcome)
    if sum(weight for _, weight in pairs) <= 0:
        raise ScenarioError(f"{fields.source}: {fields.where}: the outcome weights must not all be 0")
    return tuple(pair for pair in pairs if pair[1] > 0)


def _parse_handover(fields: Fields) -> tuple[float, float]:
    fields.only("from", "to")
    low = fields.number("from", default=0.0, minimum=0.0, maximum=1.0)
    return low, fields.number("to", default=low, minimum=low, maximum=1.0)


def _parse_stall(fields: Fields) -> StallSpec:
    fields.only("fraction", "for_s", "then")
    fraction = fields.number("fraction", minimum=0.0, maximum=1.0)
    for_s = _parse_duration(fields.table("for_s"))
    return StallSpec(fraction, for_s, fields.choice("then", StallThen, default=StallThen.RESUME))
