"""Replicas on PostgreSQL, end to end: the shared budget with 1, 2 and 3 replicas, the cost of one slot,
failover after a SIGKILL, and 100,000 executions tracked across three replicas.

    .venv/bin/python benchmarks/replicas.py [--measure-s 30] [--warmup-s 8] [--executions 100000]

Needs the test extra (`pip install -e '.[test]'`: pgserver). Everything runs on this machine and is
started by the script: a PostgreSQL from the `pgserver` wheel in a temporary directory (Unix socket,
default settings; one database per part), a fresh `execmon simulate` per part at 30/3s, and real
`execmon run` replicas (`python -m monitor run`) with `[state] url` on that database and the same
`rate_limit = "30/3s"`. All of it is stopped and the directory deleted at the end, on Ctrl-C or on
a failure too. Takes about 6 minutes; every figure comes from one run (no repetitions).

1. Budget: N replicas track 300 executions that run for an hour (added through one replica's
   control API; the leases spread them); after the spread and a warm-up, the simulator's
   `requests_total` is read before and after `--measure-s` seconds. The mean per 3 s window is
   compared with the limit (30); `max_requests_in_window` and the 429s are the simulator's, over the
   whole life of that part's simulator (warm-up included).
2. One slot: benchmarks/pg_slot_cost.py's measurement (take + done of PgLedger on one key) on this
   script's server; run that script for its full table.
3. Failover: 3 replicas, 300 executions; one replica (not the one they were added through) is
   killed with SIGKILL; the executions table is read every 0.2 s (first and last of its executions
   owned by another replica) and the simulator's poll counts every 0.5 s (every one of them polled
   again). With the default lease_s = 30 (right after the 3-replica budget part) and lease_s = 20.
4. 100,000 executions: created in the simulator, added through replica a's control API in chunks of
   5,000; once each replica holds its third, each replica's VmRSS minus its VmRSS before anything
   was tracked, per execution it holds. Then, for --sample-s seconds: each replica's
   `execmon_event_loop_lag_seconds` scraped every 0.2 s (the gauge is the last 0.1 s sample, so the
   max is a lower bound of the worst lag), how long a /metrics answer took (it waits for a blocked
   loop), the loop stalls the replicas logged (> 0.2 s, with the stack: those inside a claim cycle are
   counted apart), and the claim cycle's SQL statements as PostgreSQL times them
   (log_min_duration_statement = 0 for that stretch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from pgserver.postgres_server import PostgresServer, get_server  # a test extra: pip install -e '.[test]'

RATE = "30/3s"
LIMIT = 30
WINDOW_S = 3.0
API_KEY = "sk_bench_replicas"
LISTENING = re.compile(r"^listening on (http://\S+)\s*$")
LONG_S = 3600.0  # executions that outlast every measurement
CHUNK = 5000  # IDs per control API request
REPO = Path(__file__).resolve().parents[1]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(method: str, url: str, body: object = None, token: str | None = None, timeout_s: float = 60) -> Any:
    """One JSON request; fails on an HTTP error."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (loopback)
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310
        raw = answer.read()
    return json.loads(raw) if raw else None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


# -- processes -------------------------------------------------------------------------------------


@dataclass
class Procs:
    """Every child process this script started, stopped (and reaped) at the end whatever happens."""

    children: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(
        self, args: Sequence[str], *, err: Path, env: dict[str, str], out: Path | None = None
    ) -> subprocess.Popen[str]:
        """`python -m monitor ARGS`, stderr appended to `err`, stdout to `out` (None: a pipe)."""
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(err.open("a"))
            stdout = subprocess.PIPE if out is None else files.enter_context(out.open("a"))
            proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "monitor", *args],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                text=True,
                cwd=REPO,
            )
        self.children.append(proc)
        return proc

    @staticmethod
    def stop(procs: Sequence[subprocess.Popen[str]], grace_s: float = 15.0) -> None:
        """SIGTERM (SIGCONT first, in case), then SIGKILL after `grace_s`; reaped."""
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()

    def stop_all(self) -> None:
        self.stop(self.children)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECMON_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@dataclass
