"""A webhook that is down for 30 minutes, on virtual time (`monitor.vtime`), with the default sink
settings (max_age 24 h, circuit after 5 failures, backoff capped at 300 s).

The receiver is a real aiohttp server on loopback in the same (virtual-time) loop; "down" means
nothing listens on its port (connection refused) or it answers 503. When it is back it must get
every result exactly once (by Idempotency-Key), none dead-lettered, while the sink was hit far
less than once per result per backoff step, and polling went on undisturbed meanwhile.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

import monitor.testing
from monitor import Monitor, vtime
from monitor.clock import Clock
from monitor.config import SinkConfig
from monitor.delivery import Delivery
from monitor.records import Outcome, TerminalEvent
from monitor.sinks.registry import build_sinks
from monitor.state.store import Store, TrackRequest

OUTAGE_S = 1800.0
PROBE_CAP_S = 300.0  # the default backoff_cap_s: once back, the next probe comes within it


class Hook:
    """A webhook receiver in the running loop that can go down and come back on the same port."""

    def __init__(self) -> None:
        self.mode = "up"  # "up" | "refuse" (nothing listens) | "503" | "retry-after"
        self.accepted: Counter[str] = Counter()  # Idempotency-Key -> times answered 2xx
        self.posts: list[tuple[float, int]] = []  # (loop time, status answered)
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # also drops kept-alive connections
            self._runner = None

    async def go_down(self, mode: str) -> None:
        self.mode = mode
        if mode == "refuse":
            await self.stop()

    async def come_back(self) -> None:
        if self._runner is None:
            await self.start()
        self.mode = "up"

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        now = asyncio.get_running_loop().time()
        if self.mode == "retry-after":
            self.mode = "up"  # once
            self.posts.append((now, 503))
            return web.Response(status=503, headers={"Retry-After": "120"})
        if self.mode != "up":
            self.posts.append((now, 503))
            return web.Response(status=503)
        self.posts.append((now, 200))
        self.accepted[request.headers["Idempotency-Key"]] += 1
        return web.Response(status=204)


def event(n: int) -> TerminalEvent:
    return TerminalEvent(f"exec_{n:03d}", Outcome.COMPLETED, observed_at=2.0, tracked_since=1.0, polls=1)


def webhook_sink(url: str) -> list[SinkConfig]:
    return [SinkConfig(type="webhook", index=1, source="test", options={"url": url})]


@pytest.mark.parametrize("mode", ["refuse", "503"])
def test_a_webhook_down_for_30_minutes_gets_every_result_once_afterwards(tmp_path: Path, mode: str) -> None:
    async def main() -> tuple[int, float, int, int]:
        loop = asyncio.get_running_loop()
        hook = Hook()
        await hook.start()
        with Store.open(tmp_path / "state.db") as store:
            store.track_many(TrackRequest(f"exec_{n:03d}", tracked_since=1.0) for n in range(50))
            delivery = Delivery(store, build_sinks(webhook_sink(hook.url)), Clock(), rng=random.Random(9))
            async with delivery:
                await hook.go_down(mode)
                down_at = loop.time()
                for n in range(50):  # results keep coming during the outage (one every 30 s)
                    delivery.submit(event(n))
                    await asyncio.sleep(30)
                await asyncio.sleep(down_at + OUTAGE_S - loop.time())
                failed_while_down = delivery.counters()["webhook"].failed
                await hook.come_back()
                back_at = loop.time()
                assert await delivery.drain(timeout=2 * PROBE_CAP_S)
                caught_up_s = loop.time() - back_at
            dead = store.dead_count()
        await hook.stop()
        assert sorted(hook.accepted.values()) == [1] * 50, hook.accepted  # every result once
        return failed_while_down, caught_up_s, dead, len([p for p in hook.posts if p[0] < back_at])

    failed_while_down, caught_up_s, dead, posts_while_down = vtime.run(main())
    assert dead == 0
    # 50 results, 30 minutes: per-result retries would be hundreds of attempts; the open circuit
    # sends one probe at a time with a growing backoff.
    assert failed_while_down <= 40, failed_while_down
    assert posts_while_down == (0 if mode == "refuse" else failed_while_down)
    assert caught_up_s <= PROBE_CAP_S + 5


def test_retry_after_pauses_the_whole_webhook_sink(tmp_path: Path) -> None:
    async def main() -> list[tuple[float, int]]:
        hook = Hook()
        await hook.start()
        hook.mode = "retry-after"
        with Store.open(tmp_path / "state.db") as store:
            store.track_many(TrackRequest(f"exec_{n:03d}", tracked_since=1.0) for n in range(5))
            config = webhook_sink(hook.url)
            config[0].options["concurrency"] = 1
            async with Delivery(store, build_sinks(config), Clock()) as delivery:
                for n in range(5):
                    delivery.submit(event(n))
                assert await delivery.drain(timeout=600)
        await hook.stop()
        return hook.posts

    posts = vtime.run(main())
    assert [status for _, status in posts] == [503, 200, 200, 200, 200, 200]
    assert posts[1][0] - posts[0][0] >= 120  # nothing at all was sent during the Retry-After


def test_polling_goes_on_while_the_webhook_is_down_and_it_catches_up() -> None:
    async def main() -> tuple[list[float], int, Counter[str], int]:
        loop = asyncio.get_running_loop()
        async with monitor.testing.simulator(rate_limit="30/60s", seed=5) as sim:
            hook = Hook()
            await hook.start()
            await hook.go_down("refuse")
            down_at = loop.time()
            ids: list[str] = []
            for minutes in range(1, 26):  # two executions end every minute for 25 minutes
                ids += await sim.create(count=2, duration_s=60.0 * minutes, outcome="completed")
            async with Monitor(
                base_url=sim.url, api_key=sim.api_key, rate_limit="30/60s", sinks=[f"webhook:{hook.url}"]
            ) as mon:
                await mon.track(ids)
                delays = [
                    (result.observed_at - result.finished_at).total_seconds()
                    async for result in mon.results(ids)
                    if result.observed_at is not None and result.finished_at is not None
                ]
                accepted_before_back = sum(hook.accepted.values())
                await asyncio.sleep(down_at + OUTAGE_S - loop.time())
                await hook.come_back()
                assert await mon.delivery.drain(timeout=2 * PROBE_CAP_S)
                dead = mon.store.dead_count()
            await hook.stop()
        return delays, accepted_before_back, hook.accepted, dead

    delays, accepted_before_back, accepted, dead = vtime.run(main())
    assert len(delays) == 50  # every end was seen during the outage, as it happened
    assert max(delays) <= 90, sorted(delays)[-5:]  # the sink's outage did not slow polling down
    assert accepted_before_back == 0
    assert sorted(accepted.values()) == [1] * 50
    assert dead == 0
