"""`execmon rm`: stop tracking executions (they are not cancelled on the vendor side)."""

from __future__ import annotations

import argparse
import json
import sys

from monitor.control_client import (
    ControlClient,
    NotTracked,
    add_config_argument,
    add_ids_argument,
    read_ids,
    target_from_config,
)

HELP = "Stop tracking executions in the running daemon (they go on running at the vendor)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_ids_argument(parser)
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print {removed, not_tracked} as JSON")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every ID was removed, 1 when some were not tracked."""
    ids = read_ids(args.ids, sys.stdin)
    removed: list[str] = []
    not_tracked: list[str] = []
    with ControlClient(target_from_config(args.config)) as client:
        for execution_id in ids:
            try:
                client.remove(execution_id)
            except NotTracked:
                not_tracked.append(execution_id)
            else:
                removed.append(execution_id)
    if args.json:
        print(json.dumps({"removed": removed, "not_tracked": not_tracked}))
    else:
        print(f"{len(removed)} removed" + (f", {len(not_tracked)} not tracked" if not_tracked else ""))
        for execution_id in not_tracked:
            print(f"execmon rm: {execution_id} is not tracked", file=sys.stderr)
    return 1 if not_tracked else 0
