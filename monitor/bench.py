"""The policy benchmark: the real scheduler, client, outbox and simulator in one virtual-time loop.

Per policy, a fresh simulator is served on 127.0.0.1 and a fresh scheduler polls it through the
real aiohttp client, all on one `VirtualTimeLoop`, so hours of a scenario take seconds. At each
planned arrival the execution is created in the simulator (unless it is a `not_found` one); at its
handover it is tracked in an in-memory state store and handed to the scheduler. A terminal answer
goes the daemon's way: the outbox (`Delivery.submit`, one store transaction), the sink's lane, and
an in-memory sink. Detection delay = loop time the sink confirmed the record (its `send` returned)
- the simulator's end time; `poll_*_s` are the same figures up to the poll's answer only. A
scenario's `handover` hands an ID over later than its creation (at a fraction of its run), and its
`kind` goes with it as the label `kind`.

Two reference rows, never policies a user can choose:
- `informed` is simulated like the policies (same simulator, client, budget, scheduler and sink):
  a poller that knows when each run would complete (perfect prediction of its duration, queue and
  stall included; for a run that fails or is cancelled, when it would have completed) and polls it
  then; with the tokens those polls leave it finds failures and cancellations by plain round robin
  over everything still running. It cannot know which runs fail, so `adaptive / informed` is what
  better prediction could still win (see `InformedPolicy`).
- `oracle` is computed, not simulated: a clairvoyant poller that asks about each execution once, at
  the first moment the same budget (one request every T/N, never more than N in any T) allows after
  it ended; it knows failures too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from monitor import vtime
from monitor.api.client import ExecutionsClient
from monitor.clock import Clock
from monitor.config import SinkConfig
from monitor.delivery import Delivery
from monitor.rates import RateLimit
from monitor.records import Outcome, StallEvent, TerminalEvent
from monitor.schedule.base import EPS
from monitor.schedule.budget import Budget
from monitor.schedule.policy import Policy, make_policy
from monitor.schedule.scheduler import NullListener, Scheduler
from monitor.schedule.state import ExecState, LazyHeap
from monitor.secrets import Secret
from monitor.simulator.scenario import PlannedExecution, Scenario, StallThen
from monitor.simulator.server import SimulatorSettings, simulator_of, start_simulator
from monitor.sinks.base import BaseSink
from monitor.sinks.registry import SinkHandle
from monitor.state.rows import TrackRequest
from monitor.state.store import Store

BENCH_KEY = "sk_test_bench"
DEFAULT_POLICIES = ("backoff", "adaptive")
INFORMED = "informed"
ORACLE = "oracle"
DELAY_MEASURED = "end in the simulator -> record confirmed by the sink (scheduler, outbox, sink lane)"
_BENCH_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
_DRAIN_S = 60.0  # virtual seconds the outbox gets to hand the last records to the sink


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
    # The same delay figures up to the poll's answer (before the outbox and the sink).
    poll_mean_s: float = 0.0
    poll_p99_s: float = 0.0
    poll_max_s: float = 0.0
    not_found: int = 0  # IDs that never existed, reported as not_found (not in the delay figures)
    wall_s: float = 0.0  # real seconds this policy's run took

    def as_json(self) -> dict[str, float | int]:
        return asdict(self)


_Results = dict[str, tuple[float, Outcome]]  # execution_id -> (loop time, outcome)


class _BenchSink(BaseSink):
    """The in-memory sink: the loop time each record was confirmed (its `send` returned), and as what."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = "bench"
        self._loop = loop
        self.confirmed: _Results = {}

    async def send(self, record: dict[str, Any]) -> None:
        if record.get("kind", "execution") == "execution":
            execution_id, outcome = str(record["execution_id"]), Outcome(record["outcome"])
            self.confirmed.setdefault(execution_id, (self._loop.time(), outcome))


