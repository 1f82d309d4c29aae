"""Compare the adaptive policy against the backoff baseline over many seeds of many scenarios.

    .venv/bin/python benchmarks/tune_policy.py SCENARIO.toml... [--seeds 4] [--set floor_factor=1.3]...

Each scenario is re-planned with `--seeds` different seeds (the file's own seed first), so that a
change is judged on populations, not on one lucky draw. Backoff results are cached per scenario
and seed in the cache directory. Prints mean / p99 / max ratios (adaptive / backoff) per scenario
and their geometric means. Runs on all CPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from monitor import bench, vtime
from monitor.schedule.adaptive import AdaptivePolicy
from monitor.simulator.scenario import load_scenario

CACHE = Path(os.environ.get("TUNE_CACHE", Path(tempfile.gettempdir()) / "execmon-tune-cache"))


def _quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def run_one(path: str, seed: int, policy: str, params: dict[str, float]) -> dict[str, Any]:
    _quiet()
    scenario = dataclasses.replace(load_scenario(path), seed=seed)
    key = CACHE / f"{scenario.name}-{seed}-backoff.json"
    if policy == "backoff" and key.exists():
        return dict(json.loads(key.read_text()))
    factory = (lambda: AdaptivePolicy(**params)) if policy == "adaptive" else "backoff"
    result = vtime.run(bench.run_policy(scenario, factory)).as_json()
    if policy == "backoff":
        CACHE.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(result))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="adaptive parameter name=value")
    args = parser.parse_args()
    params = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
    jobs = []
    with ProcessPoolExecutor() as pool:
        for path in args.scenarios:
            base = load_scenario(path).seed
            for i in range(args.seeds):
                seed = base + 1000 * i
                for policy in ("backoff", "adaptive"):
                    jobs.append((path, seed, policy, pool.submit(run_one, path, seed, policy, params)))
        results: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for path, seed, policy, future in jobs:
            results.setdefault((path, seed), {})[policy] = future.result()
    logs: dict[str, list[float]] = {"mean_s": [], "p99_s": [], "max_s": []}
    print(f"params {params}")
    for path in args.scenarios:
        ratios: dict[str, list[float]] = {"mean_s": [], "p99_s": [], "max_s": []}
        bad = 0
        for (p, _seed), pair in results.items():
            if p != path:
                continue
            a, b = pair["adaptive"], pair["backoff"]
            bad += a["http_429"] + a["undetected"] + max(a["max_requests_in_window"] - 30, 0)
            for k, values in ratios.items():
                values.append(a[k] / b[k] if b[k] else 1.0)
        name = Path(path).stem
        cells = "  ".join(f"{k[:-2]} {_gmean(v):.2f} (worst {max(v):.2f})" for k, v in ratios.items())
        print(f"{name:16} {cells}{'  PROBLEMS ' + str(bad) if bad else ''}")
        for k, v in ratios.items():
            logs[k].extend(v)
    print("all              " + "  ".join(f"{k[:-2]} {_gmean(v):.3f}" for k, v in logs.items()))
    return 0


def _gmean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values)) if values else float("nan")


if __name__ == "__main__":
    sys.exit(main())
