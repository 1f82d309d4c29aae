"""`execmon run`: the daemon's lifecycle around the engine.

Start: load the config, take the control token (the configured one, else the one generated beside
the state file at the first start: `monitor.service.control_token`), bind the control API (a busy
port fails here, before any state is opened), enter the engine, a `Monitor` (opens SQLite, resumes
every tracked execution), start the loop monitors.
If the Monitor fails (an internal task died, the state store stayed down past its grace period),
`/healthz` says 503 at once and the daemon stops and exits 1 (`MonitorFailed`), so that a supervisor
restarts it; the state on disk is intact and the restart resumes.
SIGTERM / SIGINT: stop taking work, let the engine finish or abandon in-flight polls within
`control.grace_s` and flush its sinks, exit 0; a second signal exits at once (state is durable).
SIGHUP: reload the config; a bad one is refused with a log line and the old one stays.

`Daemon` is an async context manager and signal handling is optional, so it can be embedded in
someone else's loop; `run_daemon` is the command's entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from monitor.config import Config, load_config
from monitor.engine import Monitor
from monitor.errors import MonitorFailed, UsageError
from monitor.events import Event, KeyRejected, KeyRestored
from monitor.logs import configure_logging, get_logger
from monitor.metrics import Metrics
from monitor.rates import format_rate_limit
from monitor.secrets import Secret
from monitor.service.control import (
    ControlBackend,
    ControlServer,
    ControlState,
    check_listen_allowed,
    create_control_app,
)
from monitor.service.control_token import load_or_create_token, token_path
from monitor.service.stall import StallMonitor
from monitor.state.pg import redact_url

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCED_EXIT_STATUS = 130


class EngineLike(Protocol):
    """What the daemon needs from `monitor.engine.Monitor`."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def failure(self) -> MonitorFailed | None: ...

    async def wait_failed(self) -> MonitorFailed: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Any: ...

    async def reload(self, config: Config) -> None: ...

    async def shutdown(self, grace_s: float) -> None: ...


EngineFactory = Callable[[Config], EngineLike]
BackendFactory = Callable[[Any], ControlBackend]
ConfigCheck = Callable[[Config], None]


def check_engine_config(config: Config) -> None:
    """What the engine will need, checked without starting anything: the API key and the sinks."""
    from monitor.sinks.registry import build_sinks  # noqa: PLC0415 - imported late, as the engine

    config.api_key()
    build_sinks(config.sinks)


def default_engine_factory(config: Config) -> EngineLike:
    from monitor.engine import Monitor  # noqa: PLC0415 - imported late: the heavy part of the daemon

    engine: EngineLike = Monitor(config=config, state=config.state.url or config.state.path)
    return engine


def default_backend_factory(engine: Any) -> ControlBackend:
    from monitor.service.backend import MonitorBackend  # noqa: PLC0415 - with the engine, late

    return MonitorBackend(engine)