class Recorder(NullListener):
    """The scheduler's listener as the daemon's: a terminal result goes to the outbox (the store,
    one transaction), whose lane hands it to the sink; when the poll answered is noted too, and
    each stall event (loop times). `run_policy` sets `delivery`, `start` (the scenario's time 0)
    and `scheduler` before the first poll."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.delivery: Delivery | None = None
        self.polled: _Results = {}
        self.stalls: list[tuple[float, StallEvent]] = []
        self.start = loop.time()
        self.scheduler: Scheduler | None = None

    async def on_terminal(self, event: TerminalEvent) -> None:
        self.polled.setdefault(event.execution_id, (self._loop.time(), event.outcome))
        assert self.delivery is not None, "run_policy attaches the delivery first"
        self.delivery.submit(event)

    def on_stall(self, event: StallEvent) -> None:
        self.stalls.append((self._loop.time(), event))


class InformedPolicy(Policy):
    """A poller with perfect prediction: each run is polled when it would complete, failures are
    looked for with the rest of the budget. A reference for the bench, not a policy to run.

    `known_end(execution_id)` is the loop time it would complete (None: nothing known, e.g. an ID
    that does not exist). Each token goes to:
    1. the run whose known end has come (earliest first): found at once, if it completed;
    2. else the round robin: the execution answered longest ago (new ones after those seen before),
       for the failures and cancellations, which nothing announces.
    A round-robin poll is not started when it would keep the token from a known end: when the next
    known end comes less than T/N after the moment the poll could go (the budget paces requests
    T/N apart), the policy waits for that end instead. It knows nothing of failures: a run that
    will fail is polled at the end it would have had, if the round robin has not found it before.
    """

    name = INFORMED

    def __init__(self, known_end: Callable[[str], float | None]) -> None:
        super().__init__()
        self._known_end = known_end
        self._ends = LazyHeap()  # known end -> state
        self._round = LazyHeap()  # last answer (or hold) -> state
        self._last_choice = -math.inf

    def _on_add(self, state: ExecState, now: float) -> None:
        end = self._known_end(state.execution_id)
        state.eta = math.inf if end is None else end
        state.due = now

    def _on_running(self, state: ExecState, now: float) -> None:
        state.due = now
        if state.eta <= now:
            state.eta = math.inf  # not over at its known end after all (never, with a true known_end)

    def _enqueue(self, state: ExecState) -> None:
        state.ver += 1
        if math.isfinite(state.eta):
            self._ends.push(state.eta, state)
            self._ends.compact(self._count)
        self._round.push(state.due, state)
        self._round.compact(self._count)

    def _pick(self, now: float) -> ExecState | None:
        for heap in (self._ends, self._round):
            top = heap.top()
            if top is not None and top[0] <= now + EPS:
                heap.pop()
                self._last_choice = now
                return top[1]
        return None

    def _ready_at(self, now: float) -> float:
        end_top, round_top = self._ends.top(), self._round.top()
        end = end_top[0] if end_top else math.inf
        if round_top is None:
            return end
        rate = self._rate()
        spacing = 1.0 / rate if rate > 0 else 0.0
        goes_at = max(round_top[0], now, self._last_choice + spacing)
        return round_top[0] if goes_at + spacing <= end + EPS else end


def nominal_end_s(planned: PlannedExecution) -> float:
    """Seconds after its creation when a planned run completes or would have completed: its queue,
    its whole duration, and a stall it resumes from (the same as `end_s` for a completed run)."""
    stall = planned.stall
    resumed = stall.for_s if stall is not None and stall.then == StallThen.RESUME else 0.0
    return planned.queue_s + planned.duration_s + resumed


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
        mean_s=_mean(delays),
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
        poll_mean_s=_mean(delays),
        poll_p99_s=percentile(delays, 0.99),
        poll_max_s=max(delays, default=0.0),
    )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


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
    whole_seconds: bool = False,
) -> PolicyResult:
    """One policy on a fresh simulator; call inside a VirtualTimeLoop (see `bench_policy`).

    `policy`: a name for `make_policy`, `"informed"` (see `InformedPolicy`), or a factory.
    `recorder`: one of the caller's, to read the stall events from (benchmarks/stalls.py).
    `whole_seconds`: the simulator sends timestamps in whole seconds (as the vendor's page shows)."""
    wall_start = time.perf_counter()
    loop = asyncio.get_running_loop()
    plan = scenario.plan()
    settings = SimulatorSettings(
        api_keys=[BENCH_KEY],
        rate_limit=scenario.rate_limit,
        seed=scenario.seed,
        error_rate=error_rate,
        whole_seconds=whole_seconds,
    )
    runner, url = await start_simulator(settings, "127.0.0.1", 0)
    simulator = simulator_of(runner)
    # A fixed wall-clock anchor: updated_at is sent in milliseconds, and with today's time as the
    # anchor its rounding (hence every fit) would differ from one run to the next.
    simulator.clock = Clock(loop, wall_anchor=_BENCH_EPOCH)
    clock = Clock(loop, wall_anchor=simulator.clock.wall())
    known_ends: dict[str, float] = {}
    made = _make(policy, known_ends.get)
    sink = _BenchSink(loop)
    store = Store.open(None)
    handle = SinkHandle(sink.name, sink, SinkConfig(type="bench", index=1, source="bench"))
    try:
        async with (
            ExecutionsClient(url, Secret(BENCH_KEY)) as client,
            Delivery(store, [handle], clock, rng=random.Random(scenario.seed)) as delivery,
        ):
            outbox = recorder or Recorder(loop)
            outbox.delivery = delivery
            scheduler = Scheduler(
                client,
                Budget(scenario.rate_limit, clock),
                made,
                clock,
                max_in_flight=max_in_flight,
                listener=outbox,
                rng=random.Random(scenario.seed),
            )
            run_task = asyncio.create_task(scheduler.run())
            start = outbox.start = loop.time()
            outbox.scheduler = scheduler
            for at, creates, planned in _timeline(plan):
                await _sleep_until(loop, start + at)
                if not creates:
                    _hand_over(planned, store, scheduler, clock)
                elif planned.exists:
                    simulator.add_planned(planned)
                    known_ends[planned.execution_id] = loop.time() + nominal_end_s(planned)
            horizon = start + _horizon_s(plan, scenario.rate_limit)
            await _wait_idle_until(loop, scheduler, horizon)
            await scheduler.stop(grace_s=0.0)
            await run_task
            await delivery.drain(timeout=_DRAIN_S)
            stats = simulator.stats()
    finally:
        store.close()
        await runner.cleanup()
    delays, undetected, not_found = _delays(plan, sink.confirmed, simulator.end_time)
    polled, _, _ = _delays(plan, outbox.polled, simulator.end_time)
    result = summarize(
        delays,
        requests=stats["requests_total"],
        executions=len(plan),
        http_429=stats["responses"].get("429", 0),
        max_in_window=stats["max_requests_in_window"],
        undetected=undetected,
        not_found=not_found,
        wall_s=time.perf_counter() - wall_start,
    )
    return dataclasses.replace(
        result, poll_mean_s=_mean(polled), poll_p99_s=percentile(polled, 0.99), poll_max_s=max(polled, default=0.0)
    )


def _make(policy: str | Callable[[], Policy], known_end: Callable[[str], float | None]) -> Policy:
    if not isinstance(policy, str):
        return policy()
    if policy == INFORMED:
        return InformedPolicy(known_end)
    return make_policy(policy)


def _hand_over(planned: PlannedExecution, store: Store, scheduler: Scheduler, clock: Clock) -> None:
    """What `Monitor.track` does: persist the ID (the outbox needs its row), then schedule it."""
    labels = None if planned.kind is None else {"kind": planned.kind}
    store.track_many([TrackRequest(planned.execution_id, tracked_since=clock.wall(), labels=labels or {})])
    scheduler.track(planned.execution_id, labels=labels)


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
    plan: Sequence[PlannedExecution], results: _Results, end_time: Callable[[str], float | None]
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


def bench_policy(
    scenario: Scenario, policy: str, *, error_rate: float = 0.0, whole_seconds: bool = False
) -> PolicyResult:
    """Run one policy to the end on a fresh virtual-time loop (blocking)."""
    return vtime.run(run_policy(scenario, policy, error_rate=error_rate, whole_seconds=whole_seconds))


def bench(
    scenario: Scenario, policies: Sequence[str] = DEFAULT_POLICIES, *, whole_seconds: bool = False
) -> dict[str, PolicyResult]:
    """Every requested policy, then the two reference rows: informed and oracle."""
    results = {name: bench_policy(scenario, name, whole_seconds=whole_seconds) for name in policies}
    results[INFORMED] = bench_policy(scenario, INFORMED, whole_seconds=whole_seconds)
    results[ORACLE] = oracle(scenario.plan(), scenario.rate_limit)
    return results
