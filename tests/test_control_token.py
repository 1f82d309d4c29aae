"""The generated control token: created once beside the state file, private from the first moment."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from monitor.config import ConfigError, load_config
from monitor.service.control_token import load_or_create_token, read_token_file, token_path


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask: only the mode passed to open() keeps the file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_path_is_the_state_path_with_token_added(tmp_path: Path) -> None:
    config_file = tmp_path / "execmon.toml"
    config_file.write_text(f'[state]\npath = "{tmp_path / "x.db"}"\n')
    assert token_path(load_config(config_file, env={})) == tmp_path / "x.db.token"
    assert token_path(load_config(None, env={})) == Path("execmon.db.token")


@pytest.mark.usefixtures("open_umask")
def test_created_once_0600_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "execmon.db.token"
    assert read_token_file(path) is None
    with capture_logs() as logs:
        token = load_or_create_token(path)
    value = token.reveal()
    assert len(value) >= 43  # 32 random bytes, URL-safe base64
    assert value.replace("-", "").replace("_", "").isalnum()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == value + "\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temporary file was left behind"
    assert [e["event"] for e in logs] == ["created the control token for the client commands"]
    assert value not in repr(logs)
    assert load_or_create_token(path) == token
    assert read_token_file(path) == token
    assert load_or_create_token(tmp_path / "other.token") != token


def test_the_file_is_opened_exclusive_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real_open = os.open

    def spy(file: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        calls.append((flags, mode))
        return real_open(file, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    load_or_create_token(tmp_path / "execmon.db.token")
    [(flags, mode)] = calls
    assert flags & os.O_CREAT
    assert flags & os.O_EXCL
    assert mode == 0o600


def test_a_token_created_meanwhile_by_another_process_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "execmon.db.token"
    real_link = os.link

    def link_after_the_other(src: Any, dst: Any, **kwargs: Any) -> None:
        path.write_text("the-other-daemons-token\n")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link_after_the_other)
    assert load_or_create_token(path).reveal() == "the-other-daemons-token"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_configured_token_file_is_left_alone_and_a_loose_one_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "execmon.db.token"
    path.write_text("  my-own-token \n")
    path.chmod(0o644)
    with capture_logs() as logs:
        assert load_or_create_token(path).reveal() == "my-own-token"
    assert [e["log_level"] for e in logs] == ["warning"]
    assert "chmod 600" in logs[0]["event"]
    assert path.read_text() == "  my-own-token \n"


@pytest.mark.parametrize("case", ["empty", "a directory", "no such directory"])
def test_an_unusable_token_file_is_one_config_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "execmon.db.token"
    if case == "empty":
        path.write_text("\n")
    elif case == "a directory":
        path.mkdir()
    else:
        path = tmp_path / "missing" / "execmon.db.token"
    with pytest.raises(ConfigError) as info:
        load_or_create_token(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
