"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest

pytest_plugins = ["pg"]  # tests/pg.py: a real PostgreSQL started by the tests


@pytest.fixture(autouse=True)
def _close_stray_event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """looptime's plugin makes the loop policy create a loop in sync tests that nobody closes;
    with warnings as errors, its garbage collection later fails an unrelated test. Close it."""
    yield
    if inspect.iscoroutinefunction(request.function):
        return
    policy = asyncio.get_event_loop_policy()
    loop = getattr(getattr(policy, "_local", None), "_loop", None)
    if loop is not None and not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Tests that run a command in-process configure logging (level, renderer); undo it after each
    test so that the next one sees structlog's defaults (capture_logs depends on that)."""
    yield
    from monitor.logs import reset_logging

    reset_logging()