class Daemon:
    """The running service. `async with Daemon(path) as d: await d.wait_stopped()`."""

    def __init__(
        self,
        config_path: str | Path | None,
        *,
        env: Mapping[str, str] | None = None,
        engine_factory: EngineFactory = default_engine_factory,
        backend_factory: BackendFactory = default_backend_factory,
        validate_config: ConfigCheck = check_engine_config,
        handle_signals: bool = True,
        configure_logs: bool = True,
        stall_threshold_s: float = 0.2,
    ) -> None:
        self.config_path = None if config_path is None else Path(config_path)
        self._env = env
        self._engine_factory = engine_factory
        self._backend_factory = backend_factory
        self._watchdog: asyncio.Task[None] | None = None
        self.failure: MonitorFailed | None = None
        self._validate_config = validate_config
        self._handle_signals = handle_signals
        self._configure_logs = configure_logs
        self._stall_threshold_s = stall_threshold_s
        self._stack = AsyncExitStack()
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[bool]] = set()
        self._signals: list[signal.Signals] = []
        self._config: Config | None = None
        self._engine: EngineLike | None = None
        self._server: ControlServer | None = None
        self.state = ControlState()

    @property
    def config(self) -> Config:
        assert self._config is not None, "the daemon is not started"
        return self._config

    @property
    def control_url(self) -> str:
        assert self._server is not None, "the daemon is not started"
        return self._server.url

    def _load(self) -> Config:
        return load_config(self.config_path, env=os.environ if self._env is None else self._env)

    async def __aenter__(self) -> Daemon:
        config = self._load()
        if self._configure_logs:
            configure_logging(config.logging.level, config.logging.format)
        try:
            await self._start(config)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self, config: Config) -> None:
        host, port = config.control.listen
        configured = config.control_token()
        check_listen_allowed(host, configured)
        self._validate_config(config)  # a missing key or a bad sink: refused before anything is bound or opened
        self.state.token = _or_generated(configured, config)
        self._config = config
        app = create_control_app(self.state, max_body_bytes=config.control.max_body_bytes, listen_host=host)
        self._server = ControlServer(app, host, port)
        await self._server.start()
        self._stack.push_async_callback(self._server.stop)
        engine = self._engine_factory(config)
        await self._stack.enter_async_context(engine)
        self._engine = engine
        metrics = engine.metrics
        self.state.metrics = metrics
        stall = StallMonitor(
            threshold_s=self._stall_threshold_s,
            on_lag=metrics.set_loop_lag,
            on_stall=lambda _blocked_s, _stack: metrics.loop_stalled(),
        )
        await self._stack.enter_async_context(stall)
        if self._handle_signals:
            self._install_signal_handlers()
        if isinstance(engine, Monitor):
            engine.subscribe(_log_key_events)
        self.state.backend = self._backend_factory(engine)  # from now on /healthz follows the engine
        self._watchdog = asyncio.get_running_loop().create_task(self._stop_on_failure(engine), name="execmon-watchdog")
        log.info("daemon started", control=self._server.url, config=config.source, state=_state_name(config))

    async def _stop_on_failure(self, engine: EngineLike) -> None:
        """The Monitor failed: /healthz already says why; stop, and `serve` exits 1."""
        self.failure = await engine.wait_failed()  # already logged by the Monitor's supervisor
        self.request_stop()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.state.stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._reload_tasks):
            task.cancel()
        try:
            if self._engine is not None:
                grace_s = self.config.control.grace_s
                log.info("stopping", grace_s=grace_s)
                await self._engine.shutdown(grace_s)
        finally:
            await self._stack.aclose()
            self._engine = None
            # Removed last: a second SIGTERM/SIGINT during the grace period must still find our handler.
            self._remove_signal_handlers()
        log.info("daemon stopped")

    async def wait_stopped(self) -> None:
        """Return once a stop was requested (signal or `request_stop`)."""
        await self._stopped.wait()

    def request_stop(self) -> None:
        self.state.stopping = True  # refuse new executions at once, before the shutdown starts
        self._stopped.set()

    # --- reload --------------------------------------------------------------------------------

    def request_reload(self) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self.reload(), name="execmon-reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)
        return task

    async def reload(self) -> bool:
        """Apply a new config from the same file; refuse it (keeping the old) if anything is wrong."""
        async with self._reload_lock:
            old = self.config
            try:
                new = self._load()
                configured = new.control_token()
                check_listen_allowed(old.control.listen[0], configured)  # listen changes on a restart only
                token = _or_generated(configured, new)
            except UsageError as exc:
                log.error("config reload refused; keeping the previous config", error=str(exc))
                return False
            if self._engine is None:
                return False
            try:
                await self._engine.reload(new)
            except UsageError as exc:
                log.error("config reload refused; keeping the previous config", error=str(exc))
                return False
            except Exception:
                log.exception("config reload failed; keeping the previous config")
                return False
            self._apply(old, new, token)
            return True

    def _apply(self, old: Config, new: Config, token: Secret) -> None:
        self.state.token = token
        self._config = new
        if self._configure_logs:
            configure_logging(new.logging.level, new.logging.format)
        for key in ("listen", "max_body_bytes"):
            if getattr(new.control, key) != getattr(old.control, key):
                log.warning("a control setting changed: it takes effect on restart", key=f"control.{key}")
        log.info(
            "config reloaded", config=new.source, rate_limit=format_rate_limit(new.api.rate_limit), sinks=len(new.sinks)
        )

    # --- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            handler = self._on_reload_signal if sig == signal.SIGHUP else self._on_stop_signal
            try:
                loop.add_signal_handler(sig, handler, sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or not Unix
                continue
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stopped.is_set():
            # State is durable (a kill -9 loses nothing): an impatient second signal may skip the grace.
            log.warning("second stop signal: exiting now", signal=sig.name)
            os._exit(FORCED_EXIT_STATUS)
        log.info("stop requested", signal=sig.name)
        self.request_stop()

    def _on_reload_signal(self, sig: signal.Signals) -> None:
        log.info("reload requested", signal=sig.name)
        self.request_reload()


def _or_generated(configured: Secret | None, config: Config) -> Secret:
    """The configured token, else the generated one beside the state file (made at the first start)."""
    return configured if configured is not None else load_or_create_token(token_path(config))


def _log_key_events(event: Event) -> None:
    if isinstance(event, KeyRejected):
        # The reason says which answer: "401 unauthorized" or "forbidden (403)".
        log.error(
            "the API key was rejected: polling has stopped; fix the key, then reload (SIGHUP)", reason=event.reason
        )
    elif isinstance(event, KeyRestored):
        log.info("a new API key was loaded: polling goes on")


async def serve(daemon: Daemon) -> int:
    """Until a stop signal (0) or a Monitor failure (raises MonitorFailed: `execmon run` exits 1)."""
    async with daemon:
        await daemon.wait_stopped()
    if daemon.failure is not None:
        raise MonitorFailed(str(daemon.failure)) from daemon.failure.__cause__
    return 0


def run_daemon(
    config_path: str | Path | None,
    *,
    engine_factory: EngineFactory = default_engine_factory,
    backend_factory: BackendFactory = default_backend_factory,
    validate_config: ConfigCheck = check_engine_config,
) -> int:
    """`execmon run`: serve until SIGTERM/SIGINT, then exit 0. Config and bind errors raise UsageError."""
    daemon = Daemon(
        config_path, engine_factory=engine_factory, backend_factory=backend_factory, validate_config=validate_config
    )
    return asyncio.run(serve(daemon))


def _state_name(config: Config) -> str:
    """Where the state lives, for the log: the file, or the database URL without its password."""
    return redact_url(config.state.url) if config.state.url else config.state.path
