"""`execmon dead-letters`: list what a sink never confirmed, and queue it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from control_fakes import MemoryBackend, serve_in_thread
from e2e import free_port

from monitor.cli import main
from monitor.records import Outcome, TerminalEvent, build_result_record
from monitor.secrets import Secret
from monitor.service.control import ControlState
from monitor.state.rows import TrackRequest
from monitor.state.store import Store


def _state_with_one_dead_letter(path: Path) -> str:
    with Store.open(path) as store:
        store.track_many([TrackRequest("exec_dead1", tracked_since=1000.0), TrackRequest("exec_fine1", 1000.0)])
        dead = build_result_record(TerminalEvent("exec_dead1", Outcome.FAILED, 1010.0, 1000.0, 2))
        fine = build_result_record(TerminalEvent("exec_fine1", Outcome.COMPLETED, 1010.0, 1000.0, 2))
        store.finish("exec_dead1", Outcome.FAILED, dead, ["hook"])
        store.finish("exec_fine1", Outcome.COMPLETED, fine, ["hook"])
        store.mark_dead(str(dead["event_id"]), "hook", "HTTP 410 from the webhook: permanent")
        store.mark_delivered(str(fine["event_id"]), "hook")
        return str(dead["event_id"])


def test_lists_dead_letters_with_their_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.db"
    _state_with_one_dead_letter(state)
    assert main(["dead-letters", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert "exec_dead1" in out
    assert "HTTP 410" in out
    assert "exec_fine1" not in out
    assert out.strip().endswith(f"1 dead letter(s) in {state}")


def test_json_lines_carry_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.db"
    event = _state_with_one_dead_letter(state)
    assert main(["dead-letters", "--state", str(state), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["event_id"], r["sink"], r["execution_id"]) for r in rows] == [(event, "hook", "exec_dead1")]
    assert rows[0]["record"]["outcome"] == "failed"


def test_retry_makes_them_pending_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.db"
    _state_with_one_dead_letter(state)
    assert main(["dead-letters", "--state", str(state), "--retry"]) == 0
    assert "1 dead letter(s) queued again" in capsys.readouterr().out
    with Store.open(state) as store:
        assert store.pending_count("hook") == 1
        assert store.dead_letters() == []


def test_a_state_file_in_use_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state.db"
    _state_with_one_dead_letter(state)
    with Store.open(state):
        assert main(["dead-letters", "--state", str(state), "--retry"]) == 2
    err = capsys.readouterr().err
    assert "in use" in err
    assert "Traceback" not in err
    assert "uses another state file" in err  # no config names it: no daemon to ask


def test_retry_asks_the_daemon_of_the_config_and_says_so_when_none_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state.db"
    _state_with_one_dead_letter(state)
    config = tmp_path / "execmon.toml"
    config.write_text(f'[state]\npath = "{state}"\n[control]\nlisten = "127.0.0.1:{free_port()}"\n')
    with Store.open(state):  # held, as by a daemon, but nothing answers on its control address
        assert main(["dead-letters", "--config", str(config), "--retry"]) == 2
    err = capsys.readouterr().err
    assert "in use" in err
    assert "asking its daemon instead failed: cannot reach the execmon daemon" in err
    assert "Traceback" not in err


def test_retry_while_a_daemon_holds_the_state_goes_through_its_control_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state.db"
    event = _state_with_one_dead_letter(state)
    backend = MemoryBackend()
    backend.dead_letters = 1
    monkeypatch.setenv("EXECMON_CONTROL_TOKEN", "dead-letter-test-token")
    control = ControlState(token=Secret("dead-letter-test-token"), backend=backend)
    with serve_in_thread(control) as server, Store.open(state):
        config = tmp_path / "execmon.toml"
        config.write_text(f'[state]\npath = "{state}"\n[control]\nlisten = "127.0.0.1:{server.port}"\n')
        assert main(["dead-letters", "--config", str(config), "--retry", event, "--sink", "hook"]) == 0
    assert "1 dead letter(s) queued again by the running daemon" in capsys.readouterr().out
    assert backend.retry_calls == [("hook", event)]
