"""The command sink: stdin JSON, environment, exit status, timeouts that kill, checks at start."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from monitor.clock import Clock
from monitor.config import SinkConfig
from monitor.delivery import Delivery
from monitor.errors import UsageError
from monitor.records import Outcome, TerminalEvent
from monitor.sinks.base import DeliveryError
from monitor.sinks.command import CommandSink
from monitor.sinks.registry import build_sinks
from monitor.state.store import Store, TrackRequest

# The hook: appends what it got to $OUT; fails while $COUNTER holds fewer than $FAILS marks.
HOOK = textwrap.dedent(
    """
    import json, os, sys
    env = {k: v for k, v in os.environ.items() if k.startswith("EXECMON_")}
    counter = os.environ.get("COUNTER")
    if counter:
        with open(counter, "a") as f:
            f.write("x")
        if len(open(counter).read()) <= int(os.environ.get("FAILS", "0")):
            print("transient trouble:", "x" * 3000, "the end", file=sys.stderr)
            sys.exit(3)
    with open(os.environ["OUT"], "a") as out:
        out.write(json.dumps({"stdin": json.load(sys.stdin), "env": env}) + "\\n")
    """
)


def config(command: object, **options: Any) -> SinkConfig:
    return SinkConfig(type="command", index=3, source="test.toml", options={"command": command, **options})


def record() -> dict[str, Any]:
    return {
        "event_id": "ev_1",
        "kind": "execution",
        "execution_id": "exec_1",
        "outcome": "failed",
        "group": None,
    }


def hook(tmp_path: Path, **env: str) -> CommandSink:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    cfg = config([sys.executable, str(script)], env={"OUT": str(tmp_path / "out.jsonl"), **env})
    return CommandSink.from_options(cfg.options, cfg)


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "out.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_record_on_stdin_and_identity_in_the_environment(tmp_path: Path) -> None:
    await hook(tmp_path).send(record())
    [call] = calls(tmp_path)
    assert call["stdin"] == record()
    assert call["env"]["EXECMON_EXECUTION_ID"] == "exec_1"
    assert call["env"]["EXECMON_OUTCOME"] == "failed"
    assert call["env"]["EXECMON_EVENT_ID"] == "ev_1"
    assert call["env"]["EXECMON_EVENT_KIND"] == "execution"


async def test_non_zero_exit_is_retryable_with_the_stderr_tail(tmp_path: Path) -> None:
    sink = hook(tmp_path, COUNTER=str(tmp_path / "n"), FAILS="5")
    with pytest.raises(DeliveryError) as caught:
        await sink.send(record())
    assert caught.value.retryable is True
    assert "exited with status 3" in caught.value.reason
    assert caught.value.reason.endswith("the end")
    assert len(caught.value.reason) < 2200  # only the tail
    assert calls(tmp_path) == []


async def test_the_engine_retries_until_the_command_succeeds(tmp_path: Path) -> None:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    env = {"OUT": str(tmp_path / "out.jsonl"), "COUNTER": str(tmp_path / "n"), "FAILS": "2"}
    cfg = SinkConfig(
        type="command",
        index=1,
        source="t",
        backoff_base_s=0.01,
        backoff_cap_s=0.02,
        options={"command": f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}", "env": env},
    )
    with Store.open(tmp_path / "s.db") as store:
        store.track_many([TrackRequest("exec_1", tracked_since=1.0)])
        async with Delivery(store, build_sinks([cfg]), Clock()) as delivery:
            delivery.submit(TerminalEvent("exec_1", Outcome.COMPLETED, observed_at=2.0, tracked_since=1.0, polls=1))
            assert await delivery.drain(timeout=20)
            assert delivery.counters()["command"].failed == 2
    [call] = calls(tmp_path)
    assert call["env"]["EXECMON_OUTCOME"] == "completed"


async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = f"sleep 30 & echo $! >> {shlex.quote(str(pid_file))}; echo $$ >> {shlex.quote(str(pid_file))}; wait"
    cfg = config(script, shell=True)
    sink = CommandSink.from_options(cfg.options, cfg)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await sink.send(record())
    assert asyncio.get_running_loop().time() - started < 5  # not held up by the orphan's pipes
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2
    await asyncio.sleep(0.2)
    assert [pid for pid in pids if running(pid)] == []


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait a while for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_program_that_ignores_stdin_is_fine(tmp_path: Path) -> None:
    cfg = config(["true"])
    await CommandSink.from_options(cfg.options, cfg).send({**record(), "raw": "y" * 1_000_000})


def test_missing_programs_and_bad_commands_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"test.toml: \[\[sinks\]\] #3 key 'command': program 'no-such-prog-x'"):
        build_sinks([config("no-such-prog-x --flag")])
    with pytest.raises(UsageError, match="does not exist or is not executable"):
        build_sinks([config([str(tmp_path / "missing.sh")])])
    not_executable = tmp_path / "plain.txt"
    not_executable.write_text("")
    with pytest.raises(UsageError, match="does not exist or is not executable"):
        build_sinks([config(str(not_executable))])
    with pytest.raises(UsageError, match="key 'command': expected a command line or a list"):
        build_sinks([config(42)])
    with pytest.raises(UsageError, match="key 'command': expected a program to run"):
        build_sinks([config("   ")])
    with pytest.raises(UsageError, match="shlex can split"):
        build_sinks([config("echo 'unterminated")])
    with pytest.raises(UsageError, match="when shell = true"):
        build_sinks([config(["echo", "x"], shell=True)])


def test_programs_are_resolved_on_path_at_start() -> None:
    cfg = config("sh -c 'exit 0'")
    sink = CommandSink.from_options(cfg.options, cfg)
    assert os.path.isabs(sink.program)


def test_child_environment_has_no_known_secret() -> None:
    from monitor.secrets import Secret, without_secrets

    Secret("sk_test_never_to_a_hook")
    env = without_secrets({"EXECMON_API_KEY": "sk_test_never_to_a_hook", "HOME": "/root"})
    assert env == {"HOME": "/root"}


DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


async def test_the_child_gets_an_allowlisted_environment_plus_the_names_env_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key inside an unrelated variable (it is no known secret by itself) must not reach the child.
    monkeypatch.setenv("UNRELATED_SETTINGS", "url=https://x.example?key=sk_live_hidden_in_a_setting")
    monkeypatch.setenv("HOOK_TOKEN", "named-so-passed")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("TZ", "UTC")
    out = tmp_path / "env.json"
    cfg = config([sys.executable, "-c", DUMP_ENV, str(out)], env=["HOOK_TOKEN", "NOT_SET_ANYWHERE"])
    await CommandSink.from_options(cfg.options, cfg).send(record())
    env = json.loads(out.read_text())
    assert "UNRELATED_SETTINGS" not in env
    assert "sk_live_hidden_in_a_setting" not in json.dumps(env)
    assert env["HOOK_TOKEN"] == "named-so-passed"
    assert env["PATH"] == os.environ["PATH"]
    assert env["LC_TIME"] == "C"
    assert env["TZ"] == "UTC"
    assert env["EXECMON_EXECUTION_ID"] == "exec_1"
    assert env["EXECMON_OUTCOME"] == "failed"
    allowed = {"PATH", "HOME", "LANG", "TZ", "HOOK_TOKEN"}
    # What the interpreter itself may add at start-up (e.g. LC_CTYPE coercion) is not inherited.
    assert {k for k in env if not k.startswith(("EXECMON_", "LC_"))} <= allowed


async def test_a_named_variable_holding_execmons_own_key_is_still_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from monitor.secrets import Secret

    Secret("sk_test_the_api_key_itself")
    monkeypatch.setenv("EXECMON_API_KEY", "sk_test_the_api_key_itself")
    out = tmp_path / "env.json"
    cfg = config([sys.executable, "-c", DUMP_ENV, str(out)], env=["EXECMON_API_KEY"])
    await CommandSink.from_options(cfg.options, cfg).send(record())
    assert "EXECMON_API_KEY" not in json.loads(out.read_text())


def test_env_is_a_list_of_names_or_a_table_of_values() -> None:
    with pytest.raises(UsageError, match="key 'env': expected a list of environment variable names"):
        build_sinks([config(["true"], env=["OK", "not a name"])])
    with pytest.raises(UsageError, match="key 'env': expected a table of text values"):
        build_sinks([config(["true"], env="HOME")])
