"""`execmon watch` with its stderr on a terminal: the live view is drawn there, and stdout still
carries every result record (to a file, and to a pipe as in `execmon watch ... | jq`).

A real pseudo-terminal (pty.openpty) stands in for the user's terminal; the simulator and the
watch are real processes.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from e2e import API_KEY, RATE, Sim, assert_delivered_once, clean_env, execmon, parse_json_lines, sim_args

pytestmark = pytest.mark.slow

COUNT = 6


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Sim]:
    with Sim.running(tmp_path, "--rate-limit", RATE) as running:
        yield running


class Terminal:
    """A pseudo-terminal of 30x100; everything written to it is read (so the writer never blocks)."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed its end
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def detach(self) -> None:
        """The parent's copy of the terminal end; the child keeps its own."""
        os.close(self.slave)

    def text(self) -> str:
        self._reader.join(timeout=10)
        os.close(self.master)
        return b"".join(self._chunks).decode(errors="replace")


def start_watch(sim: Sim, ids: list[str], tmp: Path, term: Terminal, stdout: int | IO[str]) -> subprocess.Popen[str]:
    stdin = tmp / "ids.txt"
    stdin.write_text("".join(f"{i}\n" for i in ids))
    env = clean_env({"EXECMON_API_KEY": API_KEY, "TERM": "xterm-256color"})
    env.pop("NO_COLOR", None)
    with stdin.open() as ids_in:
        proc = subprocess.Popen(
            execmon("watch", *sim_args(sim), "-"), stdin=ids_in, stdout=stdout, stderr=term.slave, env=env, text=True
        )
    term.detach()
    return proc


def assert_live_view_drawn(screen: str, ids: list[str]) -> None:
    assert f"{len(ids)}/{len(ids)} finished" in screen, screen[-2000:]  # the live view's last frame
    assert f"{len(ids)} executions" in screen, screen[-2000:]  # the closing summary
    assert '"event_id"' not in screen, screen[-2000:]  # no record leaked onto the terminal


def test_stdout_to_a_file_gets_every_record_while_stderr_is_a_terminal(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(COUNT, duration_s=2)
    term = Terminal()
    out_path = tmp_path / "out.jsonl"
    with out_path.open("w") as out:
        proc = start_watch(sim, ids, tmp_path, term, out)
        rc = proc.wait(timeout=60)
    screen = term.text()
    assert rc == 0, screen[-2000:]
    records = parse_json_lines(out_path.read_text(), "stdout")
    assert_delivered_once(sim, records, ids)
    assert_live_view_drawn(screen, ids)


def test_stdout_to_a_pipe_gets_every_record_while_stderr_is_a_terminal(sim: Sim, tmp_path: Path) -> None:
    ids = sim.create(COUNT, duration_s=2)
    term = Terminal()
    proc = start_watch(sim, ids, tmp_path, term, subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)  # the reading end of the pipe, as `| cat` would be
    screen = term.text()
    assert proc.returncode == 0, screen[-2000:]
    assert_delivered_once(sim, parse_json_lines(out, "stdout"), ids)
    assert_live_view_drawn(screen, ids)
