"""`Result`: one execution's terminal outcome as the Python API hands it out.

Built from the result record (the contract's JSON object that every sink receives), so that a
result read back from the state store after a restart is the same as the one seen live.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from monitor.clock import parse_iso
from monitor.records import Outcome


@dataclass(frozen=True, slots=True)
class Result:
    """How one execution ended. Immutable; `record()` gives the full result record."""

    execution_id: str
    outcome: Outcome
    result: Any
    error: Any
    metadata: Mapping[str, Any] | None
    progress: int | None
    finished_at: datetime | None  # the server's end time, when it gave one
    observed_at: datetime | None  # when execmon saw the end
    event_id: str
    _record: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Result:
        progress = record.get("progress")
        return cls(
            execution_id=str(record["execution_id"]),
            outcome=Outcome(record["outcome"]),
            result=record.get("result"),
            error=record.get("error"),
            metadata=record.get("metadata"),
            progress=progress if isinstance(progress, int) else None,
            finished_at=_aware(record.get("finished_at")),
            observed_at=_aware(record.get("observed_at")),
            event_id=str(record["event_id"]),
            _record=copy.deepcopy(dict(record)),
        )

    def record(self) -> dict[str, Any]:
        """The result record exactly as the sinks receive it (a copy: changing it changes nothing here)."""
        return copy.deepcopy(dict(self._record))


def _aware(value: object) -> datetime | None:
    """An ISO text as an aware datetime (UTC), or None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    stamp = parse_iso(value)
    return None if stamp is None else datetime.fromtimestamp(stamp, tz=UTC)
