"""Typed status records parsed from the vendor's JSON, keeping the raw object for sinks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from monitor.api.errors import TransientError, TransientReason


class ExecutionStatus(StrEnum):
    """The `status` field, as far as the monitor is concerned."""

    RUNNING = "running"  # progress 0-100 while it works
    COMPLETED = "completed"  # terminal, with `result`
    FAILED = "failed"  # terminal, with `error`
    CANCELLED = "cancelled"  # terminal, no example body on the vendor page
    UNKNOWN = "unknown"  # any other value: not terminal, logged once, polled on

    @property
    def terminal(self) -> bool:
        return self in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One 200 answer. Missing fields are None; unknown fields stay in `raw`."""

    execution_id: str
    status: ExecutionStatus
    raw_status: str
    progress: int | None = None
    current_step: str | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    updated_at: str | None = None
    completed_at: str | None = None
    failed_at: str | None = None
    cancelled_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def finished_at(self) -> str | None:
        """The server's own end timestamp, whichever of the three it sent."""
        return self.completed_at or self.failed_at or self.cancelled_at


def _opt_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    return value if isinstance(value, str) else None


def _opt_dict(payload: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = payload.get(key)
    return value if isinstance(value, dict) else None


def _progress(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return max(0, min(100, int(value)))


def parse_status(execution_id: str, payload: object) -> StatusRecord:
    """Build a StatusRecord from a decoded JSON body.

    Raises TransientError(BAD_SHAPE) when the body is not an object with a string `status`,
    or when it names a different execution.
    """
    if not isinstance(payload, dict):
        raise TransientError(TransientReason.BAD_SHAPE, f"expected a JSON object, got {type(payload).__name__}")
    raw_status = payload.get("status")
    if not isinstance(raw_status, str):
        raise TransientError(TransientReason.BAD_SHAPE, "the JSON object has no string 'status'")
    echoed = payload.get("execution_id")
    if isinstance(echoed, str) and echoed != execution_id:
        raise TransientError(TransientReason.BAD_SHAPE, f"answer is for {echoed[:64]!r}, not {execution_id}")
    try:
        status = ExecutionStatus(raw_status)
    except ValueError:
        status = ExecutionStatus.UNKNOWN
    return StatusRecord(
        execution_id=execution_id,
        status=status,
        raw_status=raw_status,
        progress=_progress(payload.get("progress")),
        current_step=_opt_str(payload, "current_step"),
        result=payload.get("result"),
        error=_opt_dict(payload, "error"),
        metadata=_opt_dict(payload, "metadata"),
        updated_at=_opt_str(payload, "updated_at"),
        completed_at=_opt_str(payload, "completed_at"),
        failed_at=_opt_str(payload, "failed_at"),
        cancelled_at=_opt_str(payload, "cancelled_at"),
        raw=payload,
    )
