"""Building sinks: entry points (built-ins and an installed plugin), `pkg.mod:Class`, names, filters, specs."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.clock import Clock
from monitor.config import SinkConfig, SinkEvents, load_config
from monitor.delivery import Delivery
from monitor.errors import UsageError
from monitor.records import Outcome, TerminalEvent
from monitor.sinks.command import CommandSink
from monitor.sinks.jsonl import JsonlSink
from monitor.sinks.registry import available_types, build_sinks, parse_sink_spec
from monitor.sinks.stdout import StdoutSink
from monitor.sinks.webhook import WebhookSink
from monitor.state.store import Store, TrackRequest

PLUGIN_SOURCE = Path(__file__).parent / "plugin_pkg"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """pip-installs tests/plugin_pkg (from a copy, so the tree stays clean) into this venv."""
    copy = tmp_path_factory.mktemp("plugin") / "plugin_pkg"
    shutil.copytree(PLUGIN_SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "--no-input", str(copy)],
        check=True,
        timeout=120,
    )  # fmt: skip
    importlib.invalidate_caches()
    return "test-recorder"  # left installed: harmless, and another run reinstalls it anyway


def sink_config(type_: str, index: int = 1, **options: Any) -> SinkConfig:
    return SinkConfig(type=type_, index=index, source="test.toml", options=options)


def test_builtin_types_come_from_entry_points(tmp_path: Path) -> None:
    assert {"stdout", "jsonl", "webhook", "command"} <= set(available_types())
    handles = build_sinks(
        [
            sink_config("stdout"),
            sink_config("jsonl", 2, path=str(tmp_path / "a.jsonl")),
            sink_config("webhook", 3, url="https://example.com/h"),
            sink_config("command", 4, command="true"),
        ]
    )
    assert [type(h.sink) for h in handles] == [StdoutSink, JsonlSink, WebhookSink, CommandSink]
    assert [h.name for h in handles] == ["stdout", "jsonl", "webhook", "command"]
    assert [h.concurrency for h in handles] == [1, 4, 4, 1]
    assert all(h.sink.name == h.name for h in handles)


def test_names_for_repeated_types_and_explicit_names(tmp_path: Path) -> None:
    handles = build_sinks(
        [
            sink_config("jsonl", 1, path=str(tmp_path / "a.jsonl")),
            sink_config("jsonl", 2, path=str(tmp_path / "b.jsonl")),
            sink_config("jsonl", 3, path=str(tmp_path / "c.jsonl"), name="archive"),
        ]
    )
    assert [h.name for h in handles] == ["jsonl#1", "jsonl#2", "archive"]
    with pytest.raises(UsageError, match="#2: sink name 'x' is used twice"):
        build_sinks([sink_config("stdout", 1, name="x"), sink_config("stdout", 2, name="x")])
    with pytest.raises(UsageError, match="#1 key 'name'"):
        build_sinks([sink_config("stdout", 1, name="has space")])


def test_unknown_and_broken_types_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"test.toml: \[\[sinks\]\] #1: no sink type 'slack' is installed \(known:"):
        build_sinks([sink_config("slack")])
    with pytest.raises(UsageError, match="'no_such_module_x:Sink' cannot be imported"):
        build_sinks([sink_config("no_such_module_x:Sink")])
    with pytest.raises(UsageError, match="has no from_options"):
        build_sinks([sink_config("json:dumps")])
    with pytest.raises(UsageError, match="unknown key 'path' for a stdout sink"):
        build_sinks([sink_config("stdout", path="x")])


def test_filters_by_outcome_and_event_kind() -> None:
    [failures, groups] = build_sinks(
        [
            SinkConfig(type="stdout", index=1, source="t", on=(Outcome.FAILED,), options={"name": "f"}),
            SinkConfig(type="stdout", index=2, source="t", events=(SinkEvents.GROUP,), options={"name": "g"}),
        ]
    )
    failed = {"kind": "execution", "outcome": "failed"}
    done = {"kind": "execution", "outcome": "completed"}
    digest = {"kind": "group", "group": "g"}
    assert [failures.wants(r) for r in (failed, done, digest)] == [True, False, False]
    assert [groups.wants(r) for r in (failed, done, digest)] == [False, False, True]
    assert (failures.wants_groups, groups.wants_groups) == (False, True)


def test_sink_specs_from_the_command_line() -> None:
    assert parse_sink_spec("stdout") == {"type": "stdout"}
    assert parse_sink_spec("jsonl:out/r.jsonl") == {"type": "jsonl", "path": "out/r.jsonl"}
    assert parse_sink_spec("webhook:https://h.example/x?a=1") == {"type": "webhook", "url": "https://h.example/x?a=1"}
    assert parse_sink_spec("command:notify --to ops") == {"type": "command", "command": "notify --to ops"}
    assert parse_sink_spec("test-recorder") == {"type": "test-recorder"}
    assert parse_sink_spec("my_pkg.sinks:Chat") == {"type": "my_pkg.sinks:Chat"}
    for bad in ("jsonl", "jsonl:", "webhook: ", ""):
        with pytest.raises(UsageError, match="--sink"):
            parse_sink_spec(bad)


def test_specs_go_through_load_config(tmp_path: Path) -> None:
    config = load_config(None, env={}, overrides={"sinks": [parse_sink_spec(f"jsonl:{tmp_path}/o.jsonl")]})
    [handle] = build_sinks(config.sinks)
    assert isinstance(handle.sink, JsonlSink)
    assert "command line" in config.sinks[0].source


async def test_stdout_sink_writes_one_flushed_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    [handle] = build_sinks([sink_config("stdout")])
    await handle.sink.send({"event_id": "ev_1", "outcome": "completed"})
    await handle.sink.send({"event_id": "ev_1", "outcome": "completed"})
    await handle.sink.send({"event_id": "ev_2", "outcome": "failed"})
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event_id"] for line in out] == ["ev_1", "ev_2"]


async def test_an_installed_plugin_is_used_by_name(installed_plugin: str, tmp_path: Path) -> None:
    out = tmp_path / "plugin.jsonl"
    assert installed_plugin in available_types()
    sinks = build_sinks([sink_config(installed_plugin, path=str(out), tag="by-name")])
    assert type(sinks[0].sink).__module__ == "execmon_test_plugin"
    with Store.open(tmp_path / "s.db") as store:
        store.track_many([TrackRequest("exec_1", tracked_since=1.0)])
        async with Delivery(store, sinks, Clock()) as delivery:
            delivery.submit(TerminalEvent("exec_1", Outcome.COMPLETED, observed_at=2.0, tracked_since=1.0, polls=3))
            assert await delivery.drain(timeout=10)
    [line] = out.read_text().splitlines()
    got = json.loads(line)
    assert (got["tag"], got["record"]["execution_id"], got["record"]["polls"]) == ("by-name", "exec_1", 3)


def test_a_plugin_by_module_and_class_and_its_own_validation(installed_plugin: str, tmp_path: Path) -> None:
    [handle] = build_sinks([sink_config("execmon_test_plugin:RecorderSink", path=str(tmp_path / "p"))])
    assert handle.name == "execmon_test_plugin:RecorderSink"
    with pytest.raises(UsageError, match=r"#1 key 'path': expected a file path"):
        build_sinks([sink_config(installed_plugin)])
