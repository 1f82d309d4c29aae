"""Test helpers for code that uses execmon: a local Executions API served in your test's event loop.

`simulator()` serves execmon's simulator (the vendor's status endpoint, its 401/404/429 answers
and rate limit, plus ground truth) on a free loopback port, in the running event loop: no
subprocess, no network, nothing left behind. Point a `Monitor` at `sim.url` with `sim.api_key`::

    import monitor.testing
    from monitor import Monitor, Outcome


    async def test_my_pipeline_sees_every_end() -> None:
        async with monitor.testing.simulator(rate_limit="30/3s") as sim:
            ids = await sim.create(count=3, duration_s=0.5, outcome="completed")
            async with Monitor(base_url=sim.url, api_key=sim.api_key, rate_limit="30/3s") as mon:
                await mon.track(ids)
                done = await mon.wait(ids, timeout=30)
        assert {r.outcome for r in done.values()} == {Outcome.COMPLETED}
        assert sim.stats()["max_requests_in_window"] <= 30

Executions run on the loop's clock, `speed` times faster than their nominal duration.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from monitor.rates import parse_rate_limit
from monitor.simulator.admin import ground_truth
from monitor.simulator.server import Simulator, SimulatorSettings, simulator_of, start_simulator

__all__ = ["LocalSimulator", "simulator"]


class LocalSimulator:
    """A running simulator: where it listens, the key it accepts, and its ground truth."""

    def __init__(self, simulator: Simulator, url: str, api_key: str) -> None:
        self._simulator = simulator
        self.url = url  # the base URL to give Monitor(base_url=...)
        self.api_key = api_key
        self.seed = simulator.settings.seed  # the seed in use: pass it back to replay a run

    def __repr__(self) -> str:  # without the key
        return f"<LocalSimulator {self.url} seed={self.seed}>"

    async def create(
        self,
        *,
        count: int | None = None,
        ids: list[str] | None = None,
        duration_s: float = 1.0,
        outcome: str | None = None,
    ) -> list[str]:
        """Start executions now and return their IDs: `count` new ones, or exactly `ids`.

        Each ends after `duration_s / speed` seconds as `outcome` ("completed", "failed" or
        "cancelled"; None: a seeded random mix). Raises ValueError for a bad value or an ID
        that exists already.
        """
        return self._simulator.create(count=count, ids=ids, duration_s=duration_s, outcome=outcome)

    async def revoke(self, key: str) -> None:
        """From now on, status requests with `key` are answered 401."""
        self._simulator.revoke(key)

    def stats(self) -> dict[str, Any]:
        """Requests served (`requests_total`), answers by kind (`responses`: "200", "429", ...),
        `max_requests_in_window` (to check a rate limit was kept) and executions by status."""
        return self._simulator.stats()

    def truth(self) -> list[dict[str, Any]]:
        """What really happened to each execution created so far (GET /_sim/executions):
        `execution_id`, `status`, `progress`, `created_at`, `ended_at` (ISO UTC) and `polls`."""
        executions: list[dict[str, Any]] = ground_truth(self._simulator)["executions"]
        return executions


@asynccontextmanager
async def simulator(
    *,
    rate_limit: str | None = "30/3s",
    api_key: str = "sk_test_local",
    speed: float = 1.0,
    seed: int | None = None,
) -> AsyncIterator[LocalSimulator]:
    """Serve a simulator on 127.0.0.1 (a free port) for the duration of the `async with`.

    `rate_limit`: "N/Ts" requests per sliding window per key, answered 429 beyond it (None: no
    limit). `speed`: executions run this many times faster. `seed`: makes IDs and random outcomes
    repeatable (None: a fresh one, shown as `sim.seed`). Raises ValueError for a bad setting.
    """
    settings = SimulatorSettings(
        api_keys=[api_key],
        rate_limit=None if rate_limit is None else parse_rate_limit(rate_limit),
        speed=speed,
        seed=random.SystemRandom().randrange(2**31) if seed is None else seed,
    )
    runner, url = await start_simulator(settings)
    try:
        yield LocalSimulator(simulator_of(runner), url, api_key)
    finally:
        await runner.cleanup()
