"""`execmon dead-letters`: list results that a sink never confirmed, and queue them again.

`--retry` writes the state file directly; while a daemon holds it, the daemon does it instead
(`POST /v1/dead-letters/retry` on the control API found through the same config) and sends the
dead letters at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monitor.clock import iso_utc
from monitor.config import Config, find_config_path, load_config
from monitor.control_client import ControlClient, ControlError, target_from_config
from monitor.errors import UsageError
from monitor.state.db import StateInUse
from monitor.state.rows import OutboxRow
from monitor.state.store import Store

HELP = "List undelivered results (dead letters) in a state file, or queue them for delivery again"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", help="the SQLite state file (default: the config's state.path)")
    parser.add_argument("--config", help="config file, for state.path (else $EXECMON_CONFIG, ./execmon.toml)")
    parser.add_argument("--sink", help="only this sink's dead letters")
    parser.add_argument(
        "--retry",
        nargs="?",
        const="all",
        metavar="EVENT_ID",
        help="make dead letters pending again (all, or one event); a running daemon sends them at once, "
        "else the next watch or daemon does",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _config(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def run(args: argparse.Namespace) -> int:
    path = str(args.state) if args.state else _config(args).state.path
    if args.retry is not None:
        return _retry(args, path, None if args.retry == "all" else args.retry)
    with Store.open(path, read_only=True) as store:
        rows = store.dead_letters(args.sink)
        orphans = _orphaned(store, args.sink)
    for row in rows:
        _show(row, "dead", row.last_error or "", as_json=args.json)
    for row in orphans:
        _show(row, "orphaned", f"pending for sink {row.sink!r}, which is not configured", as_json=args.json)
    if not args.json:
        print(f"{len(rows)} dead letter(s) in {path}")
        if orphans:
            names = ", ".join(repr(name) for name in dict.fromkeys(row.sink for row in orphans))
            print(
                f"{len(orphans)} result(s) wait for sinks no longer configured ({names}): configure the sink "
                "again under that name to deliver them"
            )
    return 0


def _orphaned(store: Store, sink: str | None) -> list[OutboxRow]:
    """Pending rows of sinks the last run did not have (they wait until such a sink is configured)."""
    configured = store.configured_sinks()
    if configured is None:
        return []
    names = [name for name in store.orphaned_counts(configured) if sink is None or name == sink]
    return store.pending_rows(names) if names else []


def _show(row: OutboxRow, state: str, reason: str, *, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "event_id": row.event_id,
                    "state": state,
                    "sink": row.sink,
                    "execution_id": row.execution_id,
                    "attempts": row.attempts,
                    "reason": reason,
                    "record": row.record,
                }
            )
        )
    else:
        print(
            f"{iso_utc(row.updated_at)}  {row.sink:<12} {row.execution_id or row.kind:<24} "
            f"attempts={row.attempts}  {reason}"
        )


def _retry(args: argparse.Namespace, path: str, event_id: str | None) -> int:
    try:
        with Store.open(path) as store:
            count = store.retry_dead(event_id, args.sink)
    except StateInUse as busy:
        count = _retry_in_daemon(args, path, event_id, busy)
        print(f"{count} dead letter(s) queued again by the running daemon, which sends them now")
        return 0
    print(f"{count} dead letter(s) queued again in {path}; the next `execmon watch --state` or `run` sends them")
    return 0


def _retry_in_daemon(args: argparse.Namespace, path: str, event_id: str | None, busy: StateInUse) -> int:
    """The state is held (by a daemon, we hope): ask the daemon of the same config to do it."""
    if args.state and Path(args.state).resolve() != Path(_config(args).state.path).resolve():
        raise UsageError(f"{busy} (and the config's daemon uses another state file, so it cannot retry these)")
    target = target_from_config(args.config)
    try:
        with ControlClient(target) as client:
            return client.retry_dead_letters(args.sink, event_id)
    except ControlError as exc:
        raise UsageError(f"{busy}; asking its daemon instead failed: {exc}") from None
