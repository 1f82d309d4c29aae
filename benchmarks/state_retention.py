"""Bounded state: start-up, GET /v1/executions/{id} latency and memory with 10,000 and 1,000,000
delivered results in the state file, and how fast retention prunes them.

    .venv/bin/python benchmarks/state_retention.py [--sizes 10000,1000000] [--lookups 1000] [--dir DIR]

For each size it builds a state file as a daemon with one jsonl sink leaves it after that many
results: `Store.open` creates the schema, then plain sqlite fills it in big transactions (indexes
dropped and made again afterwards, which is quicker): per execution one terminal row with its
record and last status, and one delivered outbox row with a copy of the record, all ended 30 days
ago. Then, in a fresh Python process per size (so that memory is that process's own):
- `Store.open` time (lock, checks, quick_check) and the process's RSS right after it;
- `Monitor` start time on that file, then the real control API (the aiohttp app with its token,
  the `MonitorBackend` view) on loopback: 1,000 GET /v1/executions/{id} of random IDs (p50, p99),
  and GET /v1/executions?status=running&limit=100 (the list of what is being polled), and the RSS after;
- retention: `Store.prune(now, 7 d, batch=500)` called until nothing is left, as the daemon's
  retention task does: rows deleted per second and the longest single call (how long the loop is held).
Prints one table. A benchmark, not a test: nothing fails on a slow figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from monitor.config import load_config
from monitor.engine import Monitor
from monitor.records import Outcome, event_id
from monitor.secrets import Secret
from monitor.service.backend import MonitorBackend
from monitor.service.control import ControlServer, ControlState, create_control_app
from monitor.state.store import Store

DAY = 86400.0
TOKEN = "bench-retention-token"  # noqa: S105 -- a local benchmark's throwaway token
ROWS_PER_TRANSACTION = 100_000
PRUNE_BATCH = 500


def execution_id(n: int) -> str:
    return f"exec_{n:08d}"


def record_of(n: int, ended: str) -> dict[str, Any]:
    """A result record of a realistic size (about 600 bytes), as a completed execution's."""
    raw = {"execution_id": execution_id(n), "status": "completed", "progress": 100, "result": f"s3://results/{n}.json",
           "metadata": {"execution_time": 3600 + n % 600, "workers": 4}, "finished_at": ended}  # fmt: skip
    return {
        "event_id": event_id(execution_id(n), "completed"),
        "kind": "execution",
        "execution_id": execution_id(n),
        "outcome": "completed",
        "result": raw["result"],
        "error": None,
        "metadata": raw["metadata"],
        "progress": 100,
        "finished_at": ended,
        "observed_at": ended,
        "tracked_since": ended,
        "polls": 7,
        "group": None,
        "labels": {"kind": "etl"},
        "raw": raw,
    }


# -- building a state file ----------------------------------------------------------------------------


_EXECUTION = (
    "INSERT INTO executions (execution_id, tracked_since, labels_json, last_status_json, polls, terminal_outcome,"
    " terminal_at, record_json) VALUES (?, ?, ?, ?, 7, 'completed', ?, ?)"
)
_OUTBOX = (
    "INSERT INTO outbox (event_id, sink, kind, execution_id, record_json, attempts, next_attempt_at, state,"
    " created_at, updated_at) VALUES (?, 'jsonl', 'execution', ?, ?, 1, 0, 'delivered', ?, ?)"
)


def build(path: Path, count: int) -> None:
    Store.open(path).close()  # the schema exactly as execmon creates it
    ended_at = time.time() - 30 * DAY
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous=OFF")  # a benchmark's scratch file
        indexes = [
            row[0] for row in conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND sql NOT NULL")
        ]
        for sql in indexes:  # made again after the inserts: quicker than keeping them up to date
            conn.execute("DROP INDEX " + sql.split()[2])
        for start in range(0, count, ROWS_PER_TRANSACTION):
            rows = [_rows(n, ended_at) for n in range(start, min(count, start + ROWS_PER_TRANSACTION))]
            conn.execute("BEGIN")
            conn.executemany(_EXECUTION, [execution for execution, _ in rows])
            conn.executemany(_OUTBOX, [delivery for _, delivery in rows])
            conn.execute("COMMIT")
        for sql in indexes:
            conn.execute(sql)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _rows(n: int, ended_at: float) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """The executions row and the outbox row of result `n`."""
    record = record_of(n, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ended_at)))
    body = json.dumps(record, separators=(",", ":"))
    status = json.dumps(record["raw"], separators=(",", ":"))
    labels = json.dumps(record["labels"])
    terminal_at = ended_at + n * 1e-3
    execution = (record["execution_id"], ended_at - 3600, labels, status, terminal_at, body)
    return execution, (record["event_id"], record["execution_id"], body, terminal_at, terminal_at)


