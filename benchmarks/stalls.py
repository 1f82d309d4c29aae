"""Stall alarms on virtual time: recall, precision and delay of the `stalled` records.

    .venv/bin/python benchmarks/stalls.py [SCENARIO.toml...] [--policy adaptive|backoff] [--seed N] [--json]

Runs `execmon bench`'s machinery (the real scheduler with its stall detector, the real client and
simulator, on virtual time at the scenario's own budget) and compares the records with the plan:
- recall: of the planned stalls that lasted longer than the run's threshold (its `stall_after` at
  the last poll before the stall ended), the share that got a `stalled` record;
- precision: of the `stalled` records, the share that name a planned stall (the freeze reported
  began where the planned stall froze the run); a record for a run that did not stall is a false alarm;
- delay: from the moment a stall crossed its threshold (its last change + stall_after) to its
  record; compared with one round-robin period of the population, N / R (N: executions being
  watched when the records came, on average; R: the budget's requests per second);
- resumed: planned stalls that went on ("resume") and got their one `resumed` record.
Without arguments: the five scenarios of benchmarks/scenarios/public/beyond-linear (only
stalls.toml has stalls; on the others every record would be a false alarm).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from monitor import bench, vtime
from monitor.api.models import StatusRecord
from monitor.records import StallKind
from monitor.simulator.progress import SimExecution
from monitor.simulator.scenario import PlannedExecution, Scenario, load_scenario

DEFAULT_DIR = Path(__file__).parent / "scenarios" / "public" / "beyond-linear"


class _Recorder(bench.Recorder):
    """Also notes each watched stall's threshold at every poll (for recall's denominator)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, watched: set[str]) -> None:
        super().__init__(loop)
        self._watched = watched
        self.limits: dict[str, list[tuple[float, float]]] = {}

    def on_poll(self, execution_id: str, status: StatusRecord | None, error: str | None) -> None:
        if execution_id in self._watched and self.scheduler is not None:
            snap = self.scheduler.snapshot(execution_id)
            if snap is not None:
                self.limits.setdefault(execution_id, []).append((self._loop.time(), float(snap["stall_after_s"])))


def _truth(planned: PlannedExecution) -> tuple[float, float, float]:
    """(freeze start, stall start, stall end), seconds after the scenario's start."""
    assert planned.stall is not None
    run = SimExecution.create(
        execution_id=planned.execution_id,
        created_at=planned.arrival_s,
        duration_s=planned.duration_s,
        end_s=planned.end_s,
        outcome=planned.outcome,
        progress=planned.progress,
        seed=planned.seed,
        queue_s=planned.queue_s,
        stall=planned.stall,
    )
    stall_from = planned.arrival_s + planned.stall.at_s
    return run.last_change(stall_from), stall_from, planned.arrival_s + planned.stall.until_s


def _watching(plan: list[PlannedExecution], at: float) -> int:
    return sum(1 for p in plan if p.arrival_s + p.handover_s <= at < p.arrival_s + p.end_s)


def evaluate(scenario: Scenario, policy: str) -> dict[str, Any]:
    plan = scenario.plan()
    stalled = {p.execution_id: p for p in plan if p.stall is not None and p.exists}

    async def run() -> _Recorder:
        recorder = _Recorder(asyncio.get_running_loop(), set(stalled))
        await bench.run_policy(scenario, policy, recorder=recorder)
        return recorder

    recorder = vtime.run(run())
    truth = {i: _truth(p) for i, p in stalled.items()}
    hits: dict[str, float] = {}  # execution -> delay from crossing to record
    false_alarms, resumed = 0, Counter[str]()
    watching = []
    for at, event in recorder.stalls:
        rel = at - recorder.start
        if event.kind is StallKind.RESUMED:
            resumed[event.execution_id] += 1
            continue
        watching.append(_watching(plan, rel))
        began = event.last_change_at - (event.observed_at - rel)  # the freeze's start, scenario time
        known = truth.get(event.execution_id)
        if known is None or not known[0] - 1.0 <= began <= known[1] + 1.0 or event.execution_id in hits:
            false_alarms += 1
            continue
        hits[event.execution_id] = rel - (known[0] + event.stall_after_s)
    eligible = [i for i in stalled if _lasted_past_threshold(truth[i], recorder.limits.get(i, []), recorder.start)]
    rate = scenario.rate_limit.per_second
    period = statistics.fmean(watching) / rate if watching else 0.0
    delays = sorted(hits.values())
    going_on = [i for i in hits if stalled[i].stall is not None and stalled[i].outcome != "failed"]
    return {
        "scenario": scenario.name,
        "planned_stalls": len(stalled),
        "longer_than_stall_after": len(eligible),
        "reported": len(hits),
        "recall": sum(1 for i in eligible if i in hits) / len(eligible) if eligible else 1.0,
        "precision": len(hits) / (len(hits) + false_alarms) if hits or false_alarms else 1.0,
        "false_alarms": false_alarms,
        "delay_p50_s": bench.percentile(delays, 0.5),
        "delay_p90_s": bench.percentile(delays, 0.9),
        "delay_max_s": max(delays, default=0.0),
        "round_robin_period_s": period,
        "resumed_once": f"{sum(1 for i in going_on if resumed[i] == 1)}/{len(going_on)}",
        "resumed_extra": sum(n for i, n in resumed.items() if i not in going_on)
        + sum(n - 1 for i, n in resumed.items() if i in going_on and n > 1),
    }


def _lasted_past_threshold(truth: tuple[float, float, float], limits: list[tuple[float, float]], start: float) -> bool:
    """Did the freeze outlast the threshold in force at the run's last poll before the stall ended?"""
    began, _, ended = truth
    before = [limit for at, limit in limits if at - start < ended]
    return bool(before) and ended - began > before[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("scenarios", nargs="*", type=Path)
    parser.add_argument("--policy", default="adaptive", choices=("adaptive", "backoff"))
    parser.add_argument("--seed", type=int, default=None, help="replace each file's seed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    paths = args.scenarios or sorted(DEFAULT_DIR.glob("*.toml"))
    rows = []
    for path in paths:
        scenario = load_scenario(path)
        if args.seed is not None:
            scenario = dataclasses.replace(scenario, seed=args.seed)
        rows.append(evaluate(scenario, args.policy))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows)
    return 0


def _table(rows: list[dict[str, Any]]) -> None:
    head = (
        "| scenario | stalls (> stall_after) | stalled records | false alarms | recall | precision"
        " | delay p50 / p90 / max | N / R | resumed once |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        delays = f"{r['delay_p50_s']:.0f} / {r['delay_p90_s']:.0f} / {r['delay_max_s']:.0f} s" if r["reported"] else "-"
        period = f"{r['round_robin_period_s']:.0f} s" if r["reported"] else "-"
        print(
            f"| {r['scenario']} | {r['planned_stalls']} ({r['longer_than_stall_after']}) | {r['reported']}"
            f" | {r['false_alarms']} | {r['recall']:.2f} | {r['precision']:.2f} | {delays} | {period}"
            f" | {r['resumed_once']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
