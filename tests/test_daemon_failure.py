"""A daemon whose Monitor fails: /healthz turns 503 with the cause, the daemon stops, and
`execmon run` exits 1 (restartable) while `execmon watch` would exit 4. Real Monitor, real
simulator and control API on loopback; the failure is injected into one background task."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from monitor.cli import exit_status
from monitor.config import Config
from monitor.engine import Monitor
from monitor.errors import KeyRejectedError, MonitorFailed, StoreFault, UsageError
from monitor.rates import RateLimit
from monitor.service.daemon import Daemon, EngineLike, serve
from monitor.simulator.server import SimulatorSettings, start_simulator

KEY = "sk_test_daemon_failure"
TOKEN = "daemon-failure-token"


@pytest.fixture
async def sim_url() -> AsyncIterator[str]:
    runner, url = await start_simulator(SimulatorSettings(api_keys=[KEY], rate_limit=RateLimit(30, 3.0)))
    try:
        yield url
    finally:
        await runner.cleanup()


def _boom(*_args: object) -> None:
    raise RuntimeError("injected")


async def test_a_dead_task_turns_healthz_503_and_the_daemon_exits_with_monitor_failed(
    sim_url: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    config = tmp_path / "execmon.toml"
    config.write_text(
        f'[api]\nbase_url = "{sim_url}"\nrate_limit = "30/3s"\n'
        f'[state]\npath = "{tmp_path / "state.db"}"\n'
        f'[control]\nlisten = "127.0.0.1:{unused_tcp_port}"\ngrace_s = 2\n'
    )
    armed = asyncio.Event()

    def failing_monitor(loaded: Config) -> EngineLike:
        monitor = Monitor(config=loaded, state=loaded.state.path)

        def set_budget(used: int, free: float) -> None:
            if armed.is_set():
                _boom()

        monitor.metrics.set_budget = set_budget  # type: ignore[method-assign]
        return monitor

    env = {"EXECMON_API_KEY": KEY, "EXECMON_CONTROL_TOKEN": TOKEN}
    daemon = Daemon(config, env=env, engine_factory=failing_monitor, handle_signals=False, configure_logs=False)
    serving = asyncio.create_task(serve(daemon))
    url = f"http://127.0.0.1:{unused_tcp_port}/healthz"
    answers: list[tuple[int, str]] = []
    async with aiohttp.ClientSession() as session:
        while len(answers) < 1 or answers[-1][0] != 200:
            await asyncio.sleep(0.05)
            try:
                async with session.get(url) as answer:
                    answers.append((answer.status, await answer.text()))
            except aiohttp.ClientConnectionError:
                continue
        armed.set()
        # The metrics task runs every 5 s; the daemon must report the death while it shuts down.
        async with asyncio.timeout(15):
            while answers[-1][0] == 200 and not serving.done():
                await asyncio.sleep(0.02)
                try:
                    async with session.get(url) as answer:
                        answers.append((answer.status, await answer.text()))
                except aiohttp.ClientConnectionError:
                    break
    with pytest.raises(MonitorFailed, match="execmon-metrics") as raised:
        await asyncio.wait_for(serving, 15)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert exit_status(raised.value, "run") == 1
    # /healthz follows the backend's health: unhealthy from the failure on, naming the dead task.
    backend = daemon.state.backend
    assert backend is not None
    healthy, reason = backend.health()
    assert not healthy
    assert reason is not None
    assert "execmon-metrics" in reason


def test_exit_statuses_follow_the_contract() -> None:
    failed = MonitorFailed("internal task 'x' died")
    assert exit_status(failed, "run") == 1  # a supervisor restarts the daemon
    assert exit_status(failed, "watch") == 4  # the same command resumes
    assert exit_status(StoreFault("disk full"), "watch") == 4
    assert exit_status(KeyRejectedError("401"), "watch") == 3
    assert exit_status(UsageError("bad flag"), "run") == 2
