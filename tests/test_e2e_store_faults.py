"""State-store faults on real processes: a real file-size limit (RLIMIT_FSIZE) on a running
`execmon run` / `execmon watch`, set from outside with `prlimit`, then lifted again.

With the soft limit at 4 KiB every SQLite write fails (each WAL frame crosses it) as it would on
a full disk: polling must pause without spending the budget, /healthz must say 503 with the
reason, and once the limit is lifted everything resumes with nothing lost. A fault that outlasts
`state.fault_grace_s` ends the process with one line: exit 1 for the daemon, 4 for watch, and the
same command run again resumes. stderr is a pipe here: a log file would hit the limit too.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import (
    API_KEY,
    CONTROL_TOKEN,
    RATE,
    Sim,
    assert_delivered_once,
    daemon_env,
    execmon,
    free_port,
    http,
    read_jsonl,
    sim_args,
    wait_for_lines,
    wait_until,
    write_daemon_config,
)

pytestmark = pytest.mark.slow

LIMIT_BYTES = 4096
MAX_IN_FLIGHT = 4


class Proc:
    """A child process whose stderr lines are collected by a thread (a pipe: no file-size limit)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(target=_drain, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def limit_file_size(self, soft: int) -> None:
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))

    def lift_file_size_limit(self) -> None:
        _, hard = resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit in {timeout_s} s: {self.err()[-2000:]}") from None
        for thread in self._threads:
            thread.join(5)
        return rc

    def err(self) -> str:
        return "".join(self.stderr)

    def kill(self) -> None:
        """SIGKILL if still running, reap, and close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _drain(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


def start_daemon(tmp: Path, sim: Sim, *, grace_s: float) -> tuple[Proc, str, Path, Path]:
    port = free_port()
    state, out = tmp / "state.db", tmp / "out.jsonl"
    config = write_daemon_config(
        tmp / "execmon.toml",
        sim,
        port=port,
        state=state,
        sinks=[{"type": "jsonl", "path": str(out)}],
        polling={"max_in_flight": MAX_IN_FLIGHT},
        state_options={"fault_grace_s": grace_s},
    )
    proc = Proc(execmon("run", "--config", str(config)), daemon_env())
    url = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: _health(url) == 200, 15), proc.err()[-2000:]
    return proc, url, config, out


def _health(url: str) -> int:
    try:
        return http("GET", url + "/healthz").status
    except OSError:
        return 0


def _add(url: str, ids: list[str]) -> None:
    answer = http("POST", url + "/v1/executions", body={"ids": ids}, token=CONTROL_TOKEN)
    assert answer.status in (200, 201), answer


def test_a_full_disk_pauses_polling_says_503_and_recovers_with_nothing_lost(tmp_path: Path, sim: Sim) -> None:
    daemon, url, _config, out = start_daemon(tmp_path, sim, grace_s=120)
    try:
        ids = sim.create(12, duration_s=4.0)
        _add(url, ids)
        assert wait_until(lambda: sim.stats()["requests_total"] >= 6, 10)

        daemon.limit_file_size(LIMIT_BYTES)
        assert wait_until(lambda: _health(url) == 503, 10), "healthz stayed 200 with the disk full"
        reason = http("GET", url + "/healthz").json()["reason"]
        assert "state store" in reason, reason
        metrics = http("GET", url + "/metrics", token=CONTROL_TOKEN).body.decode()
        assert "execmon_state_store_healthy 0.0" in metrics
        time.sleep(1.0)  # polls that were in flight come back
        before = sim.stats()["requests_total"]
        time.sleep(3.0)
        spent = sim.stats()["requests_total"] - before
        assert spent <= MAX_IN_FLIGHT, f"{spent} requests spent while nothing could be recorded"

        daemon.lift_file_size_limit()
        assert wait_until(lambda: _health(url) == 200, 20), daemon.err()[-2000:]
        assert wait_for_lines(out, len(ids), 30), f"{len(read_jsonl(out))}/{len(ids)}: {daemon.err()[-2000:]}"
        time.sleep(0.5)  # a duplicate written late would land now
        assert_delivered_once(sim, read_jsonl(out), ids)
        faults = [json.loads(line) for line in daemon.stderr if "state store fault" in line]
        assert len(faults) == 1, "the fault is logged once, not once per failed write"
        assert "Traceback" not in daemon.err()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, daemon.err()[-2000:]
    finally:
        daemon.kill()


def test_a_fault_past_the_grace_period_exits_1_and_a_restart_resumes(tmp_path: Path, sim: Sim) -> None:
    daemon, url, config, out = start_daemon(tmp_path, sim, grace_s=2)
    ids = sim.create(6, duration_s=3.0)
    try:
        _add(url, ids)
        assert wait_until(lambda: sim.stats()["requests_total"] >= 3, 10)
        daemon.limit_file_size(LIMIT_BYTES)
        rc = daemon.wait(30)
    finally:
        daemon.kill()
    assert rc == 1, daemon.err()[-2000:]
    last = daemon.err().splitlines()[-1]
    assert last.startswith("execmon run: "), daemon.err()[-2000:]
    assert "fault_grace_s" in last, last
    assert "state" in last, last

    again = Proc(execmon("run", "--config", str(config)), daemon_env())
    try:
        assert wait_for_lines(out, len(ids), 30), again.err()[-2000:]
        time.sleep(0.5)
        assert_delivered_once(sim, read_jsonl(out), ids)
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait(20) == 0, again.err()[-2000:]
    finally:
        again.kill()


def test_watch_exits_4_past_the_grace_period_and_the_same_command_resumes(tmp_path: Path, sim: Sim) -> None:
    config = tmp_path / "watch.toml"
    config.write_text("[state]\nfault_grace_s = 2\n")
    out = tmp_path / "out.jsonl"
    ids = sim.create(5, duration_s=3.0)
    args = [
        *execmon("watch", *ids),
        *sim_args(sim, "--config", str(config), "--state", str(tmp_path / "w.db"), "--sink", f"jsonl:{out}"),
        "--quiet",
    ]
    env = daemon_env({"EXECMON_API_KEY": API_KEY})
    first = Proc(args, env)
    try:
        assert wait_until(lambda: sim.stats()["requests_total"] >= 2, 10)
        first.limit_file_size(LIMIT_BYTES)
        rc = first.wait(30)
    finally:
        first.kill()
    assert rc == 4, first.err()[-2000:]
    last = first.err().splitlines()[-1]
    assert last.startswith("execmon watch: "), first.err()[-2000:]
    assert "fault_grace_s" in last, last
    assert "resume" in last

    second = Proc(args, env)
    try:
        assert second.wait(40) == 0, second.err()[-2000:]
    finally:
        second.kill()
    assert_delivered_once(sim, read_jsonl(out), ids)
