"""The README's policy tables: `execmon bench --json` over several seeds for every public scenario.

    .venv/bin/python benchmarks/seeds_table.py [--seeds 1-5] [--jobs 2] [--whole-seconds] [--raw FILE] [FILE ...]

Without scenario files: benchmarks/scenarios/public/*.toml and benchmarks/scenarios/public/beyond-linear/*.toml.
Each (scenario, seed) is one `python -m monitor bench --scenario FILE --seed N --json` (backoff, adaptive, and
the informed and oracle rows), `--jobs` of them at a time; `--whole-seconds` passes that flag on (the
simulator sends timestamps cut to the second, as the vendor's page shows them). Prints markdown on stdout:
1. detection delay (s, end in the simulator -> record confirmed by the sink): mean, p99 and max of each
   row, each the mean over the seeds of that seed's figure;
2. the ratios adaptive/backoff and adaptive/informed: the mean over the seeds of each seed's ratio (as
   `../shared/acceptance/policy-seeds` computes them), the worst seed's, and the budget kept in every run
   (429s, the most requests in any window, undetected executions, over all simulated runs).
A scenario that `execmon bench` rejects (exit 2) is listed as skipped; any other failure ends with exit 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GLOBS = ("benchmarks/scenarios/public/*.toml", "benchmarks/scenarios/public/beyond-linear/*.toml")
ROWS = ("backoff", "adaptive", "informed", "oracle")
POLICIES = ("backoff", "adaptive", "informed")  # the simulated rows, whose budget is checked
FIGURES = ("mean_s", "p99_s", "max_s")
RATIOS = (("adaptive", "backoff"), ("adaptive", "informed"))
WALL_S = 600  # per (scenario, seed): a run that takes longer has a problem worth a failure

Run = dict[str, Any]  # one `execmon bench --json` output


def parse_seeds(text: str) -> list[int]:
    """`1-5` or `1,2,7` (or both: `1-3,9`)."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def bench_one(path: Path, seed: int, extra: Sequence[str] = ()) -> tuple[Run | None, str]:
    """One seed of one scenario: (the JSON, "") or (None, why); why starts with "skipped" on exit 2."""
    command = [sys.executable, "-m", "monitor", "bench", "--scenario", str(path), "--seed", str(seed), "--json"]
    command += extra
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=WALL_S, check=False)  # noqa: S603
    except subprocess.TimeoutExpired:
        return None, f"{path.name} seed {seed}: over {WALL_S} s"
    if done.returncode == 2:
        return None, f"skipped {path.name}: {done.stderr.strip()[-200:]}"
    if done.returncode != 0:
        return None, f"{path.name} seed {seed}: exit {done.returncode}: {done.stderr.strip()[-300:]}"
    try:
        return json.loads(done.stdout), ""
    except json.JSONDecodeError:
        return None, f"{path.name} seed {seed}: no JSON on stdout"


def ratio(runs: Sequence[Run], top: str, bottom: str, key: str) -> list[float]:
    """Per seed, top's figure / bottom's (inf when bottom's is 0)."""
    found = []
    for run in runs:
        a, b = run["policies"][top][key], run["policies"][bottom][key]
        found.append(a / b if b else float("inf"))
    return found


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def delay_table(results: dict[str, list[Run]], seeds: Sequence[int]) -> list[str]:
    lines = [
        f"Detection delay in seconds, end in the simulator -> record confirmed by the sink; "
        f"mean / p99 / max, each the mean over seeds {_seed_text(seeds)}:",
        "",
        "| scenario | " + " | ".join(ROWS) + " |",
        "|---|" + "---:|" * len(ROWS),
    ]
    for name, runs in results.items():
        cells = []
        for row in ROWS:
            figures = [mean([run["policies"][row][key] for run in runs]) for key in FIGURES]
            cells.append(" / ".join(_seconds(v) for v in figures))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(results: dict[str, list[Run]], seeds: Sequence[int]) -> list[str]:
    head = ["scenario"]
    for top, bottom in RATIOS:
        head += [f"{top}/{bottom} {label}" for label in ("mean", "worst seed", "p99", "max")]
    head.append("429s / max in window / undetected")
    lines = [
        f"Ratios: the mean over seeds {_seed_text(seeds)} of each seed's ratio; worst seed: the highest mean "
        "ratio, and its seed. The budget: over every run of backoff, adaptive and informed.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name, runs in results.items():
        cells = []
        for top, bottom in RATIOS:
            means = ratio(runs, top, bottom, "mean_s")
            worst = max(range(len(runs)), key=lambda i: means[i])
            cells += [
                f"{mean(means):.2f}",
                f"{means[worst]:.2f} (seed {runs[worst]['seed']})",
                f"{mean(ratio(runs, top, bottom, 'p99_s')):.2f}",
                f"{mean(ratio(runs, top, bottom, 'max_s')):.2f}",
            ]
        rows = [run["policies"][p] for run in runs for p in POLICIES]
        throttled = sum(r["http_429"] for r in rows)
        window = max(r["max_requests_in_window"] for r in rows)
        undetected = sum(r["undetected"] for r in rows)
        cells.append(f"{throttled} / {window} / {undetected}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 0.1 else f"{value:.2f}"


def _seed_text(seeds: Sequence[int]) -> str:
    ordered = sorted(seeds)
    if ordered == list(range(ordered[0], ordered[-1] + 1)) and len(ordered) > 2:
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(str(s) for s in ordered)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario files (default: both public folders)")
    parser.add_argument("--seeds", default="1-5", type=parse_seeds, help="e.g. 1-5 or 1000-1004 or 1,3 (default 1-5)")
    parser.add_argument("--jobs", default=2, type=int, help="benches at a time (default 2)")
    parser.add_argument("--whole-seconds", action="store_true", help="timestamps cut to the second (bench flag)")
    parser.add_argument("--raw", type=Path, metavar="FILE", help="also write every run's JSON to FILE")
    args = parser.parse_args(argv)
    extra = ["--whole-seconds"] if args.whole_seconds else []
    paths = args.scenarios or [p for pattern in DEFAULT_GLOBS for p in sorted(ROOT.glob(pattern))]
    seeds: list[int] = args.seeds
    started = time.monotonic()
    jobs = [(path, seed) for path in paths for seed in seeds]
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        outputs = list(pool.map(lambda job: bench_one(job[0], job[1], extra), jobs))
    results: dict[str, list[Run]] = {}
    skipped: dict[str, str] = {}
    failed: list[str] = []
    for (path, _), (run, why) in zip(jobs, outputs, strict=True):
        if run is not None:
            results.setdefault(run["scenario"], []).append(run)
        elif why.startswith("skipped"):
            skipped[path.name] = why
        else:
            failed.append(why)
    if args.raw is not None:
        args.raw.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if results:
        print("\n".join([*delay_table(results, seeds), "", *ratio_table(results, seeds)]))
    for why in [*skipped.values(), *failed]:
        print(why, file=sys.stderr)
    runs = sum(len(r) for r in results.values())
    print(f"\n{runs} runs of {len(results)} scenarios in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
