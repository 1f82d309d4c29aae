"""`execmon simulate` as a real process: the listening line, signals, keys, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LISTENING = re.compile(r"^listening on (http://127\.0\.0\.1:\d+)\n$")


class Sim:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def get(self, path: str, key: str | None = None) -> tuple[int, Any]:
        headers = {"X-API-Key": key} if key else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, out, err


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "monitor", "simulate", *args]


@pytest.fixture
def simulate() -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> Sim:
        proc = subprocess.Popen(
            command("--port", "0", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = LISTENING.match(line)
        assert match, f"first line {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        return Sim(proc, match.group(1))

    yield _start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def run_fails(*args: str) -> str:
    """Run a command that must fail as bad input: exit 2, nothing on stdout, one line on stderr."""
    done = subprocess.run(command(*args), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_prints_one_listening_line_then_stops_on_sigterm(simulate: Any) -> None:
    sim = simulate()
    code, stats = sim.get("/_sim/stats")
    assert code == 200
    assert stats["rate_limit"] == {"limit": 30, "window_s": 60.0}
    rc, rest_of_stdout, stderr = sim.stop(signal.SIGTERM)
    assert rc == 0
    assert rest_of_stdout == ""  # exactly one line on stdout
    events = [json.loads(line)["event"] for line in stderr.splitlines()]  # logs: JSON on a pipe
    assert "simulator ready" in events
    assert "simulator stopping" in events


def test_sigint_stops_cleanly(simulate: Any) -> None:
    rc, _, stderr = simulate().stop(signal.SIGINT)
    assert rc == 0
    assert "Traceback" not in stderr


def test_keys_from_the_environment_and_initial_executions(simulate: Any) -> None:
    sim = simulate("--executions", "5", env={"EXECMON_SIM_API_KEYS": "sk_one_key, sk_two_key"})
    _, truth = sim.get("/_sim/executions")
    ids = [row["execution_id"] for row in truth["executions"]]
    assert len(ids) == 5
    assert all(row["status"] == "running" for row in truth["executions"])
    assert sim.get(f"/api/v1/executions/{ids[0]}/status", "sk_one_key")[0] == 200
    assert sim.get(f"/api/v1/executions/{ids[0]}/status", "sk_two_key")[0] == 200
    assert sim.get(f"/api/v1/executions/{ids[0]}/status", "sk_test_local")[0] == 401
    stderr = sim.stop()[2]
    assert "sk_one_key" not in stderr
    assert "sk_two_key" not in stderr


def test_whole_seconds_flag(simulate: Any) -> None:
    sim = simulate("--executions", "1", "--whole-seconds")
    _, truth = sim.get("/_sim/executions")
    code, body = sim.get(f"/api/v1/executions/{truth['executions'][0]['execution_id']}/status", "sk_test_local")
    assert code == 200, body
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["updated_at"]), body
    sim.stop()


def test_api_key_flags_win_over_the_environment(simulate: Any) -> None:
    sim = simulate("--api-key", "sk_flag_one", "--api-key", "sk_flag_two", env={"EXECMON_SIM_API_KEYS": "sk_env"})
    assert sim.get("/api/v1/executions/exec_x/status", "sk_flag_two")[0] == 404
    assert sim.get("/api/v1/executions/exec_x/status", "sk_env")[0] == 401


def test_scenario_sets_the_rate_limit_unless_the_flag_does(simulate: Any, tmp_path: Path) -> None:
    path = tmp_path / "small.toml"
    path.write_text(
        'name = "small"\nrate_limit = "5/10s"\n[[groups]]\ncount = 4\n'
        'duration = { dist = "fixed", s = 600 }\nprogress = { model = "steps" }\n'
    )
    sim = simulate("--scenario", str(path))
    _, stats = sim.get("/_sim/stats")
    assert stats["rate_limit"] == {"limit": 5, "window_s": 10.0}
    assert stats["executions"]["running"] == 4
    unlimited = simulate("--scenario", str(path), "--rate-limit", "none")
    _, stats = unlimited.get("/_sim/stats")
    assert stats["rate_limit"] is None


def test_bad_rate_limit_is_one_line_and_exit_2() -> None:
    message = run_fails("--port", "0", "--rate-limit", "30 per minute")
    assert message.startswith("execmon simulate: --rate-limit")
    assert "30/60s" in message


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = run_fails("--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in message


def test_bad_scenario_files_are_one_line_and_exit_2(tmp_path: Path) -> None:
    assert "cannot read scenario file" in run_fails("--port", "0", "--scenario", str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[groups]]\ncount = 1\nduration = { dist = "gamma", s = 1 }\n')
    message = run_fails("--port", "0", "--scenario", str(bad))
    assert str(bad) in message
    assert "groups[0].duration.dist" in message


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--error-rate", "1.5", "error rate"), ("--speed", "0", "speed"), ("--executions", "-1", "executions")],
)
def test_bad_values_are_one_line_and_exit_2(flag: str, value: str, needle: str) -> None:
    assert needle in run_fails("--port", "0", flag, value)
