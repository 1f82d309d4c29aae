"""The policy benchmark: the real scheduler, client and simulator in one virtual-time loop.

Per policy, a fresh simulator is served on 127.0.0.1 and a fresh scheduler polls it through the
real aiohttp client, all on one `VirtualTimeLoop`, so hours of a scenario take seconds. At each
planned arrival the execution is created in the simulator (unless it is a `not_found` one) and
handed to the scheduler. Detection delay = loop time its terminal result reached the in-memory
sink - the simulator's end time. A scenario's `handover` hands an ID over later than its creation
(at a fraction of its run), and its `kind` goes with it as the label `kind`. `oracle` is computed,
not simulated: a clairvoyant poller that asks about each execution once, at the first moment the
same budget (one request every T/N, never more than N in any T) allows after it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from monitor import vtime
from monitor.api.client import ExecutionsClient
from monitor.clock import Clock
from monitor.rates import RateLimit
from monitor.records import Outcome, StallEvent, TerminalEvent
from monitor.schedule.budget import Budget
from monitor.schedule.policy import Policy, make_policy
from monitor.schedule.scheduler import NullListener, Scheduler
from monitor.secrets import Secret
from monitor.simulator.scenario import PlannedExecution, Scenario
from monitor.simulator.server import SimulatorSettings, simulator_of, start_simulator

BENCH_KEY = "sk_test_bench"
DEFAULT_POLICIES = ("backoff", "adaptive")


@dataclass(frozen=True)
class PolicyResult:
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float
    requests: int
    requests_per_execution: float
    http_429: int
    max_requests_in_window: int
    undetected: int
    not_found: int = 0  # IDs that never existed, reported as not_found (not in the delay figures)
    wall_s: float = 0.0  # real seconds this policy's run took

    def as_json(self) -> dict[str, float | int]:
        return asdict(self)


class Recorder(NullListener):
    """The in-memory sink: when each terminal result and each stall event arrived (loop times).

    `run_policy` sets `start` (the scenario's time 0) and `scheduler` before the first poll.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.results: dict[str, tuple[float, Outcome]] = {}
        self.stalls: list[tuple[float, StallEvent]] = []
        self.start = loop.time()
        self.scheduler: Scheduler | None = None

    async def on_terminal(self, event: TerminalEvent) -> None:
        self.results.setdefault(event.execution_id, (self._loop.time(), event.outcome))

    def on_stall(self, event: StallEvent) -> None:
        self.stalls.append((self._loop.time(), event))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(
    delays: Sequence[float],
    *,
    requests: int,
    executions: int,
    http_429: int,
    max_in_window: int,
    undetected: int,
    not_found: int = 0,
    wall_s: float = 0.0,
) -> PolicyResult:
    return PolicyResult(
        mean_s=sum(delays) / len(delays) if delays else 0.0,
        p50_s=percentile(delays, 0.50),
        p90_s=percentile(delays, 0.90),
        p99_s=percentile(delays, 0.99),
        max_s=max(delays, default=0.0),
        requests=requests,
        requests_per_execution=requests / executions if executions else 0.0,
        http_429=http_429,
        max_requests_in_window=max_in_window,
        undetected=undetected,
        not_found=not_found,
        wall_s=wall_s,
    )


def oracle(plan: Sequence[PlannedExecution], rate: RateLimit) -> PolicyResult:
    """The clairvoyant poller: one request per existing execution, at the first token after its end.

    Tokens come one every T/N at most (the budget's pacing), which also keeps any window of T at N.
    """
    ends = sorted(p.arrival_s + p.end_s for p in plan if p.exists)
    spacing = rate.window_s / rate.limit
    delays = []
    last = -math.inf
    for end in ends:
        at = max(end, last + spacing)
        delays.append(at - end)
        last = at
    window = _max_in_window([end + d for end, d in zip(ends, delays, strict=True)], rate.window_s)
    return summarize(
        delays,
        requests=len(ends),
        executions=len(plan),
        http_429=0,
        max_in_window=window,
        undetected=0,
        not_found=sum(1 for p in plan if not p.exists),
    )


def _max_in_window(times: Sequence[float], window_s: float) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


async def run_policy(
    scenario: Scenario,
    policy: str | Callable[[], Policy],
    *,
    error_rate: float = 0.0,
    max_in_flight: int = 4,
    recorder: Recorder | None = None,
) -> PolicyResult:
    """One policy on a fresh simulator; call inside a VirtualTimeLoop (see `bench_policy`).
    `recorder`: one of the caller's, to read the stall events from (benchmarks/stalls.py)."""
    wall_start = time.perf_counter()
    loop = asyncio.get_running_loop()
    plan = scenario.plan()
    settings = SimulatorSettings(
        api_keys=[BENCH_KEY], rate_limit=scenario.rate_limit, seed=scenario.seed, error_rate=error_rate
    )
    runner, url = await start_simulator(settings, "127.0.0.1", 0)
    simulator = simulator_of(runner)
    clock = Clock(loop, wall_anchor=simulator.clock.wall())
    recorder = recorder or Recorder(loop)
    made = make_policy(policy) if isinstance(policy, str) else policy()
    try:
        async with ExecutionsClient(url, Secret(BENCH_KEY)) as client:
            scheduler = Scheduler(
                client,
                Budget(scenario.rate_limit, clock),
                made,
                clock,
                max_in_flight=max_in_flight,
                listener=recorder,
                rng=random.Random(scenario.seed),
            )
            run_task = asyncio.create_task(scheduler.run())
            start = recorder.start = loop.time()
            recorder.scheduler = scheduler
            for at, creates, planned in _timeline(plan):
                await _sleep_until(loop, start + at)
                if not creates:
                    scheduler.track(
                        planned.execution_id, labels=None if planned.kind is None else {"kind": planned.kind}
                    )
                elif planned.exists:
                    simulator.add_planned(planned)
            horizon = start + _horizon_s(plan, scenario.rate_limit)
            await _wait_idle_until(loop, scheduler, horizon)
            await scheduler.stop(grace_s=0.0)
            await run_task
            stats = simulator.stats()
    finally:
        await runner.cleanup()
    delays, undetected, not_found = _delays(plan, recorder.results, start, simulator.end_time)
    return summarize(
        delays,
        requests=stats["requests_total"],
        executions=len(plan),
        http_429=stats["responses"].get("429", 0),
        max_in_window=stats["max_requests_in_window"],
        undetected=undetected,
        not_found=not_found,
        wall_s=time.perf_counter() - wall_start,
    )


def _timeline(plan: Sequence[PlannedExecution]) -> list[tuple[float, bool, PlannedExecution]]:
    """(seconds from the start, True: create it / False: hand it to the monitor, execution), in time order.

    Ties keep the plan's order, creation first: without handovers, exactly the plan's sequence.
    """
    events = []
    for index, planned in enumerate(plan):
        events.append((planned.arrival_s, 2 * index, True, planned))
        events.append((planned.arrival_s + planned.handover_s, 2 * index + 1, False, planned))
    events.sort(key=lambda event: (event[0], event[1]))
    return [(at, creates, planned) for at, _, creates, planned in events]


def _delays(
    plan: Sequence[PlannedExecution],
    results: dict[str, tuple[float, Outcome]],
    start: float,
    end_time: Callable[[str], float | None],
) -> tuple[list[float], int, int]:
    delays: list[float] = []
    undetected = not_found = 0
    for planned in plan:
        result = results.get(planned.execution_id)
        if not planned.exists:
            if result is not None and result[1] is Outcome.NOT_FOUND:
                not_found += 1
            else:
                undetected += 1
            continue
        ended = end_time(planned.execution_id)
        if result is None or ended is None or result[1] is Outcome.NOT_FOUND:
            undetected += 1
            continue
        delays.append(max(result[0] - ended, 0.0))
    return delays, undetected, not_found


def _horizon_s(plan: Sequence[PlannedExecution], rate: RateLimit) -> float:
    """Virtual seconds after which the run gives up: the last end plus several full round robins."""
    last_end = max((p.arrival_s + (p.end_s if p.exists else 0.0) for p in plan), default=0.0)
    return last_end + 10.0 * len(plan) / rate.per_second + 3600.0


async def _sleep_until(loop: asyncio.AbstractEventLoop, at: float) -> None:
    delay = at - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_idle_until(loop: asyncio.AbstractEventLoop, scheduler: Scheduler, horizon: float) -> None:
    with contextlib.suppress(TimeoutError):  # what is left is reported as undetected
        await asyncio.wait_for(scheduler.wait_idle(), timeout=max(horizon - loop.time(), 0.0))


def bench_policy(scenario: Scenario, policy: str, *, error_rate: float = 0.0) -> PolicyResult:
    """Run one policy to the end on a fresh virtual-time loop (blocking)."""
    return vtime.run(run_policy(scenario, policy, error_rate=error_rate))


def bench(scenario: Scenario, policies: Sequence[str] = DEFAULT_POLICIES) -> dict[str, PolicyResult]:
    """Every requested policy, then the oracle row."""
    results = {name: bench_policy(scenario, name) for name in policies}
    results["oracle"] = oracle(scenario.plan(), scenario.rate_limit)
    return results
