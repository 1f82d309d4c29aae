"""The vendor page's own clients, run unmodified against `execmon simulate` in a subprocess.

The code is taken from the page at test time and only its URL, key and ID are replaced (as the
acceptance check does). The page is read from the repo's verbatim copy, so a fresh clone runs
these tests with nothing beside it; test_shared_copies.py checks the copy against the original in
the shared folder whenever that is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The repo's verbatim copy of ../shared/api/get-execution-status.md (test_shared_copies.py checks it).
PAGE = Path(__file__).resolve().parents[1] / "docs" / "vendor" / "get-execution-status.md"
KEY = "sk_live_your_key"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def page_text() -> str:
    return PAGE.read_text(encoding="utf-8")


def code_block(text: str, lang: str, needle: str) -> str:
    blocks: list[tuple[str, str]] = BLOCK.findall(text)
    return next(body for kind, body in blocks if kind == lang and needle in body)


def json_after(text: str, heading: str) -> str:
    """The first json block after a `### heading` line, as written on the page."""
    rest = text[text.index(f"### {heading}\n") :]
    return code_block(rest, "json", "{").strip()


def substitute(code: str, url: str, execution_id: str) -> str:
    return (
        code.replace("https://api.izieroma.xyz", url)
        .replace("sk_live_your_key", KEY)
        .replace("exec_1a2b3c4d5e6f", execution_id)
    )


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor",
            "simulate",
            "--port",
            "0",
            "--api-key",
            KEY,
            "--rate-limit",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.match(r"^listening on (http://\S+)$", line.strip())
    try:
        assert match, f"no listening line: {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def get(url: str, key: str = KEY) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_page_python_example_prints_a_result_and_raises_on_failure(sim_url: str) -> None:
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_conf_ok"], "duration_s": 1.5, "outcome": "completed"})
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_conf_bad"], "duration_s": 1.5, "outcome": "failed"})
    example = code_block(page_text(), "python", "wait_for_completion")
    runs = {}
    for execution_id in ("exec_conf_ok", "exec_conf_bad"):
        runs[execution_id] = subprocess.Popen(
            [sys.executable, "-c", substitute(example, sim_url, execution_id)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    ok_out, ok_err = runs["exec_conf_ok"].communicate(timeout=60)
    bad_out, bad_err = runs["exec_conf_bad"].communicate(timeout=60)
    _, done = get(f"{sim_url}/api/v1/executions/exec_conf_ok/status")
    assert runs["exec_conf_ok"].returncode == 0, ok_err
    lines = ok_out.strip().splitlines()
    assert lines[-1] == json.loads(done)["result"]
    assert re.fullmatch(r"Progress: \d{1,2}% - \S.*", lines[0])  # it saw it running first
    assert runs["exec_conf_bad"].returncode != 0
    assert "Exception: Task execution failed" in bad_err
    assert bad_out.startswith("Progress: ")


def test_the_page_javascript_example_prints_a_result(sim_url: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript example cannot run here")
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_conf_js"], "duration_s": 1.0, "outcome": "completed"})
    example = code_block(page_text(), "javascript", "waitForCompletion")
    done = subprocess.run(
        [node, "--input-type=module", "-e", substitute(example, sim_url, "exec_conf_js")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("Task completed successfully")


def test_answers_have_the_page_shapes(sim_url: str) -> None:
    text = page_text()
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_shape_run"], "duration_s": 600})
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_shape_ok"], "duration_s": 0.1, "outcome": "completed"})
    post(f"{sim_url}/_sim/executions", {"ids": ["exec_shape_bad"], "duration_s": 0.1, "outcome": "failed"})
    status_url = f"{sim_url}/api/v1/executions/{{}}/status"
    _, running = get(status_url.format("exec_shape_run"))
    pairs = [(json.loads(json_after(text, "Running")), json.loads(running))]
    for heading, execution_id in (("Completed", "exec_shape_ok"), ("Failed", "exec_shape_bad")):
        deadline = 50
        while deadline:
            body = json.loads(get(status_url.format(execution_id))[1])
            if body["status"] != "running":
                break
            deadline -= 1
            time.sleep(0.05)
        pairs.append((json.loads(json_after(text, heading)), body))
    for example, answer in pairs:
        assert answer["status"] == example["status"]
        # The contract adds metadata.execution_time to every terminal answer (a field of the page's table).
        added = {"metadata"} if answer["status"] == "failed" else set()
        assert set(answer) - added == set(example)
        for key, value in example.items():
            assert type(answer[key]) is type(value), key
            if isinstance(value, dict):
                assert set(answer[key]) == set(value)
    # The error bodies, byte for byte as on the page.
    assert get(status_url.format("exec_nothing")) == (404, json_after(text, "404 Not Found"))
    assert get(status_url.format("exec_shape_ok"), key="sk_live_wrong") == (
        401,
        json_after(text, "401 Unauthorized"),
    )
