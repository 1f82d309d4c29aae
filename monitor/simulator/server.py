"""The simulator: a local Executions API that speaks the vendor contract, plus test-only `/_sim` endpoints.

Time comes only from the running event loop, so the simulator runs on real or virtual time
(the benchmark serves it and the monitor in one loop whose clock jumps). An execution's state is
computed when someone asks; nothing runs in the background per execution.

Order of checks on a status request: key (401), then rate limit (429), then faults, then the ID
(404). Requests with an unknown key are not counted in any window (there is no key to count
them against); every other status request counts, whatever its answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from monitor.clock import Clock
from monitor.ids import is_valid_execution_id
from monitor.logs import get_logger
from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit
from monitor.secrets import register_secret
from monitor.simulator.admin import add_admin_routes
from monitor.simulator.errors import ExecutionExists, SimulatorRequestError
from monitor.simulator.faults import Fault, FaultInjector
from monitor.simulator.progress import RUNNING, SimExecution
from monitor.simulator.ratelimit import SlidingWindows
from monitor.simulator.scenario import (
    DEFAULT_OUTCOMES,
    DEFAULT_PROGRESS,
    PlannedExecution,
    PlannedOutcome,
    ProgressModel,
    Stall,
    StallThen,
    pick_outcome,
    stalled_end,
    unique_id,
)

log = get_logger(__name__)

STATUS_PATH = "/api/v1/executions/{execution_id}/status"
MAX_CREATE = 100_000
RESPONSE_KINDS = ("200", "401", "404", "429", "5xx", "dropped", "malformed")


def _vendor_json(payload: object) -> bytes:
    """Bodies laid out as on the vendor page (2-space indent), so the error bodies match it byte for byte."""
    return json.dumps(payload, indent=2).encode()


NOT_FOUND_BODY = _vendor_json({"error": {"code": "not_found", "message": "Execution not found"}})
UNAUTHORIZED_BODY = _vendor_json({"error": {"code": "unauthorized", "message": "Invalid or revoked API key"}})


@dataclass
class SimulatorSettings:
    api_keys: list[str] = field(default_factory=lambda: ["sk_test_local"], repr=False)
    rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT  # None: no limit
    speed: float = 1.0  # every execution runs this many times faster
    seed: int = 0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    drop_rate: float = 0.0
    latency_ms: float = 0.0
    whole_seconds: bool = False  # timestamps as the vendor's page shows them (else milliseconds)

    def validate(self) -> None:
        """Raise ValueError with a clear message for values the simulator cannot use."""
        if not self.api_keys or any(not key for key in self.api_keys):
            raise ValueError("at least one non-empty API key is needed")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"speed must be a number > 0, got {self.speed!r}")
        rates = {
            "error rate": self.error_rate,
            "malformed rate": self.malformed_rate,
            "drop rate": self.drop_rate,
        }
        for name, value in rates.items():
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value!r}")
        if sum(rates.values()) > 1.0:
            raise ValueError("error, malformed and drop rates together must not exceed 1")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency must be >= 0 ms, got {self.latency_ms!r}")


@dataclass(frozen=True, slots=True)
class ExecutionTruth:
    execution_id: str
    status: str  # running | completed | failed | cancelled, now
    progress: int  # as an answer now would report it (without noise)
    created_at: float  # loop time
    ended_at: float | None  # loop time of the scheduled end; None while running
    polls: int  # status requests naming it that passed the key check, whatever the answer
    stalled_from: float | None = None  # loop times of its stall (planned); None if it never stalls
    stalled_until: float | None = None
    kind: str | None = None


SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("simulator")


class Simulator:
    def __init__(self, settings: SimulatorSettings) -> None:
        settings.validate()
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self.clock = Clock(self._loop)
        for key in settings.api_keys:
            register_secret(key)
        self._keys = set(settings.api_keys)
        self._windows = SlidingWindows(settings.rate_limit)
        self._faults = FaultInjector(
            settings.seed,
            error_rate=settings.error_rate,
            malformed_rate=settings.malformed_rate,
            drop_rate=settings.drop_rate,
        )
        self._executions: dict[str, SimExecution] = {}
        self._phantoms: dict[str, float] = {}  # IDs that never exist (not_found) -> handed over at
        self._taken: set[str] = set()
        self._creations = 0
        self.requests_total = 0
        self._responses = dict.fromkeys(RESPONSE_KINDS, 0)

    # -- the Python API ------------------------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    def create(
        self,
        *,
        count: int | None = None,
        ids: list[str] | None = None,
        duration_s: float = 60.0,
        outcome: str | None = None,
        progress: ProgressModel | None = None,
        stall: Stall | None = None,
    ) -> list[str]:
        """Create executions now, as POST /_sim/executions does; they end at duration_s / speed
        (a stall, in the same seconds, freezes them and moves or fails that end).

        Raises SimulatorRequestError (400) for bad values, ExecutionExists (409) for a taken ID.
        """
        wanted = _validate_create(count, ids, duration_s, outcome)
        _validate_stall(stall, duration_s)
        if ids is not None:
            for execution_id in ids:
                if execution_id in self._taken:
                    raise ExecutionExists(f"execution {execution_id} exists already")
        self._creations += 1
        rng = random.Random(f"execmon-sim:{self.settings.seed}:{self._creations}")
        now = self.now()
        created = []
        for i in range(wanted):
            execution_id = ids[i] if ids is not None else unique_id(rng, self._taken)
            self._taken.add(execution_id)
            ends_as, end_s = stalled_end(outcome or pick_outcome(rng, DEFAULT_OUTCOMES), duration_s, stall)
            planned = PlannedExecution(
                execution_id=execution_id,
                arrival_s=0.0,
                duration_s=duration_s,
                outcome=ends_as,
                end_s=end_s,
                progress=progress or DEFAULT_PROGRESS,
                seed=rng.getrandbits(63),
                stall=stall,
            )
            self._insert(planned, now)
            created.append(execution_id)
        log.info("executions created", count=len(created), duration_s=duration_s / self.settings.speed)
        return created

    def add_planned(self, planned: PlannedExecution) -> None:
        """Create one planned execution now (its arrival time is the caller's business)."""
        if planned.execution_id in self._taken:
            raise ExecutionExists(f"execution {planned.execution_id} exists already")
        self._taken.add(planned.execution_id)
        self._insert(planned, self.now())

    def add_plan(self, plan: Iterable[PlannedExecution], start_at: float | None = None) -> None:
        """Create a whole plan: each execution appears at start_at + arrival_s / speed (loop time).

        Until then it answers 404 and is left out of truth() and stats(), as if not created yet.
        """
        start = self.now() if start_at is None else start_at
        for planned in plan:
            if planned.execution_id in self._taken:
                raise ExecutionExists(f"execution {planned.execution_id} exists already")
            self._taken.add(planned.execution_id)
            self._insert(planned, start + planned.arrival_s / self.settings.speed)

    def _insert(self, planned: PlannedExecution, created_at: float) -> None:
        if not planned.exists:
            self._phantoms[planned.execution_id] = created_at
            return
        speed = self.settings.speed
        self._executions[planned.execution_id] = SimExecution.create(
            execution_id=planned.execution_id,
            created_at=created_at,
            duration_s=planned.duration_s / speed,
            end_s=planned.end_s / speed,
            outcome=planned.outcome,
            progress=planned.progress,
            seed=planned.seed,
            queue_s=planned.queue_s / speed,
            stall=None if planned.stall is None else planned.stall.at_speed(speed),
            kind=planned.kind,
        )

    def revoke(self, key: str) -> None:
        """From now on this key gets 401."""
        self._keys.discard(key)
        log.info("api key revoked", keys_left=len(self._keys))

    def end_time(self, execution_id: str) -> float | None:
        execution = self._executions.get(execution_id)
        return None if execution is None else execution.end_at

    def truth(self) -> list[ExecutionTruth]:
        now = self.now()
        return [
            ExecutionTruth(
                execution_id=e.execution_id,
                status=e.status(now),
                progress=e.final_progress() if now >= e.end_at else round(e.model_progress(now)),
                created_at=e.created_at,
                ended_at=e.ended_at(now),
                polls=e.polls,
                stalled_from=e.stalled_from,
                stalled_until=e.stalled_until,
                kind=e.kind,
            )
            for e in self._arrived(now)
        ]

    def not_found_ids(self) -> list[str]:
        """IDs handed over (by a scenario's not_found) that never exist, once their arrival time passed."""
        now = self.now()
        return [i for i, handed_at in self._phantoms.items() if handed_at <= now]

    def stats(self) -> dict[str, Any]:
        now = self.now()
        counts = dict.fromkeys((RUNNING, *PlannedOutcome), 0)
        for execution in self._arrived(now):
            counts[execution.status(now)] += 1
        limit = self.settings.rate_limit
        return {
            "requests_total": self.requests_total,
            "responses": dict(self._responses),
            "rate_limit": None if limit is None else {"limit": limit.limit, "window_s": limit.window_s},
            "max_requests_in_window": self._windows.max_requests_in_window,
            "executions": {str(k): v for k, v in counts.items()},
        }

    def _arrived(self, now: float) -> Iterable[SimExecution]:
        return (e for e in self._executions.values() if e.created_at <= now)

    # -- HTTP ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app[SIMULATOR_KEY] = self
        app.router.add_get(STATUS_PATH, self.handle_status)
        add_admin_routes(app, self)
        return app

    async def handle_status(self, request: web.Request) -> web.StreamResponse:
        self.requests_total += 1
        if self.settings.latency_ms > 0:
            await asyncio.sleep(self.settings.latency_ms / 1000.0)
        now = self.now()
        key = request.headers.get("X-API-Key")
        if key is None or key not in self._keys:
            return self._answer("401", 401, UNAUTHORIZED_BODY)
        execution = self._executions.get(request.match_info["execution_id"])
        if execution is not None and execution.created_at > now:
            execution = None  # not created yet
        if execution is not None:
            execution.polls += 1
        admission = self._windows.admit(key, now)
        if not admission.allowed:
            return self._throttled(admission.retry_after_s)
        fault = self._faults.roll()
        if fault is Fault.DROP:
            return self._drop(request)
        if fault is Fault.ERROR:
            self._responses["5xx"] += 1
            return self._faults.error_response()
        if execution is None:
            status, body = 404, NOT_FOUND_BODY
        else:
            status, body = 200, _vendor_json(execution.body(now, self.clock, whole_seconds=self.settings.whole_seconds))
        if fault is Fault.MALFORMED:
            self._responses["malformed"] += 1
            return self._faults.malformed_response(body)
        return self._answer(str(status), status, body)

    def _answer(self, kind: str, status: int, body: bytes) -> web.Response:
        self._responses[kind] += 1
        return web.Response(status=status, body=body, content_type="application/json")

    def _throttled(self, retry_after_s: int) -> web.Response:
        limit = self.settings.rate_limit
        assert limit is not None  # only a limit refuses
        body = _vendor_json(
            {
                "error": {
                    "code": "rate_limited",
                    "message": f"Rate limit exceeded: {limit.limit} requests per {limit.window_s:g} s",
                }
            }
        )
        response = self._answer("429", 429, body)
        response.headers["Retry-After"] = str(retry_after_s)
        return response

    def _drop(self, request: web.Request) -> web.Response:
        """Close the connection without an answer. aiohttp then fails to write the response we
        return, treats it as a client that went away (a debug line, no traceback), and moves on."""
        self._responses["dropped"] += 1
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=200)


