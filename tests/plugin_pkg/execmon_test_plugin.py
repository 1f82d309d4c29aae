"""A third-party sink as a plugin author would write it: appends each record to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.config import SinkConfig
from monitor.errors import UsageError


class RecorderSink:
    """Implements the Sink protocol without inheriting anything from execmon."""

    def __init__(self, path: Path, tag: str) -> None:
        self.name = "test-recorder"
        self.path = path
        self.tag = tag

    @classmethod
    def from_options(cls, options: dict[str, Any], common: SinkConfig) -> RecorderSink:
        unknown = sorted(set(options) - {"path", "tag"})
        if unknown:
            raise UsageError(f"{common.where(unknown[0])}: unknown key for the test-recorder sink")
        path = options.get("path")
        if not isinstance(path, str):
            raise common.error("path", "a file path", path)
        return cls(Path(path), str(options.get("tag", "")))

    async def open(self) -> None:
        self.path.touch()

    async def send(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"tag": self.tag, "record": record}) + "\n")

    async def close(self) -> None:
        return None
