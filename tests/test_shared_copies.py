"""The repo's copies of files from the shared folder beside the project (`../shared`) are identical
to the originals: the vendor page (docs/vendor/) and the public scenarios
(benchmarks/scenarios/public/).

A fresh clone has no `../shared`: then these tests skip, with the reason. CI has it and sets
EXECMON_REQUIRE_SHARED=1 (see .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from monitor.simulator.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REQUIRE_VARIABLE = "EXECMON_REQUIRE_SHARED"

# (the copy in the repo, the original under ../shared, which files)
COPIED_FOLDERS = [
    ("docs/vendor", "api", "get-execution-status.md"),
    ("benchmarks/scenarios/public", "scenarios", "*.toml"),
    ("benchmarks/scenarios/public/beyond-linear", "scenarios/beyond-linear", "*.toml"),
]


def shared_folder(relative: str) -> Path:
    """`../shared/<relative>`; skips (fails under EXECMON_REQUIRE_SHARED=1) when it is not there."""
    folder = SHARED / relative
    if folder.is_dir():
        return folder
    reason = f"{folder} is not beside the project (a fresh clone): the copies cannot be compared"
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_VARIABLE}=1 says it must be")
    pytest.skip(reason)


def names(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern) if p.is_file())


@pytest.mark.parametrize(("copy", "original", "pattern"), COPIED_FOLDERS, ids=[c[0] for c in COPIED_FOLDERS])
def test_the_copy_is_identical_to_the_shared_original(copy: str, original: str, pattern: str) -> None:
    shared = shared_folder(original)
    mine = ROOT / copy
    assert names(mine, pattern) == names(shared, pattern), f"{mine} and {shared} hold different files"
    for name in names(shared, pattern):
        assert (mine / name).read_bytes() == (shared / name).read_bytes(), f"{copy}/{name} differs from {shared}"


def test_the_copies_are_there_without_the_shared_folder() -> None:
    for copy, _, pattern in COPIED_FOLDERS:
        assert names(ROOT / copy, pattern), f"no {pattern} in {copy}"


def test_the_public_scenarios_the_readme_tables_use_load() -> None:
    for name in ("hundreds-1h", "hundred-10m", "mixed-stream"):
        assert load_scenario(ROOT / "benchmarks/scenarios/public" / f"{name}.toml").plan()
