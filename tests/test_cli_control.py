"""`execmon add / ls / status / rm` against a real control API on loopback (in-memory backend)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from control_fakes import MemoryBackend, serve_in_thread
from e2e import free_port
from structlog.testing import capture_logs

from monitor.cli import main
from monitor.commands.ls import format_table, relative
from monitor.secrets import Secret
from monitor.service.control import ControlState

TOKEN = "cli-test-token-789"


@dataclass
class Daemonish:
    backend: MemoryBackend
    config: Path


def write_config(path: Path, port: int) -> Path:
    state = path.parent / "execmon.db"  # its generated control token would be execmon.db.token beside it
    path.write_text(
        f'[state]\npath = "{state}"\n[control]\nlisten = "127.0.0.1:{port}"\ntoken_env = "EXECMON_CONTROL_TOKEN"\n'
    )
    return path


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemonish]:
    backend = MemoryBackend()
    state = ControlState(token=Secret(TOKEN), backend=backend)
    # capture_logs keeps the server thread's log lines out of the CLI's captured stdout.
    with capture_logs(), serve_in_thread(state) as server:
        config = write_config(tmp_path / "execmon.toml", server.port)
        monkeypatch.setenv("EXECMON_CONTROL_TOKEN", TOKEN)
        monkeypatch.setenv("EXECMON_CONFIG", str(config))
        yield Daemonish(backend, config)


def execmon(capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    with pytest.MonkeyPatch.context() as patch:
        if stdin is not None:
            patch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- add ----------------------------------------------------------------------------------------


def test_add_from_arguments_and_stdin(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = execmon(capsys, "add", "exec_1", "exec_2")
    assert (code, out) == (0, "2 added, 0 already tracked\n")
    code, out, _ = execmon(capsys, "add", "-", "--json", stdin="exec_2\n\n# a comment\nexec_3\n  exec_4  \n")
    assert code == 0
    assert json.loads(out) == {"added": ["exec_3", "exec_4"], "already_tracked": ["exec_2"]}
    assert daemon.backend.snapshot() == {"exec_1", "exec_2", "exec_3", "exec_4"}


def test_add_passes_deadline_labels_and_group(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["add", "exec_1", "--deadline", "90m", "--label", "team=ml", "--label", "run=a=b", "--group", "nightly"]
    code, _, _ = execmon(capsys, *argv)
    assert code == 0
    [options] = daemon.backend.track_options
    assert options.pop("batch").startswith("b_")  # one `add` call is one batch of the group
    assert options == {"deadline_s": 5400.0, "group": "nightly", "labels": {"team": "ml", "run": "a=b"}}


def test_add_splits_big_batches_under_the_per_request_cap(
    daemon: Daemonish, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"exec_{i:05d}" for i in range(25_000)]
    code, out, _ = execmon(capsys, "add", "-", stdin="\n".join(ids))
    assert (code, out) == (0, "25000 added, 0 already tracked\n")
    assert [len(call) for call in daemon.backend.track_calls] == [10_000, 10_000, 5_000]
    assert [o.get("batch") for o in daemon.backend.track_options] == [None, None, None]  # no group: no batch


def test_add_of_a_group_in_several_requests_is_still_one_batch(
    daemon: Daemonish, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [f"exec_{i:05d}" for i in range(15_000)]
    code, _, _ = execmon(capsys, "add", "-", "--group", "nightly", stdin="\n".join(ids))
    assert code == 0
    batches = {o["batch"] for o in daemon.backend.track_options}
    assert len(daemon.backend.track_options) == 2
    assert len(batches) == 1


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["add", "exec_1", "../etc/passwd"], None, "invalid execution ID"),
        (["add", "-"], "exec_1\nbad id\n", "invalid execution ID"),
        (["add"], None, "no execution IDs"),
        (["add", "exec_1", "--label", "novalue"], None, "key=value"),
        (["add", "exec_1", "--deadline", "soon"], None, "--deadline"),
        (["add", "exec_1", "--deadline", "0"], None, "--deadline"),
    ],
)
def test_add_refuses_bad_input_before_sending_anything(
    daemon: Daemonish, capsys: pytest.CaptureFixture[str], argv: list[str], stdin: str | None, message: str
) -> None:
    code, out, err = execmon(capsys, *argv, stdin=stdin)
    assert code == 2
    assert out == ""
    assert message in err
    assert err.count("\n") == 1
    assert daemon.backend.track_calls == []


# --- ls, status, rm ---------------------------------------------------------------------------


def test_ls_table_json_and_filter(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.backend.add_view("exec_a", state="running", progress=42, polls=3, group="g1")
    daemon.backend.add_view("exec_b", state="completed", progress=100, delivered=True)
    code, out, _ = execmon(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["EXECUTION", "ID", "STATE"]
    assert lines[1].split()[:4] == ["exec_a", "running", "42%", "3"]
    assert "g1" in lines[1]
    assert lines[2].split()[-1] == "yes"
    assert lines[-1] == "2 executions: 1 completed, 1 running"
    code, out, _ = execmon(capsys, "ls", "--status", "terminal", "--json")
    payload = json.loads(out)
    assert [v["execution_id"] for v in payload["executions"]] == ["exec_b"]
    assert payload["total"] == 1


def test_ls_with_nothing_tracked(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    assert execmon(capsys, "ls") == (0, "0 executions\n", "")


def test_ls_of_10000_answers_in_under_a_second(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(10_000):
        daemon.backend.add_view(f"exec_{i:05d}", state="running", progress=i % 100, polls=i % 7)
    started = time.perf_counter()
    code, out, _ = execmon(capsys, "ls")
    elapsed = time.perf_counter() - started
    assert code == 0
    assert len(out.splitlines()) == 10_002  # header + rows + summary
    assert elapsed < 1.0, f"ls of 10,000 took {elapsed:.2f} s"
    code, out, _ = execmon(capsys, "ls", "--json")
    assert len(json.loads(out)["executions"]) == 10_000


def test_status_shows_one(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.backend.add_view("exec_a", state="running", progress=42, labels={"team": "ml"})
    code, out, _ = execmon(capsys, "status", "exec_a")
    assert code == 0
    assert "state:" in out
    assert "running" in out
    assert "42%" in out
    assert "team=ml" in out
    code, out, _ = execmon(capsys, "status", "exec_a", "--json")
    assert json.loads(out)["execution_id"] == "exec_a"


def test_status_of_an_unknown_or_invalid_id(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = execmon(capsys, "status", "exec_nope")
    assert code == 1
    assert err == "execmon status: exec_nope is not tracked\n"
    code, _, err = execmon(capsys, "status", "a/b")
    assert code == 2
    assert "invalid execution ID" in err


def test_rm_removes_and_reports_unknown(daemon: Daemonish, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.backend.add_view("exec_a")
    daemon.backend.add_view("exec_b")
    code, out, err = execmon(capsys, "rm", "exec_a", "exec_zzz")
    assert code == 1
    assert out == "1 removed, 1 not tracked\n"
    assert "exec_zzz is not tracked" in err
    code, out, _ = execmon(capsys, "rm", "exec_b", "--json")
    assert (code, json.loads(out)) == (0, {"removed": ["exec_b"], "not_tracked": []})
    assert daemon.backend.snapshot() == set()


# --- errors talking to the daemon -------------------------------------------------------------


@pytest.mark.parametrize("argv", [["add", "exec_1"], ["ls"], ["status", "exec_1"], ["rm", "exec_1"]])
def test_daemon_not_running_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.toml", port)
    code, out, err = execmon(capsys, *argv, "--config", str(config))
    assert code == 2
    assert out == ""
    assert err == (
        f"execmon {argv[0]}: cannot reach the execmon daemon at http://127.0.0.1:{port}: is `execmon run` running?\n"
    )


def test_wrong_or_missing_token_is_one_line_exit_2(
    daemon: Daemonish, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXECMON_CONTROL_TOKEN", "not-the-token")
    code, _, err = execmon(capsys, "ls")
    assert (code, err) == (2, "execmon ls: the control token was rejected: set EXECMON_CONTROL_TOKEN\n")
    monkeypatch.delenv("EXECMON_CONTROL_TOKEN")
    code, _, err = execmon(capsys, "add", "exec_1")
    generated = daemon.config.parent / "execmon.db.token"
    assert (code, err) == (
        2,
        "execmon add: no control token: set EXECMON_CONTROL_TOKEN, or start the daemon with this config "
        f"(it keeps its token in {generated})\n",
    )
    assert daemon.backend.snapshot() == set()


def test_the_generated_token_is_found_through_the_config(
    daemon: Daemonish, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EXECMON_CONTROL_TOKEN")
    (daemon.config.parent / "execmon.db.token").write_text(TOKEN + "\n")  # as the daemon leaves it
    assert execmon(capsys, "add", "exec_1") == (0, "1 added, 0 already tracked\n", "")
    monkeypatch.delenv("EXECMON_CONFIG")
    monkeypatch.chdir(daemon.config.parent)  # ./execmon.toml -> [state] path -> execmon.db.token
    assert execmon(capsys, "ls", "--json")[0] == 0
    assert daemon.backend.snapshot() == {"exec_1"}


def test_config_is_found_in_the_current_directory(
    daemon: Daemonish, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EXECMON_CONFIG")
    monkeypatch.chdir(daemon.config.parent)  # holds execmon.toml
    assert execmon(capsys, "add", "exec_1")[0] == 0
    assert daemon.backend.snapshot() == {"exec_1"}


# --- formatting ---------------------------------------------------------------------------------


def test_relative_times() -> None:
    now = 1_000_000.0
    assert relative(None, now) == "-"
    assert relative("not a time", now) == "-"
    assert relative("1970-01-12T13:46:30Z", now) == "10s ago"
    assert relative("1970-01-12T13:48:40Z", now) == "in 2m"
    assert relative("1970-01-12T13:46:40Z", now) == "now"


def test_table_columns_line_up() -> None:
    views = [{"execution_id": "a", "state": "pending"}, {"execution_id": "exec_long_name", "state": "failed"}]
    lines = format_table(views, 0.0).splitlines()
    assert lines[1].index("pending") == lines[2].index("failed") == lines[0].index("STATE")
