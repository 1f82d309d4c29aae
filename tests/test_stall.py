"""The event-loop monitors: a blocked loop is reported with the blocking frame; lag is sampled."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from monitor.service.stall import StallMonitor, format_stack


def block(seconds: float) -> None:
    """Hold the event loop's thread (what a careless sync call inside a coroutine does)."""
    time.sleep(seconds)


def block_the_loop_for_a_while() -> None:
    time.sleep(0.5)  # the offending call: the warning's stack must name this function


async def test_a_blocked_loop_is_reported_once_with_the_offending_stack() -> None:
    stalls: list[tuple[float, str]] = []
    with capture_logs() as logs:
        async with StallMonitor(threshold_s=0.2, on_stall=lambda s, stack: stalls.append((s, stack))):
            await asyncio.sleep(0.05)
            block_the_loop_for_a_while()
            await asyncio.sleep(0.1)
    warnings = [e for e in logs if e["event"] == "event loop blocked"]
    assert len(warnings) == 1, logs
    warning = warnings[0]
    assert warning["log_level"] == "warning"
    assert 200 <= warning["blocked_ms"] < 500
    assert "block_the_loop_for_a_while" in warning["stack"]
    assert "time.sleep(0.5)" in warning["stack"]
    assert len(stalls) == 1
    assert "block_the_loop_for_a_while" in stalls[0][1]


async def test_short_blocks_and_a_busy_but_responsive_loop_are_not_stalls() -> None:
    with capture_logs() as logs:
        async with StallMonitor(threshold_s=0.2) as monitor:
            for _ in range(5):
                block(0.05)  # 50 ms at a time, well under the threshold
                await asyncio.sleep(0)
            await asyncio.sleep(0.3)
    assert monitor.stalls == 0
    assert not [e for e in logs if e["event"] == "event loop blocked"]


async def test_two_separate_stalls_are_two_warnings() -> None:
    with capture_logs() as logs:
        async with StallMonitor(threshold_s=0.1) as monitor:
            await asyncio.sleep(0.05)
            block(0.3)
            await asyncio.sleep(0.1)
            block(0.3)
            await asyncio.sleep(0.1)
    assert monitor.stalls == 2
    assert len([e for e in logs if e["event"] == "event loop blocked"]) == 2


async def test_lag_sampler_reports_how_late_the_loop_woke() -> None:
    samples: list[float] = []
    async with StallMonitor(threshold_s=5.0, lag_interval_s=0.05, on_lag=samples.append):
        await asyncio.sleep(0.12)
        block(0.2)  # the sampler's next wake-up is about 0.2 s late
        await asyncio.sleep(0.12)
    assert samples
    assert max(samples) >= 0.1
    assert min(samples) < 0.05


async def test_stop_ends_the_watchdog_thread_and_the_sampler() -> None:
    monitor = StallMonitor(threshold_s=0.2)
    monitor.start()
    thread = monitor._thread
    assert thread is not None
    assert thread.is_alive()
    await monitor.stop()
    assert not thread.is_alive()
    assert monitor._lag_task is None


def test_format_stack_without_a_frame() -> None:
    assert "no frame" in format_stack(None)
