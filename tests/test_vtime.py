"""The virtual-time loop: timers jump, loopback I/O and threads still work, aiohttp timeouts hold."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import ClientSession, ClientTimeout, web
from aiolimiter import AsyncLimiter

from monitor import vtime
from monitor.vtime import VirtualTimeLoop


def test_an_hour_of_sleep_takes_no_wall_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return start, loop.time()

    wall = time.perf_counter()
    start, end = vtime.run(main())
    assert time.perf_counter() - wall < 1.0
    assert end - start == pytest.approx(3600, abs=0.01)


def test_timers_fire_in_order_at_their_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[tuple[str, float]] = []
        done = loop.create_future()

        def fire(name: str) -> None:
            fired.append((name, loop.time() - start))

        for name, delay in (("c", 30.0), ("a", 10.0), ("b", 20.0)):
            loop.call_later(delay, fire, name)
        loop.call_later(40.0, done.set_result, None)
        await done
        return fired

    fired = vtime.run(main())
    assert [name for name, _ in fired] == ["a", "b", "c"]
    assert [at for _, at in fired] == pytest.approx([10.0, 20.0, 30.0], abs=0.01)


def test_a_self_rescheduling_callback_at_now_does_not_freeze_the_clock() -> None:
    # Float leftovers make some code reschedule itself for "now"; each iteration must cost a tick.
    async def main() -> int:
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = loop.create_future()
        spins = 0

        def again() -> None:
            nonlocal spins
            spins += 1
            if loop.time() - start >= 0.001:
                done.set_result(None)
            else:
                loop.call_at(loop.time(), again)

        again()
        await done
        return spins

    assert vtime.run(main()) < 10_000


def test_aiolimiter_paces_on_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        limiter = AsyncLimiter(1, 2.0)
        start = loop.time()
        for _ in range(10):
            await limiter.acquire()
        return loop.time() - start

    assert vtime.run(main()) == pytest.approx(18.0, abs=0.01)


def test_loopback_http_and_client_timeouts() -> None:
    async def main() -> tuple[str, float, float]:
        loop = asyncio.get_running_loop()

        async def fast(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def slow(_: web.Request) -> web.Response:
            await asyncio.sleep(20)
            return web.Response(text="late")

        app = web.Application()
        app.router.add_get("/fast", fast)
        app.router.add_get("/slow", slow)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with ClientSession(timeout=ClientTimeout(total=10)) as session:
                start = loop.time()
                async with session.get(f"http://127.0.0.1:{port}/fast") as resp:
                    text = await resp.text()
                fast_took = loop.time() - start
                start = loop.time()
                with pytest.raises(TimeoutError):
                    async with session.get(f"http://127.0.0.1:{port}/slow") as resp:
                        await resp.text()
                slow_took = loop.time() - start
        finally:
            await runner.cleanup()
        return text, fast_took, slow_took

    text, fast_took, slow_took = vtime.run(main())
    assert text == "ok"
    assert fast_took < 0.01  # loopback answers take (almost) no virtual time
    assert 10.0 <= slow_took < 11.5  # aiohttp rounds long timeouts up to the next second


def test_thread_work_takes_no_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiter = asyncio.ensure_future(asyncio.sleep(5))
        await asyncio.to_thread(time.sleep, 0.05)
        took = loop.time() - start
        await waiter
        return took

    assert vtime.run(main()) < 0.01  # the clock did not jump to the pending 5 s timer


def test_the_loop_class_can_be_used_directly() -> None:
    loop = VirtualTimeLoop(start=0.0)
    try:
        loop.run_until_complete(asyncio.sleep(100))
        assert loop.time() == pytest.approx(100, abs=0.01)
        assert loop.jumps >= 1
    finally:
        loop.close()
