"""Every script in examples/ runs offline (against the in-process simulator) and prints what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Each example's stdout, one regular expression per line, in any order (executions ending close
# together may be seen in either order). A new example needs an entry.
EXPECTED: dict[str, list[str]] = {
    "watch_from_python.py": [
        *[r"exec_\w+ ended: completed"] * 3,
        r"exec_\w+ ended: failed",
        r"exec_\w+ ended: cancelled",
        r"5 executions ended: 1 cancelled, 3 completed, 1 failed",
    ],
}


def test_every_example_has_expected_output() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_offline(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECMON_")}  # offline: no base URL
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # an example writes nothing where it runs
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # a library is quiet: no log lines, no warnings
    assert _unmatched(done.stdout.splitlines(), EXPECTED[name]) == ([], []), done.stdout
    assert list(tmp_path.iterdir()) == []


def _unmatched(lines: list[str], patterns: list[str]) -> tuple[list[str], list[str]]:
    """Lines that no pattern matched and patterns left over, each pattern matching one line."""
    left = list(patterns)
    extra = []
    for line in lines:
        match = next((p for p in left if re.fullmatch(p, line)), None)
        if match is None:
            extra.append(line)
        else:
            left.remove(match)
    return extra, left