def _validate_create(count: int | None, ids: list[str] | None, duration_s: float, outcome: str | None) -> int:
    """How many executions a create asks for; SimulatorRequestError for anything unusable."""
    if count is not None and ids is not None:
        raise SimulatorRequestError("give either 'count' or 'ids', not both")
    if count is None and ids is None:
        raise SimulatorRequestError("give 'count' (a number of executions) or 'ids' (a list of IDs)")
    is_number = isinstance(duration_s, int | float) and not isinstance(duration_s, bool)
    if not is_number or not math.isfinite(duration_s) or duration_s <= 0:
        raise SimulatorRequestError("'duration_s' must be a number of seconds > 0")
    if outcome is not None and outcome not in tuple(PlannedOutcome):
        raise SimulatorRequestError(f"'outcome' must be one of {', '.join(PlannedOutcome)}")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise SimulatorRequestError("'ids' must be a non-empty list of execution IDs")
        for execution_id in ids:
            if not isinstance(execution_id, str) or not is_valid_execution_id(execution_id):
                shown = repr(execution_id)[:40]
                raise SimulatorRequestError(f"invalid execution ID {shown}: allowed are letters, digits, _ and -")
        if len(set(ids)) != len(ids):
            raise SimulatorRequestError("'ids' lists an ID more than once")
        return len(ids)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CREATE:
        raise SimulatorRequestError(f"'count' must be an integer from 1 to {MAX_CREATE}")
    return count


def _validate_stall(stall: Stall | None, duration_s: float) -> None:
    if stall is None:
        return
    if not 0 <= stall.at_s < duration_s:
        raise SimulatorRequestError("'stall.at_s' must be a number of seconds >= 0 and before 'duration_s'")
    if not (math.isfinite(stall.for_s) and stall.for_s > 0):
        raise SimulatorRequestError("'stall.for_s' must be a number of seconds > 0")
    if stall.then not in tuple(StallThen):
        raise SimulatorRequestError(f"'stall.then' must be one of {', '.join(StallThen)}")


async def start_simulator(
    settings: SimulatorSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve a new Simulator on host:port (0: a free port). Returns the runner and the base URL.

    Raises OSError when the address cannot be bound. `simulator_of(runner)` gives the Simulator.
    """
    simulator = Simulator(settings)
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown_host}:{bound_port}"


def simulator_of(runner: web.AppRunner) -> Simulator:
    return runner.app[SIMULATOR_KEY]
