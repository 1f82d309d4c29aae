"""The daemon's lifecycle: start and refuse rules, signals, reload, shutdown (engine faked)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import requests
from control_fakes import FakeEngine
from e2e import free_port
from structlog.testing import capture_logs

from monitor.config import Config, ConfigError
from monitor.errors import UsageError
from monitor.service.daemon import Daemon

TESTS = Path(__file__).parent
TOKEN = "daemon-test-token"


def write_config(path: Path, *, listen: str, token_file: Path | None = None, grace_s: float = 3.0) -> Path:
    lines = ["[control]", f'listen = "{listen}"', f"grace_s = {grace_s}"]
    if token_file is not None:
        lines.append(f'token_file = "{token_file}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.token_file = tmp_path / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = write_config(
            tmp_path / "execmon.toml", listen=f"127.0.0.1:{self.port}", token_file=self.token_file
        )
        self.engines: list[FakeEngine] = []

    def factory(self, config: Config) -> FakeEngine:
        engine = FakeEngine(config)
        self.engines.append(engine)
        return engine

    def daemon(self, **kwargs: object) -> Daemon:
        return Daemon(
            self.config,
            env={},
            engine_factory=self.factory,
            backend_factory=lambda engine: engine.backend,
            validate_config=lambda _config: None,  # the fake engine needs no key and no sinks
            configure_logs=False,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def get(session: aiohttp.ClientSession, url: str, token: str | None = TOKEN) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response.status


# --- in process -------------------------------------------------------------------------------


async def test_start_serve_and_stop(setup: Setup, session: aiohttp.ClientSession) -> None:
    async with setup.daemon(handle_signals=False) as daemon:
        engine = setup.engines[0]
        assert engine.entered
        assert daemon.control_url == setup.url
        assert await get(session, setup.url + "/healthz", token=None) == 200
        assert await get(session, setup.url + "/v1/executions", token=None) == 401
        assert await get(session, setup.url + "/v1/executions") == 200
        assert await get(session, setup.url + "/metrics") == 200
        daemon.request_stop()
        await asyncio.wait_for(daemon.wait_stopped(), 1)
        assert await get(session, setup.url + "/healthz", token=None) == 503  # stopping, still answering
    assert engine.shutdowns == [3.0]
    assert engine.exited
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(session, setup.url + "/healthz")


async def test_healthz_follows_the_engine(setup: Setup, session: aiohttp.ClientSession) -> None:
    async with setup.daemon(handle_signals=False) as daemon:
        setup.engines[0].backend.health_state = (False, "the API key was rejected (401)")
        async with session.get(setup.url + "/healthz") as response:
            assert response.status == 503
            assert (await response.json())["reason"] == "the API key was rejected (401)"
        daemon.request_stop()


async def test_refuses_a_non_loopback_address_without_a_token(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", listen=f"0.0.0.0:{free_port()}")
    engines: list[FakeEngine] = []

    def factory(config: Config) -> FakeEngine:
        engines.append(FakeEngine(config))
        return engines[-1]

    daemon = Daemon(
        config, env={}, engine_factory=factory, backend_factory=lambda engine: engine.backend, configure_logs=False
    )
    with pytest.raises(UsageError, match="without a token"):
        await daemon.__aenter__()
    assert engines == []


async def test_without_a_configured_token_one_is_generated_and_kept(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "execmon.toml"
    config.write_text(f'[state]\npath = "{tmp_path / "s.db"}"\n[control]\nlisten = "127.0.0.1:{port}"\n')
    token_file = tmp_path / "s.db.token"

    def daemon() -> Daemon:
        return Daemon(
            config,
            env={},
            engine_factory=FakeEngine,
            backend_factory=lambda engine: engine.backend,
            validate_config=lambda _config: None,
            handle_signals=False,
            configure_logs=False,
        )

    async with daemon() as first:
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert await get(session, url + "/v1/executions", token=None) == 401
        assert await get(session, url + "/v1/executions", token=token) == 200
        assert await get(session, url + "/healthz", token=None) == 200
        assert await first.reload()
        assert await get(session, url + "/v1/executions", token=token) == 200
        token_file.unlink()  # rotation: delete the file, reload
        assert await first.reload()
        rotated = token_file.read_text().strip()
        assert rotated != token
        assert await get(session, url + "/v1/executions", token=token) == 401
        assert await get(session, url + "/v1/executions", token=rotated) == 200
        first.request_stop()
    async with daemon() as second:  # a restart reuses it
        assert token_file.read_text().strip() == rotated
        token = rotated
        assert await get(session, url + "/v1/executions", token=token) == 200
        second.request_stop()


async def test_port_in_use_fails_before_the_engine_starts(setup: Setup) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", setup.port))
        busy.listen()
        with pytest.raises(UsageError, match=f"127.0.0.1:{setup.port}.*in use"):
            await setup.daemon().__aenter__()
    assert setup.engines == []


async def test_sighup_reloads_and_sigterm_stops(setup: Setup, session: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        async with setup.daemon() as daemon:
            engine = setup.engines[0]
            setup.token_file.write_text("rotated-token\n")
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if engine.reloads:
                    break
                await asyncio.sleep(0.02)
            assert len(engine.reloads) == 1
            assert await get(session, setup.url + "/v1/executions", token="rotated-token") == 200
            assert await get(session, setup.url + "/v1/executions") == 401
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(daemon.wait_stopped(), 2)
    assert engine.shutdowns == [3.0]
    events = [e["event"] for e in logs]
    assert "config reloaded" in events
    assert "stop requested" in events


async def test_a_bad_new_config_is_refused_and_the_old_one_stays(setup: Setup, session: aiohttp.ClientSession) -> None:
    with capture_logs() as logs:
        async with setup.daemon(handle_signals=False) as daemon:
            engine = setup.engines[0]
            setup.config.write_text("[control\nlisten = ")
            assert await daemon.reload() is False
            setup.config.write_text('[control]\nlisten = "127.0.0.1:1"\ntoken_file = "/nonexistent/token"\n')
            assert await daemon.reload() is False
            assert engine.reloads == []
            assert await get(session, setup.url + "/v1/executions") == 200
            daemon.request_stop()
    refusals = [e for e in logs if e["event"] == "config reload refused; keeping the previous config"]
    assert len(refusals) == 2
    assert all(e["log_level"] == "error" for e in refusals)
    assert "invalid TOML" in refusals[0]["error"]


async def test_an_engine_refusing_the_new_config_keeps_the_old_token(
    setup: Setup, session: aiohttp.ClientSession
) -> None:
    async with setup.daemon(handle_signals=False) as daemon:
        engine = setup.engines[0]
        engine.reload_error = ConfigError("[[sinks]] #1 key 'type': expected a sink type, found 'nope'")
        setup.token_file.write_text("rotated-token\n")
        assert await daemon.reload() is False
        assert await get(session, setup.url + "/v1/executions") == 200
        engine.reload_error = RuntimeError("a bug")
        assert await daemon.reload() is False
        assert await get(session, setup.url + "/v1/executions") == 200
        daemon.request_stop()


# --- as a process -----------------------------------------------------------------------------

RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from control_fakes import FakeEngine
from monitor.service.daemon import run_daemon
slow = float(sys.argv[2])
def factory(config):
    engine = FakeEngine(config)
    engine.shutdown_delay_s = slow
    return engine
backend = lambda engine: engine.backend
sys.exit(run_daemon(sys.argv[1], engine_factory=factory, backend_factory=backend, validate_config=lambda c: None))
"""


