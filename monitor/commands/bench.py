"""`execmon bench`: the polling policies against each other on a scenario, on virtual time."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TextIO

from monitor.bench import DEFAULT_POLICIES, DELAY_MEASURED, INFORMED, PolicyResult, bench
from monitor.errors import UsageError
from monitor.logs import configure_logging
from monitor.schedule.policy import POLICY_NAMES
from monitor.simulator.scenario import load_scenario

HELP = "Benchmark the polling policies on a scenario file (virtual time: hours in seconds)"

_COLUMNS = (
    ("mean_s", "mean", "{:.1f}"),
    ("p50_s", "p50", "{:.1f}"),
    ("p90_s", "p90", "{:.1f}"),
    ("p99_s", "p99", "{:.1f}"),
    ("max_s", "max", "{:.1f}"),
    ("requests", "requests", "{:d}"),
    ("requests_per_execution", "req/exec", "{:.1f}"),
    ("http_429", "429s", "{:d}"),
    ("max_requests_in_window", "max/window", "{:d}"),
    ("undetected", "undetected", "{:d}"),
)
_RATIO_KEYS = ("mean_s", "p50_s", "p90_s", "p99_s", "max_s", "requests")
# (numerator, denominator): what the adaptive policy wins over the baseline, and what better
# prediction could still win (informed: perfect prediction of when each run would complete).
_RATIOS = (("adaptive", "backoff"), ("adaptive", INFORMED))
_MIN_DENOMINATOR = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", required=True, metavar="FILE", help="scenario file (TOML)")
    parser.add_argument(
        "--policy",
        action="append",
        choices=POLICY_NAMES,
        help="policy to run (repeatable; default: backoff and adaptive)",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="replace the scenario file's seed")
    parser.add_argument(
        "--whole-seconds",
        action="store_true",
        help="the simulator sends timestamps in whole seconds, as the vendor's page shows them",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    _quiet_logs()
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = dataclasses.replace(scenario, seed=args.seed)
    policies = tuple(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    if not policies:
        raise UsageError("give at least one --policy")
    results = bench(scenario, policies, whole_seconds=args.whole_seconds)
    if args.json:
        payload = {
            "scenario": scenario.name,
            "seed": scenario.seed,
            "timestamps": "whole seconds" if args.whole_seconds else "milliseconds",
            "delay": DELAY_MEASURED,
            "policies": {k: _json_row(v) for k, v in results.items()},
            "ratios": ratios(results),
        }
        print(json.dumps(payload))
    else:
        name = f"{scenario.name} (timestamps in whole seconds)" if args.whole_seconds else scenario.name
        print_table(name, results, sys.stdout)
    return 0


_SIMULATED = (*POLICY_NAMES, INFORMED)  # the rows that ran through the outbox (not the oracle)


def _json_row(result: PolicyResult) -> dict[str, float | int]:
    row = result.as_json()
    row.pop("wall_s", None)
    row.pop("not_found", None)
    return row


def ratios(results: dict[str, PolicyResult]) -> dict[str, dict[str, float | None]]:
    """{"adaptive/backoff": {"mean_s": ..., ...}, "adaptive/informed": {...}} for the pairs that ran;
    None where the denominator is under a millisecond (informed's p50 is ~0: no ratio means much)."""
    found: dict[str, dict[str, float | None]] = {}
    for top, bottom in _RATIOS:
        if top in results and bottom in results:
            a, b = results[top].as_json(), results[bottom].as_json()
            found[f"{top}/{bottom}"] = {k: a[k] / b[k] if b[k] >= _MIN_DENOMINATOR else None for k in _RATIO_KEYS}
    return found


def print_table(name: str, results: dict[str, PolicyResult], out: TextIO) -> None:
    """A plain table (seconds of detection delay), plus adaptive/backoff and adaptive/informed."""
    rows = [("policy", *(label for _, label, _ in _COLUMNS))]
    for policy, result in results.items():
        values = result.as_json()
        rows.append((policy, *(fmt.format(values[key]) for key, _, fmt in _COLUMNS)))
    for pair, ratio in ratios(results).items():
        rows.append((pair, *("" if (r := ratio.get(k)) is None else f"{r:.2f}" for k, _, _ in _COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"scenario {name}: detection delay in seconds ({DELAY_MEASURED})", file=out)
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)), file=out)
    simulated = {policy: r for policy, r in results.items() if policy in _SIMULATED}
    if simulated:
        polled = ", ".join(f"{policy} {r.poll_mean_s:.1f}" for policy, r in simulated.items())
        added_ms = max(1000 * (r.mean_s - r.poll_mean_s) for r in simulated.values())
        print(f"mean delay up to the poll's answer: {polled}; the outbox and sink add {added_ms:.3f} ms", file=out)


def _quiet_logs() -> None:
    """Warnings and errors only, on stderr: stdout carries the table or the JSON."""
    configure_logging("warning")
