"""`execmon run`: the daemon (state in SQLite, control API, runs until SIGTERM/SIGINT)."""

from __future__ import annotations

import argparse

from monitor.config import find_config_path
from monitor.control_client import add_config_argument
from monitor.service.daemon import run_daemon

HELP = "Run the daemon: track executions, deliver their results, serve the control API."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)


def run(args: argparse.Namespace) -> int:
    return run_daemon(find_config_path(args.config))
