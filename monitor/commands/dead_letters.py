"""`execmon dead-letters`: list results that a sink never confirmed, and queue them again."""

from __future__ import annotations

import argparse
import json

from monitor.clock import iso_utc
from monitor.config import find_config_path, load_config
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
        help="make dead letters pending again (all, or one event); the next watch or daemon delivers them",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _state_path(args: argparse.Namespace) -> str:
    if args.state:
        return str(args.state)
    return load_config(find_config_path(args.config)).state.path


def run(args: argparse.Namespace) -> int:
    path = _state_path(args)
    if args.retry is not None:
        with Store.open(path) as store:
            event = None if args.retry == "all" else args.retry
            count = store.retry_dead(event, args.sink)
        print(f"{count} dead letter(s) queued again in {path}; the next `execmon watch --state` or `run` sends them")
        return 0
    with Store.open(path, read_only=True) as store:
        rows = store.dead_letters(args.sink)
    for row in rows:
        if args.json:
            print(
                json.dumps(
                    {
                        "event_id": row.event_id,
                        "sink": row.sink,
                        "execution_id": row.execution_id,
                        "attempts": row.attempts,
                        "reason": row.last_error,
                        "record": row.record,
                    }
                )
            )
        else:
            print(
                f"{iso_utc(row.updated_at)}  {row.sink:<12} {row.execution_id or row.kind:<24} "
                f"attempts={row.attempts}  {row.last_error or ''}"
            )
    if not args.json:
        print(f"{len(rows)} dead letter(s) in {path}")
    return 0
