"""`execmon status`: one tracked execution in detail."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from monitor.commands.ls import relative
from monitor.control_client import ControlClient, add_config_argument, target_from_config
from monitor.errors import UsageError
from monitor.ids import validate_execution_id

HELP = "Show one execution tracked by the running daemon."
TIME_FIELDS = ("tracked_since", "last_polled_at", "next_poll_at", "stalled_since")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="the execution ID")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the daemon's view as JSON")


def _value(key: str, value: Any, now: float) -> str:
    if value is None:
        text = "-"
    elif key in TIME_FIELDS:
        text = f"{value} ({relative(value, now)})"
    elif key == "progress":
        text = f"{value}%"
    elif key == "labels" and isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, dict | list):
        text = json.dumps(value)
    else:
        text = str(value)
    return text


def format_view(view: dict[str, Any], now: float) -> str:
    width = max(len(k) for k in view) + 1
    return "\n".join(f"{(key + ':').ljust(width)} {_value(key, value, now)}" for key, value in view.items())


def run(args: argparse.Namespace) -> int:
    execution_id = validate_execution_id(args.id)
    with ControlClient(target_from_config(args.config)) as client:
        view = client.get(execution_id)
    if not isinstance(view, dict):
        raise UsageError("the daemon's answer is not an execution")
    print(json.dumps(view) if args.json else format_view(view, time.time()))
    return 0
