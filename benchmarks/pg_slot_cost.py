"""The cost of one shared budget slot (PgLedger: take + done) against a local PostgreSQL.

    .venv/bin/python benchmarks/pg_slot_cost.py [--seconds 3] [--takers 1 3] [--window-ms 10]

Starts its own server from the `pgserver` wheel in a temporary directory (Unix socket, default
settings, nothing else running on it) and makes one database per measurement. Each taker is a
process of its own (a replica) with its own PgLedger and connection, all on ONE key, so they queue
on the key's row lock as replicas do. Two measurements for each number of takers, after a short
warm-up that is not counted:
- granted: take() until the deadline, each followed by done(); the limit is never reached. The window
  and timeout are tiny (--window-ms) so that the key's ledger holds a few tens of rows at most, as a
  real budget does (say 30 per 60 s), although thousands of slots go through each second;
- refused: take() on a key whose window is full (what a replica pays while another one holds the
  budget, or while the key is paused).
Prints a markdown table of round-trip latencies (ms) and throughput, after two baselines: a bare
round trip and a bare durable commit. A granted take commits durably (its row must survive a crash
of the server) and holds the key's row lock until the WAL is flushed, so on one key slots go one
fsync after another: the disk's fsync time bounds the rate of slots per key. done() and a refused
take commit without waiting for the flush (losing them in a crash only counts a row longer). Client
and server share this machine's cores, so with more takers than cores the figures include CPU
contention.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pgserver.postgres_server import PostgresServer, get_server  # a test extra: pip install -e '.[test]'

from monitor.state.pg.ledger import PgLedger, ensure_schema

KEY = "sk_benchmark"
_WARMUP_S = 0.5
_HUGE = 10**9  # a limit never reached


@dataclass(frozen=True, slots=True)
class Sample:
    take_ms: list[float]
    done_ms: list[float]


def _granted(url: str, index: int, seconds: float, window_s: float) -> Sample:
    """One replica taking and giving back slots as fast as it can."""
    take_ms: list[float] = []
    done_ms: list[float] = []
    with PgLedger(url, KEY, replica=f"bench-{index}") as ledger:
        start = time.perf_counter()
        while (now := time.perf_counter()) < start + _WARMUP_S + seconds:
            slot, _ = ledger.take(_HUGE, window_s, window_s)
            took = time.perf_counter()
            assert slot is not None
            ledger.done(slot)
            if now >= start + _WARMUP_S:
                take_ms.append((took - now) * 1000)
                done_ms.append((time.perf_counter() - took) * 1000)
    return Sample(take_ms, done_ms)


def _refused(url: str, index: int, seconds: float, _: float) -> Sample:
    """One replica asking for a slot of a full window, again and again."""
    take_ms: list[float] = []
    with PgLedger(url, KEY, replica=f"bench-{index}") as ledger:
        ledger.take(1, 3600.0, 60.0)  # fills the window (a second taker is refused at once)
        start = time.perf_counter()
        while (now := time.perf_counter()) < start + _WARMUP_S + seconds:
            slot, _ = ledger.take(1, 3600.0, 60.0)
            if now >= start + _WARMUP_S:
                assert slot is None
                take_ms.append((time.perf_counter() - now) * 1000)
    return Sample(take_ms, [])


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def _run(server: PostgresServer, *, takers: int, kind: str, seconds: float, window_s: float) -> str:
    name = f"bench_{kind}_{takers}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    url = str(server.get_uri(name))
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_schema(conn)
    work = _granted if kind == "granted" else _refused
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(takers, mp_context=context) as pool:
        futures = [pool.submit(work, url, i, seconds, window_s) for i in range(takers)]
        samples = [f.result() for f in futures]
    take = [ms for s in samples for ms in s.take_ms]
    done = [ms for s in samples for ms in s.done_ms]
    slot = [t + d for s in samples for t, d in zip(s.take_ms, s.done_ms, strict=True)] if done else take
    rate = len(take) / seconds
    done_cells = f"{_pct(done, 0.5):.3f} | {_pct(done, 0.99):.3f}" if done else "- | -"
    return (
        f"| {takers} | {kind} | {len(take)} | {rate:,.0f} | {_pct(take, 0.5):.3f} | {_pct(take, 0.99):.3f} "
        f"| {done_cells} | {_pct(slot, 0.5):.3f} | {_pct(slot, 0.99):.3f} |"
    )


def _baseline(server: PostgresServer, count: int = 300) -> tuple[str, float, float]:
    """The server's version, and what a bare round trip and a bare durable commit cost here."""
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (x int)")
        timings: dict[str, list[float]] = {"select": [], "insert": []}
        for _ in range(count):
            for kind, sql in (("select", "SELECT 1"), ("insert", "INSERT INTO bench_probe VALUES (1)")):
                start = time.perf_counter()
                conn.execute(sql)
                timings[kind].append((time.perf_counter() - start) * 1000)
    return str(row[0]) if row else "?", _pct(timings["select"], 0.5), _pct(timings["insert"], 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per row (after a warm-up)")
    parser.add_argument("--takers", type=int, nargs="+", default=[1, 3], help="concurrent takers (processes)")
    parser.add_argument("--window-ms", type=float, default=10.0, help="window and timeout of the granted runs")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="execmon-bench-pg-"))
    server = get_server(root / "data", cleanup_mode="delete")
    try:
        version, select_ms, commit_ms = _baseline(server)
        rows = [
            _run(server, takers=takers, kind=kind, seconds=args.seconds, window_s=args.window_ms / 1000)
            for takers in args.takers
            for kind in ("granted", "refused")
        ]
    finally:
        server.cleanup()
    print(
        f"PostgreSQL {version} (pgserver, Unix socket), {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}; {args.seconds:g} s per row. Baseline round trips (p50): "
        f"SELECT 1 {select_ms:.3f} ms, a durable one-row INSERT {commit_ms:.3f} ms (its WAL flush).\n"
    )
    print(
        "| takers | take | slots | per s | take p50 ms | take p99 ms | done p50 ms | done p99 ms "
        "| take+done p50 ms | take+done p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        "\nReproduce: .venv/bin/python benchmarks/pg_slot_cost.py "
        f"--seconds {args.seconds:g} --takers {' '.join(map(str, args.takers))} --window-ms {args.window_ms:g}"
    )


if __name__ == "__main__":
    main()
