"""`execmon simulate`: serve a local Executions API that speaks the vendor contract.

When ready it prints exactly one line, `listening on http://HOST:PORT`, on stdout; logs go to
stderr. With `--scenario FILE` every execution of the scenario appears at its arrival time
(divided by --speed, like durations) counted from the start; IDs that have not arrived yet answer
404 and are not listed by GET /_sim/executions. The scenario's rate_limit applies unless
--rate-limit is given. SIGTERM or SIGINT stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

from monitor.errors import UsageError
from monitor.logs import configure_logging, get_logger
from monitor.rates import DEFAULT_RATE_LIMIT, RateLimit, parse_rate_limit
from monitor.simulator.scenario import Scenario, default_scenario, load_scenario
from monitor.simulator.server import SimulatorSettings, simulator_of, start_simulator

HELP = "Serve a local Executions API (the vendor contract, rate limit and faults) for demos and tests."
KEYS_ENV = "EXECMON_SIM_API_KEYS"
DEFAULT_KEY = "sk_test_local"

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help=f"an accepted key (repeatable; default ${KEYS_ENV}, comma separated, else {DEFAULT_KEY})",
    )
    parser.add_argument(
        "--rate-limit",
        metavar="N/Ts",
        help="per-key sliding window, e.g. 30/60s, or 'none' (default: the scenario's, else 30/60s)",
    )
    parser.add_argument("--executions", type=int, default=0, metavar="N", help="create N executions at start")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X", help="run executions X times faster")
    parser.add_argument("--seed", type=int, default=0, help="seed for created executions and faults")
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        help="create a scenario's executions, each at its arrival time (divided by --speed) from the start",
    )
    parser.add_argument("--error-rate", type=float, default=0.0, metavar="F", help="fraction answered 5xx")
    parser.add_argument("--malformed-rate", type=float, default=0.0, metavar="F", help="fraction with a bad body")
    parser.add_argument("--drop-rate", type=float, default=0.0, metavar="F", help="fraction dropped unanswered")
    parser.add_argument("--latency-ms", type=float, default=0.0, metavar="MS", help="delay before every answer")
    parser.add_argument(
        "--whole-seconds",
        action="store_true",
        help="send timestamps in whole seconds, as the vendor's page shows them (default: milliseconds)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error (default info)")


def run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario) if args.scenario else None
    settings = settings_from_args(args, scenario)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {args.port}")
    if args.executions < 0:
        raise UsageError(f"--executions must be >= 0, got {args.executions}")
    configure_logging(args.log_level)
    return asyncio.run(serve(settings, args.host, args.port, scenario, args.executions))


def settings_from_args(args: argparse.Namespace, scenario: Scenario | None) -> SimulatorSettings:
    """SimulatorSettings from the flags and the environment; UsageError for anything unusable."""
    settings = SimulatorSettings(
        api_keys=api_keys(args.api_keys, os.environ.get(KEYS_ENV)),
        rate_limit=rate_limit(args.rate_limit, scenario),
        speed=args.speed,
        seed=args.seed,
        error_rate=args.error_rate,
        malformed_rate=args.malformed_rate,
        drop_rate=args.drop_rate,
        latency_ms=args.latency_ms,
        whole_seconds=args.whole_seconds,
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return settings


def api_keys(flags: list[str] | None, env_value: str | None) -> list[str]:
    if flags:
        return list(flags)
    from_env = [key.strip() for key in (env_value or "").split(",") if key.strip()]
    return from_env or [DEFAULT_KEY]


def rate_limit(text: str | None, scenario: Scenario | None) -> RateLimit | None:
    if text is None:
        return scenario.rate_limit if scenario else DEFAULT_RATE_LIMIT
    if text.strip().lower() == "none":
        return None
    try:
        return parse_rate_limit(text)
    except ValueError as exc:
        raise UsageError(f"--rate-limit: {exc}, or 'none'") from None


async def serve(settings: SimulatorSettings, host: str, port: int, scenario: Scenario | None, executions: int) -> int:
    try:
        runner, url = await start_simulator(settings, host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        simulator = simulator_of(runner)
        if scenario is not None:
            simulator.add_plan(scenario.plan())
        if executions:
            simulator.add_plan(default_scenario(executions, settings.seed).plan())
        with _stop_on_signals() as stop:  # before the line: a signal right after it must stop us cleanly
            print(f"listening on {url}", flush=True)
            log.info(
                "simulator ready",
                url=url,
                rate_limit=str(settings.rate_limit) if settings.rate_limit else "none",
                speed=settings.speed,
                scenario=scenario.name if scenario else None,
                executions=len(simulator.truth()),
            )
            await stop.wait()
        log.info("simulator stopping")
    finally:
        await runner.cleanup()
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while inside the block."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform's loop
            loop.add_signal_handler(signum, stop.set)
    try:
        yield stop
    finally:
        for signum in signals:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
