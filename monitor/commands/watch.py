"""`execmon watch`: the one-shot mode, for the terminal and for CI."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from monitor.config import FLAG_SOURCE, Config, ConfigError, load_config
from monitor.errors import UsageError
from monitor.ids import InvalidExecutionId, ids_from_arguments, validate_execution_id
from monitor.logs import configure_logging, get_logger
from monitor.rates import parse_duration
from monitor.sinks.registry import parse_sink_spec
from monitor.watch import WatchOptions, run_watch

HELP = "Watch execution IDs until each one ends, sending every result to the sinks"
log = get_logger(__name__)

# The config key each flag overrides, and back: an error names the flag the user typed.
FLAG_KEYS = {
    "--base-url": "api.base_url",
    "--rate-limit": "api.rate_limit",
    "--policy": "polling.policy",
    "--log-level": "logging.level",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="execution IDs, or '-' to read them from stdin")
    parser.add_argument("--config", help="TOML config file (see config.example.toml)")
    parser.add_argument("--base-url", help="API base URL (env EXECMON_BASE_URL)")
    parser.add_argument("--rate-limit", help="requests per window for the key, e.g. 30/60s, or 'none' (no limit)")
    # Checked with the config's own rules (not argparse choices), so a bad value is one line too.
    parser.add_argument("--policy", metavar="{adaptive,backoff}", help="polling policy (default adaptive)")
    parser.add_argument("--timeout", help="give up on an execution after this long (e.g. 600, 15m): timed_out")
    parser.add_argument(
        "--sink",
        action="append",
        metavar="SPEC",
        help="stdout | jsonl:PATH | webhook:URL | command:CMD | a plugin type (repeatable)",
    )
    parser.add_argument("--state", help="SQLite state file: a killed watch resumes from it")
    parser.add_argument("--group", help="the IDs form one batch; sinks with events=['group'] get one digest")
    parser.add_argument("--fail-fast", action="store_true", help="exit as soon as one ends other than completed")
    parser.add_argument("--quiet", action="store_true", help="no live view or per-change lines; warnings only")
    parser.add_argument("--log-level", help="debug | info | warning | error")


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as config overrides; each value checked alone, so an error names its flag."""
    overrides: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        try:
            load_config(None, env={}, overrides={key: value})
        except ConfigError as exc:
            message = str(exc).removeprefix(f"{FLAG_SOURCE}: key '{key}': ")
            raise UsageError(f"{flag}: {message}") from None
        overrides[key] = value
    return overrides


def _load(args: argparse.Namespace) -> Config:
    overrides = _flag_overrides(args)
    if args.sink:
        overrides["sinks"] = [parse_sink_spec(s) for s in args.sink]
    config = load_config(args.config, overrides=overrides)
    if not config.sinks:
        config = load_config(args.config, overrides={**overrides, "sinks": [{"type": "stdout"}]})
    return config


def _valid_ids(raw: list[str]) -> tuple[list[str], list[str]]:
    """Valid IDs in order, once each; invalid ones are reported and skipped (the rest are watched)."""
    valid: list[str] = []
    rejected: list[str] = []
    seen: set[str] = set()
    for execution_id in raw:
        try:
            validate_execution_id(execution_id)
        except InvalidExecutionId as exc:
            log.error("skipping an invalid ID", error=str(exc))
            rejected.append(execution_id)
            continue
        if execution_id in seen:
            log.warning("duplicate ID given; watched once", execution_id=execution_id)
            continue
        seen.add(execution_id)
        valid.append(execution_id)
    return valid, rejected


def _timeout_s(args: argparse.Namespace) -> float | None:
    if args.timeout is None:
        return None
    try:
        return parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None


def run(args: argparse.Namespace) -> int:
    config = _load(args)
    timeout_s = _timeout_s(args)  # every flag is checked before stdin is read
    live = sys.stderr.isatty() and not args.quiet
    level = "warning" if args.quiet else config.logging.level
    configure_logging(level, config.logging.format)
    ids, rejected = _valid_ids(ids_from_arguments(args.ids, sys.stdin))
    if not ids:
        raise UsageError("no valid execution IDs to watch: pass IDs as arguments, or '-' to read them from stdin")
    config.api_key()  # a missing key is a usage error before anything starts
    options = WatchOptions(
        ids=ids,
        state_path=args.state,
        group=args.group,
        timeout_s=timeout_s,
        fail_fast=args.fail_fast,
        quiet=args.quiet,
        live=live,
        rejected=rejected,
    )
    return asyncio.run(run_watch(config, options))
