"""`execmon add`: hand executions to the running daemon."""

from __future__ import annotations

import argparse
import json
import sys

from monitor.control_client import (
    ControlClient,
    add_config_argument,
    add_ids_argument,
    read_ids,
    target_from_config,
)
from monitor.errors import UsageError
from monitor.rates import parse_duration

HELP = "Hand executions to the running daemon (`execmon run`)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ids_argument(parser)
    add_config_argument(parser)
    parser.add_argument("--deadline", metavar="DURATION", help="give up after this long (e.g. 90m): timed_out")
    parser.add_argument("--label", action="append", default=[], metavar="K=V", help="a label (repeatable)")
    parser.add_argument("--group", metavar="NAME", help="the IDs form one batch, summed up in a group digest")
    parser.add_argument("--json", action="store_true", help="print {added, already_tracked} as JSON")


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {pair!r} is not of the form key=value")
        labels[key] = value
    return labels


def _deadline(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--deadline: {exc}") from None
    if seconds <= 0:
        raise UsageError("--deadline must be more than 0")
    return seconds


def run(args: argparse.Namespace) -> int:
    ids = read_ids(args.ids, sys.stdin)
    labels = parse_labels(args.label)
    deadline_s = _deadline(args.deadline)
    with ControlClient(target_from_config(args.config)) as client:
        result = client.track(ids, deadline_s=deadline_s, group=args.group, labels=labels)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(result['added'])} added, {len(result['already_tracked'])} already tracked")
    return 0