class Sim:
    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, procs: Procs, tmp: Path, name: str) -> Sim:
        args = ["simulate", "--port", "0", "--api-key", API_KEY, "--rate-limit", RATE, "--log-level", "warning"]
        proc = procs.start(args, err=tmp / f"{name}-sim.err", env=clean_env({}))
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = LISTENING.match(line)
        if not match:
            raise RuntimeError(f"the simulator said {line!r}: {(tmp / f'{name}-sim.err').read_text()[-800:]}")
        return cls(proc, match.group(1))

    def create(self, count: int, duration_s: float = LONG_S) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            n = min(20_000, count - len(ids))
            ids += http("POST", self.url + "/_sim/executions", {"count": n, "duration_s": duration_s})["execution_ids"]
        return ids

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http("GET", self.url + "/_sim/stats")
        return result

    def polls(self, ids: set[str]) -> dict[str, tuple[int, str]]:
        rows = http("GET", self.url + "/_sim/executions")["executions"]
        return {r["execution_id"]: (int(r["polls"]), str(r["status"])) for r in rows if r["execution_id"] in ids}


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[str]
    url: str
    token: str
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def api(self, method: str, path: str, body: object = None) -> Any:
        return http(method, self.url + path, body, token=self.token)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.err.read_text()[-1500:]}")
            try:
                http("GET", self.url + "/healthz", timeout_s=2)
            except (OSError, urllib.error.HTTPError):
                return False
            return True

        if not wait_until(healthy, timeout_s, 0.1):
            raise RuntimeError(f"replica {self.name} not healthy in {timeout_s} s: {self.err.read_text()[-1500:]}")

    def metrics(self) -> tuple[str, float]:
        """The /metrics text and how long it took to answer (s)."""
        start = time.perf_counter()
        headers = {"Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(self.url + "/metrics", headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            text = answer.read().decode()
        return text, time.perf_counter() - start


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


@dataclass
class Cluster:
    """A database, a simulator and N replicas on them."""

    sim: Sim
    replicas: list[Replica]
    db_url: str

    def owners(self) -> dict[str, str]:
        """Active execution -> owner (replica id), for those with an owner."""
        with psycopg.connect(self.db_url) as conn:
            rows = conn.execute(
                "SELECT execution_id, owner FROM executions WHERE terminal_outcome IS NULL AND owner IS NOT NULL"
            ).fetchall()
        return {str(i): str(o) for i, o in rows}

    def held(self) -> dict[str, set[str]]:
        """Replica name -> the executions it holds (by the pid in its replica id)."""
        owners = self.owners()
        return {r.name: {i for i, o in owners.items() if f":{r.pid}:" in o} for r in self.replicas}

    def track(self, ids: Sequence[str], via: Replica) -> None:
        for start in range(0, len(ids), CHUNK):
            via.api("POST", "/v1/executions", {"ids": list(ids[start : start + CHUNK])})

    def wait_spread(self, total: int, timeout_s: float, tolerance: float = 0.1) -> dict[str, int]:
        share = total / len(self.replicas)
        counts: dict[str, int] = {}

        def spread() -> bool:
            nonlocal counts
            counts = {name: len(ids) for name, ids in self.held().items()}
            return all(abs(n - share) <= max(2, tolerance * share) for n in counts.values())

        if not wait_until(spread, timeout_s, 0.5):
            raise RuntimeError(f"the leases did not spread {total} executions in {timeout_s} s: {counts}")
        return counts


@dataclass
class Bench:
    server: PostgresServer
    procs: Procs
    tmp: Path
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _databases: int = 0

    def database(self, name: str) -> str:
        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return str(self.server.get_uri(name))

    @contextlib.contextmanager
    def cluster(self, name: str, replicas: int, lease_s: float = 30.0) -> Iterator[Cluster]:
        db_url = self.database(name)
        sim = Sim.start(self.procs, self.tmp, name)
        started: list[Replica] = []
        try:
            for letter in "abc"[:replicas]:
                started.append(self._replica(f"{name}-{letter}", sim, db_url, lease_s))
            for replica in started:
                replica.wait_healthy()
            yield Cluster(sim, started, db_url)
        finally:
            Procs.stop([r.proc for r in started])
            Procs.stop([sim.proc], grace_s=5)

    def _replica(self, name: str, sim: Sim, db_url: str, lease_s: float) -> Replica:
        port = free_port()
        config = self.tmp / f"{name}.toml"
        config.write_text(
            "\n".join(
                [
                    "[api]",
                    f"base_url = {json.dumps(sim.url)}",
                    'api_key_env = "EXECMON_API_KEY"',
                    f'rate_limit = "{RATE}"',
                    "[state]",
                    f"path = {json.dumps(str(self.tmp / f'{name}.db'))}",  # unused with a url
                    f"url = {json.dumps(db_url)}",
                    f"lease_s = {lease_s}",
                    "[control]",
                    f'listen = "127.0.0.1:{port}"',
                    'token_env = "EXECMON_CONTROL_TOKEN"',
                    "[logging]",
                    'format = "json"',
                ]
            )
            + "\n"
        )
        env = clean_env({"EXECMON_API_KEY": API_KEY, "EXECMON_CONTROL_TOKEN": self.token})
        err = self.tmp / f"{name}.err"
        proc = self.procs.start(["run", "--config", str(config)], out=self.tmp / f"{name}.out", err=err, env=env)
        return Replica(name, proc, f"http://127.0.0.1:{port}", self.token, err)


# -- 1. the budget -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetRow:
    replicas: int
    per_window: float
    max_in_window: int
    throttled: int
    measured_s: float


def measure_budget(cluster: Cluster, measure_s: float, warmup_s: float) -> BudgetRow:
    ids = cluster.sim.create(300)
    cluster.track(ids, cluster.replicas[0])
    cluster.wait_spread(len(ids), 60)
    time.sleep(warmup_s)
    before, t0 = cluster.sim.stats(), time.monotonic()
    time.sleep(measure_s)
    after, t1 = cluster.sim.stats(), time.monotonic()
    windows = (t1 - t0) / WINDOW_S
    return BudgetRow(
        replicas=len(cluster.replicas),
        per_window=(after["requests_total"] - before["requests_total"]) / windows,
        max_in_window=int(after["max_requests_in_window"]),
        throttled=int(after["responses"].get("429", 0)),
        measured_s=t1 - t0,
    )


# -- 3. failover -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailoverRow:
    lease_s: float
    orphans: int
    first_claimed_s: float
    all_claimed_s: float
    all_polled_s: float


def measure_failover(cluster: Cluster, lease_s: float, track: bool) -> FailoverRow:
    if track:
        ids = cluster.sim.create(300)
        cluster.track(ids, cluster.replicas[0])
        cluster.wait_spread(len(ids), 60)
        time.sleep(2 * lease_s / 10)  # two more claim cycles: settled
    victim = cluster.replicas[1]
    orphans = cluster.held()[victim.name]
    before = cluster.sim.polls(orphans)
    victim.proc.kill()
    killed = time.monotonic()
    victim.proc.wait(timeout=10)
    first = last = polled = math.nan
    next_poll_check = killed
    while time.monotonic() < killed + 4 * lease_s + 60:
        now = time.monotonic()
        if math.isnan(last):
            owners = cluster.owners()
            moved = sum(1 for i in orphans if i in owners and f":{victim.pid}:" not in owners[i])
            if moved and math.isnan(first):
                first = now - killed
            if moved == len(orphans):
                last = now - killed
        if math.isnan(polled) and now >= next_poll_check:
            current = cluster.sim.polls(orphans)
            if all(current[i][0] > before[i][0] or current[i][1] != "running" for i in orphans):
                polled = time.monotonic() - killed
            next_poll_check = now + 0.5
        if not math.isnan(last) and not math.isnan(polled):
            break
        time.sleep(0.2)
    return FailoverRow(lease_s, len(orphans), first, last, polled)


# -- 4. 100,000 executions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    name: str
    held: int
    rss_before_kib: int
    rss_after_kib: int
    lag_max_s: float
    lag_mean_s: float
    scrape_max_s: float
    stalls: int
    stalls_in_claim: int


STATEMENTS = {
    "renew (UPDATE ... WHERE owner = me)": "UPDATE executions SET lease_until",
    "claim (FOR UPDATE SKIP LOCKED)": "WITH picked AS",
    "release newest": "WITH gone AS",
    "fair share (2 counts)": "SELECT (SELECT count(*) FROM executions",
    "heartbeat": "INSERT INTO replicas",
    "buffered polls written (UPDATE ... FROM unnest)": "UPDATE executions AS e SET schedule_json",
}
DURATION = re.compile(r"duration: ([\d.]+) ms\s+(?:statement|execute [^:]*): (.*)")


def statement_times(text: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in STATEMENTS}
    for line in text.splitlines():
        match = DURATION.search(line)
        if not match:
            continue
        for label, prefix in STATEMENTS.items():
            if match.group(2).startswith(prefix):
                times[label].append(float(match.group(1)))
    return times


def set_statement_logging(server: PostgresServer, on: bool) -> None:
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        if on:
            conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
        else:
            conn.execute("ALTER SYSTEM RESET log_min_duration_statement")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)