@pytest.fixture
def spawn(setup: Setup) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def start_process(
    setup: Setup, procs: list[subprocess.Popen[str]], shutdown_delay_s: float = 0.0
) -> subprocess.Popen[str]:
    script = RUNNER.format(tests=str(TESTS))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(setup.config), str(shutdown_delay_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EXECMON_LOG_LEVEL": "info"},
    )
    procs.append(proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if requests.get(setup.url + "/healthz", timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the daemon did not become healthy in 15 s")


@pytest.mark.slow
def test_sigterm_exits_0_and_sighup_survives_a_bad_config(setup: Setup, spawn: list[subprocess.Popen[str]]) -> None:
    proc = start_process(setup, spawn)
    good = setup.config.read_text()
    setup.config.write_text("not toml at all [")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(setup.url + "/v1/executions", headers=headers, timeout=5).status_code == 200
    setup.config.write_text(good)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "config reload refused" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_second_signal_skips_the_grace(setup: Setup, spawn: list[subprocess.Popen[str]]) -> None:
    proc = start_process(setup, spawn, shutdown_delay_s=30.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "second stop signal" in err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["port in use", "no token off loopback", "missing config"])
def test_cli_start_errors_are_one_line_exit_2(tmp_path: Path, case: str) -> None:
    port = free_port()
    config = tmp_path / "execmon.toml"
    with socket.socket() as busy:
        if case == "port in use":
            busy.bind(("127.0.0.1", port))
            busy.listen()
            write_config(config, listen=f"127.0.0.1:{port}")
        elif case == "no token off loopback":
            write_config(config, listen=f"0.0.0.0:{port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECMON_")}
        result = subprocess.run(
            [sys.executable, "-m", "monitor", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("execmon run: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