# -- measuring, in a process of its own ----------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: Path, count: int, lookups: int) -> dict[str, float]:
    figures: dict[str, float] = {"file_mb": path.stat().st_size / 2**20}
    for key in ("open_checked_ms", "open_ms"):  # written by another program, then as execmon left it
        started = time.perf_counter()
        store = Store.open(path)
        figures[key] = 1000 * (time.perf_counter() - started)
        figures["rss_open_mb"] = rss_mb()
        store.close()
    with Store.open(path) as store:  # what the Monitor's metrics task asks every 5 s
        started = time.perf_counter()
        for status in ("pending", "running", *(o.value for o in Outcome)):
            store.count_executions(status)
        figures["counts_ms"] = 1000 * (time.perf_counter() - started)
    figures.update(asyncio.run(serve(path, count, lookups)))
    figures.update(prune_all(path))
    return figures


async def serve(path: Path, count: int, lookups: int) -> dict[str, float]:
    """A Monitor on the file and its control API on loopback: start time, latencies, memory."""
    config = load_config(
        None,
        env={"EXECMON_API_KEY": "sk_bench_retention"},
        overrides={"api.base_url": "http://127.0.0.1:9", "state.retention": "3650d"},  # nothing to poll or prune
    )
    started = time.perf_counter()
    async with Monitor(config=config, state=path) as monitor:
        figures = {"start_ms": 1000 * (time.perf_counter() - started)}
        state = ControlState(token=Secret(TOKEN), backend=MonitorBackend(monitor), metrics=monitor.metrics)
        server = ControlServer(create_control_app(state), "127.0.0.1", 0)
        await server.start()
        try:
            figures.update(await latencies(server.url, count, lookups))
        finally:
            await server.stop()
        figures["rss_after_mb"] = rss_mb()
    return figures


async def latencies(url: str, count: int, lookups: int) -> dict[str, float]:
    rng = random.Random(9)
    ids = [execution_id(rng.randrange(count)) for _ in range(lookups)]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        for execution in ids[:20]:  # warm up the connection and the code paths
            await _get(session, f"{url}/v1/executions/{execution}")
        one = [await _get(session, f"{url}/v1/executions/{execution}") for execution in ids]
        running = [await _get(session, f"{url}/v1/executions?status=running&limit=100") for _ in range(50)]
    cuts = statistics.quantiles(one, n=100)
    return {"get_p50_ms": cuts[49], "get_p99_ms": cuts[98], "list_p50_ms": statistics.median(running)}


async def _get(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.get(url) as response:
        body = await response.json()
    elapsed = 1000 * (time.perf_counter() - started)
    if response.status != 200 or ("delivered" in body and body["delivered"] is not True):
        raise RuntimeError(f"GET {url}: {response.status} {body}")
    return elapsed


def prune_all(path: Path) -> dict[str, float]:
    calls: list[float] = []
    deleted = 0
    with Store.open(path) as store:
        now = time.time()
        while True:
            started = time.perf_counter()
            went = store.prune(now, 7 * DAY, batch=PRUNE_BATCH)
            calls.append(1000 * (time.perf_counter() - started))
            if went == 0:
                break
            deleted += went
        left = store.count_executions()
    if left:
        raise RuntimeError(f"{left} executions were not pruned")
    seconds = sum(calls) / 1000
    return {
        "prune_rows_per_s": deleted / seconds,
        "prune_call_p50_ms": statistics.median(calls),
        "prune_call_max_ms": max(calls),
    }


# -- the table ------------------------------------------------------------------------------------------


COLUMNS = [
    ("results", "{:,.0f}", "count"),
    ("file MB", "{:,.0f}", "file_mb"),
    ("Store.open, full check ms", "{:.1f}", "open_checked_ms"),
    ("Store.open ms", "{:.1f}", "open_ms"),
    ("RSS after open MB", "{:.0f}", "rss_open_mb"),
    ("Monitor start ms", "{:.1f}", "start_ms"),
    ("GET one p50 ms", "{:.2f}", "get_p50_ms"),
    ("GET one p99 ms", "{:.2f}", "get_p99_ms"),
    ("GET running list p50 ms", "{:.2f}", "list_p50_ms"),
    ("RSS after GETs MB", "{:.0f}", "rss_after_mb"),
    ("metrics counts ms", "{:.1f}", "counts_ms"),
    ("prune rows/s", "{:,.0f}", "prune_rows_per_s"),
    ("prune call p50 ms", "{:.1f}", "prune_call_p50_ms"),
    ("longest prune call ms", "{:.1f}", "prune_call_max_ms"),
]


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for _, fmt, key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def run_size(directory: Path, count: int, lookups: int) -> dict[str, float]:
    path = directory / f"state-{count}.db"
    started = time.perf_counter()
    build(path, count)
    print(f"built {path} ({count:,} results) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    argv = [sys.executable, __file__, "--measure", str(path), "--count", str(count), "--lookups", str(lookups)]
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout  # noqa: S603 -- ourselves
    return {"count": float(count), **json.loads(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,1000000", help="comma-separated result counts")
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="where to build the state files (default: a temporary directory)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the worker process
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.count, args.lookups)))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="execmon-retention-") as scratch:
        directory = args.dir or Path(scratch)
        print(table([run_size(directory, count, args.lookups) for count in sizes]))


if __name__ == "__main__":
    main()
