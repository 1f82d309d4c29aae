"""Scheduling at scale: cost per decision and memory per tracked execution, 1k to 100k executions.

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000] [--decisions 20000]

For each size, in a fresh process (so that memory is measured cleanly): track N executions through
the real `Scheduler.track` (schedule state, policy heaps, the ID map), give each a progress sample
as a first poll would, then time the decision path the scheduler runs per budget token:
`policy.choose(now)` then, for the "running" answer, recording the sample and `policy.polled`.
Prints a table: microseconds per decision and resident memory per tracked execution.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import subprocess
import sys
import time
from typing import Any

from monitor.api.models import StatusRecord
from monitor.clock import Clock
from monitor.rates import RateLimit
from monitor.schedule.budget import Budget
from monitor.schedule.policy import Policy, make_policy
from monitor.schedule.scheduler import Scheduler


class _NoSource:
    async def get_status(self, execution_id: str) -> StatusRecord:
        raise AssertionError("the benchmark makes no requests")


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(size: int, decisions: int, policy_name: str) -> dict[str, Any]:
    """One size, in this process: memory per execution and microseconds per decision."""
    loop = asyncio.new_event_loop()
    try:
        clock = Clock(loop)
        budget = Budget(RateLimit(30, 60.0), clock)
        policy = make_policy(policy_name)
        scheduler = Scheduler(_NoSource(), budget, policy, clock)
        rng = random.Random(size)
        ids = [f"exec_{i:012x}" for i in range(size)]
        gc.collect()
        before = _rss_bytes()
        for execution_id in ids:
            scheduler.track(execution_id)
        now = clock.now()
        _first_polls(scheduler, policy, ids, now, rng)
        gc.collect()
        per_execution = (_rss_bytes() - before) / size
        started = time.perf_counter()
        _decide(policy, decisions, now, rng)
        per_decision_us = (time.perf_counter() - started) / decisions * 1e6
        return {"size": size, "us_per_decision": per_decision_us, "bytes_per_execution": per_execution}
    finally:
        loop.close()


def _first_polls(scheduler: Scheduler, policy: Policy, ids: list[str], now: float, rng: random.Random) -> None:
    """Every execution answered once: one progress sample each, as after a first round."""
    for execution_id in ids:
        state = scheduler._states[execution_id]  # the benchmark plays the scheduler's part
        state.ver += 1  # out of the heaps, as `choose` takes it
        t = now + rng.uniform(0.0, 600.0)
        state.polls += 1
        state.last_poll = t
        state.add_sample(t, rng.randint(1, 60))
        policy.polled(state, t)


def _decide(policy: Policy, decisions: int, now: float, rng: random.Random) -> None:
    """What the scheduler does per token: choose, then handle a "running" answer."""
    t = now + 600.0
    for _ in range(decisions):
        state = policy.choose(t)
        if state is None:
            t += 2.0
            continue
        progress = min(98, (state.progress or 0) + rng.randint(0, 10))
        state.polls += 1
        state.progress = progress
        state.last_poll = t
        state.add_sample(t, progress)
        policy.polled(state, t)
        t += 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--policy", default="adaptive", choices=("adaptive", "backoff"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.decisions, args.policy)))
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        command = [sys.executable, __file__, "--one", str(size), "--decisions", str(args.decisions)]
        argv = [*command, "--policy", args.policy]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)  # noqa: S603  # this script
        rows.append(json.loads(done.stdout))
    base = rows[0]["us_per_decision"]
    print(f"policy {args.policy}: cost of one scheduling decision (choose + update) and memory per execution")
    print(f"{'tracked':>10}  {'us/decision':>12}  {'vs first':>8}  {'bytes/execution':>16}")
    for row in rows:
        ratio = row["us_per_decision"] / base
        print(
            f"{row['size']:>10,}  {row['us_per_decision']:>12.1f}  {ratio:>7.2f}x  {row['bytes_per_execution']:>16.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