def stall_counts(err: Path, offset: int) -> tuple[int, int]:
    """Loop stalls a replica logged after `offset` bytes of its stderr, and those inside a claim cycle."""
    total = in_claim = 0
    for line in err.read_bytes()[offset:].decode(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("event") == "event loop blocked":
                total += 1
                in_claim += "claim_cycle" in str(row.get("stack", ""))
    return total, in_claim


def measure_many(bench: Bench, cluster: Cluster, count: int, sample_s: float) -> tuple[list[MemoryRow], str, str]:
    time.sleep(3)  # idle, nothing tracked
    before = {r.name: rss_kib(r.pid) for r in cluster.replicas}
    started = time.monotonic()
    ids = cluster.sim.create(count)
    created = time.monotonic()
    cluster.track(ids, cluster.replicas[0])
    tracked = time.monotonic()
    counts = cluster.wait_spread(count, 180, tolerance=0.02)
    spread = time.monotonic()
    time.sleep(6)  # two more claim cycles
    after = {r.name: rss_kib(r.pid) for r in cluster.replicas}
    counts = {name: len(held) for name, held in cluster.held().items()}
    timing = (
        f"created in the simulator in {created - started:.1f} s, added through {cluster.replicas[0].name} "
        f"in {tracked - created:.1f} s ({math.ceil(count / CHUNK)} requests of up to {CHUNK:,}), spread within "
        f"{spread - tracked:.1f} s after that"
    )

    log_path = Path(bench.server.pgdata) / "log"
    log_offset = log_path.stat().st_size
    err_offsets = {r.name: r.err.stat().st_size for r in cluster.replicas}
    set_statement_logging(bench.server, on=True)
    lags: dict[str, list[float]] = {r.name: [] for r in cluster.replicas}
    scrapes: dict[str, list[float]] = {r.name: [] for r in cluster.replicas}
    end = time.monotonic() + sample_s
    try:
        while time.monotonic() < end:
            for replica in cluster.replicas:
                text, took = replica.metrics()
                lags[replica.name].append(metric(text, "execmon_event_loop_lag_seconds"))
                scrapes[replica.name].append(took)
            time.sleep(0.2)
    finally:
        set_statement_logging(bench.server, on=False)
    sql = statement_times(log_path.read_bytes()[log_offset:].decode(errors="replace"))
    sql_table = "\n".join(
        [
            f"| statement | count in {sample_s:g} s | p50 ms | p90 ms | max ms |",
            "|---|---|---|---|---|",
            *(
                f"| {label} | {len(v)} | {pct(v, 0.5):.1f} | {pct(v, 0.9):.1f} | {max(v, default=math.nan):.1f} |"
                for label, v in sql.items()
            ),
        ]
    )
    rows = []
    for replica in cluster.replicas:
        stalls, in_claim = stall_counts(replica.err, err_offsets[replica.name])
        values = [v for v in lags[replica.name] if not math.isnan(v)]
        rows.append(
            MemoryRow(
                name=replica.name,
                held=counts[replica.name],
                rss_before_kib=before[replica.name],
                rss_after_kib=after[replica.name],
                lag_max_s=max(values, default=math.nan),
                lag_mean_s=sum(values) / len(values) if values else math.nan,
                scrape_max_s=max(scrapes[replica.name]),
                stalls=stalls,
                stalls_in_claim=in_claim,
            )
        )
    return rows, timing, sql_table


# -- 2. one slot ------------------------------------------------------------------------------------------


def slot_cost(server: PostgresServer, seconds: float) -> tuple[str, list[str]]:
    """pg_slot_cost.py's own measurement (its functions) on this server: the baseline line and rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned takers import it from there too
    import pg_slot_cost  # noqa: PLC0415 (a sibling script, not a package)

    version, select_ms, commit_ms = pg_slot_cost._baseline(server)
    rows = [
        pg_slot_cost._run(server, takers=takers, kind=kind, seconds=seconds, window_s=0.01)
        for takers in (1, 3)
        for kind in ("granted", "refused")
    ]
    baseline = (
        f"PostgreSQL {version}; bare round trip (SELECT 1) p50 {select_ms:.3f} ms, "
        f"durable one-row INSERT p50 {commit_ms:.3f} ms"
    )
    return baseline, rows


# -- main --------------------------------------------------------------------------------------------------


def _raise_on_term(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:  # noqa: PLR0915 (a script: one straight story)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--measure-s", type=float, default=30.0, help="steady stretch of the budget part")
    parser.add_argument("--warmup-s", type=float, default=8.0, help="after the leases spread, before measuring")
    parser.add_argument("--executions", type=int, default=100_000, help="executions of part 4")
    parser.add_argument("--sample-s", type=float, default=15.0, help="lag sampling in part 4")
    parser.add_argument("--slot-seconds", type=float, default=2.0, help="per row of the slot cost")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_on_term)

    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="execmon-bench-replicas-"))
    procs = Procs()
    server: PostgresServer | None = None
    try:
        log(f"starting PostgreSQL (pgserver) in {tmp}")
        server = get_server(tmp / "pgdata", cleanup_mode="delete")
        bench = Bench(server, procs, tmp)
        log("one slot: pg_slot_cost's measurement (first, while nothing else runs)")
        baseline, slot_rows = slot_cost(server, args.slot_seconds)

        budget: list[BudgetRow] = []
        failover: list[FailoverRow] = []
        for n in (1, 2, 3):
            log(f"budget: {n} replica(s)")
            with bench.cluster(f"budget{n}", n) as cluster:
                budget.append(measure_budget(cluster, args.measure_s, args.warmup_s))
                log(f"  {budget[-1]}")
                if n == 3:
                    log("failover: SIGKILL one of the three (lease_s 30)")
                    failover.append(measure_failover(cluster, 30.0, track=False))
                    log(f"  {failover[-1]}")
        log("failover: SIGKILL one of three (lease_s 20)")
        with bench.cluster("failover20", 3, lease_s=20.0) as cluster:
            failover.append(measure_failover(cluster, 20.0, track=True))
            log(f"  {failover[-1]}")

        log(f"{args.executions:,} executions across three replicas")
        with bench.cluster("many", 3) as cluster:
            memory, timing, sql_table = measure_many(bench, cluster, args.executions, args.sample_s)

    finally:
        log("cleaning up")
        procs.stop_all()
        if server is not None:
            server.cleanup()
        with contextlib.suppress(OSError):
            for path in sorted(tmp.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            tmp.rmdir()

    print(
        f"# Replicas on PostgreSQL\n\n{os.cpu_count()} CPUs, {platform.machine()}, Python "
        f"{platform.python_version()}; {baseline}. Replicas, simulator and PostgreSQL (pgserver, Unix socket, "
        f"default settings) share this machine. Rate limit {RATE} at the simulator and in every replica's "
        f"config. One run of each; the whole script took {time.monotonic() - began:.0f} s.\n"
    )
    print(
        f"## 1. One budget across replicas\n\n300 executions running for an hour, spread by the leases; "
        f"after a {args.warmup_s:g} s warm-up, requests at the server over {budget[0].measured_s:.0f} s. "
        "Max and 429s: over the whole life of each part's simulator.\n"
    )
    print("| replicas | requests/window (mean) | % of the limit | requests/min | max in any window | 429s |")
    print("|---|---|---|---|---|---|")
    for b in budget:
        print(
            f"| {b.replicas} | {b.per_window:.1f} | {100 * b.per_window / LIMIT:.0f}% "
            f"| {b.per_window * 60 / WINDOW_S:.0f} | {b.max_in_window} | {b.throttled} |"
        )

    print("\n## 2. The cost of one slot (take + done, PgLedger, one key)\n")
    print(
        "From benchmarks/pg_slot_cost.py's functions on this script's server "
        f"({args.slot_seconds:g} s per row; window 10 ms, so that granted slots never wait for the limit).\n"
    )
    print(
        "| takers | take | slots | per s | take p50 ms | take p99 ms | done p50 ms | done p99 ms "
        "| take+done p50 ms | take+done p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(slot_rows))
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in slot_rows]
    granted = {c[0]: c for c in cells if c[1] == "granted"}
    summary = "; ".join(f"{t} taker(s): take+done p50 {c[8]} ms, p99 {c[9]} ms" for t, c in granted.items())
    print(
        f"\nSummary: {summary}, against a pacing interval of {WINDOW_S * 1000 / LIMIT:.0f} ms at {RATE} "
        "(2 round trips per slot: take, done). Full table: .venv/bin/python benchmarks/pg_slot_cost.py"
    )

    print(
        "\n## 3. Failover after SIGKILL (3 replicas, 300 executions)\n\nOne run each. Claimed: the "
        "executions table shows the killed replica's executions owned by another; polled: the simulator "
        "counted a new poll of every one of them.\n"
    )
    print("| lease_s | its executions | first claimed (s) | all claimed (s) | all polled again (s) |")
    print("|---|---|---|---|---|")
    for f in failover:
        print(
            f"| {f.lease_s:g} | {f.orphans} | {f.first_claimed_s:.1f} | {f.all_claimed_s:.1f} | {f.all_polled_s:.1f} |"
        )

    print(
        f"\n## 4. {args.executions:,} executions across three replicas\n\nAll {args.executions:,} running "
        f"for an hour; {timing}. RSS after: 6 s after the spread. The first replica tracked all of them "
        "before handing two thirds over, so its RSS keeps that peak's arenas.\n"
    )
    print(
        "| replica | holds | RSS before MiB | RSS after MiB | bytes per execution | loop lag max s "
        "| loop lag mean s | /metrics answer max s | loop stalls > 0.2 s (in a claim cycle) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in memory:
        per = (m.rss_after_kib - m.rss_before_kib) * 1024 / max(1, m.held)
        print(
            f"| {m.name} | {m.held:,} | {m.rss_before_kib / 1024:.0f} | {m.rss_after_kib / 1024:.0f} | {per:,.0f} "
            f"| {m.lag_max_s:.3f} | {m.lag_mean_s:.3f} | {m.scrape_max_s:.3f} | {m.stalls} ({m.stalls_in_claim}) |"
        )
    print(
        f"\nThe claim cycle's SQL while the replicas hold their thirds (PostgreSQL's own timings, "
        f"log_min_duration_statement = 0 for {args.sample_s:g} s; all three replicas):\n"
    )
    print(sql_table)
    print(
        "\nReproduce: .venv/bin/python benchmarks/replicas.py "
        f"--measure-s {args.measure_s:g} --warmup-s {args.warmup_s:g} --executions {args.executions} "
        f"--sample-s {args.sample_s:g} --slot-seconds {args.slot_seconds:g}"
    )


if __name__ == "__main__":
    main()
