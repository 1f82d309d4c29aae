"""The notify sink's words: one short line per record, for a person reading a chat channel or a mail.

`message(record)` gives the line and its level (Apprise's notify types: success, failure, warning,
info, which services show as colours or icons); `summary(records)` the one line that stands for
records folded past `max_per_minute`. Everything here is pure: no I/O, no Apprise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SUCCESS, FAILURE, WARNING, INFO = "success", "failure", "warning", "info"
SHOWN_IDS = 5  # IDs a line lists before "… (+N)"
_ERROR_CHARS = 300  # an error message longer than this is cut: a chat line, not a log
# Outcomes in the order a line lists them, and how a sentence says them.
_OUTCOME_WORDS = {
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "timed out",
    "not_found": "not found",
}
_KIND_WORDS = {"stalled": "stalled", "resumed": "resumed", "group": "group digest"}


def message(record: Mapping[str, Any]) -> tuple[str, str]:
    """One record's line and level; a kind this version does not know gets a generic line."""
    render = _RENDERERS.get(str(record.get("kind", "execution")), _generic)
    return render(record)


def summary(records: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """ "and 14 more: 12 completed, 2 failed — failed: exec_a, exec_b" for records folded into one message."""
    labels = Counter(_label(r) for r in records)
    order = [*_OUTCOME_WORDS.values(), *_KIND_WORDS.values()]
    ranked = sorted(labels.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    counts = ", ".join(f"{n} {label}" for label, n in ranked)
    unfinished = [r for r in records if _is_execution(r) and r.get("outcome") != "completed"]
    text = f"and {len(records)} more: {counts}"
    if unfinished:
        outcomes = {str(r.get("outcome")) for r in unfinished}
        text += _id_list(outcomes, [str(r.get("execution_id", "?")) for r in unfinished])
    return text, _worst(records)


# -- one record ------------------------------------------------------------------------------


def _execution(record: Mapping[str, Any]) -> tuple[str, str]:
    """ "exec_123 failed after 12m 3s (group nightly): Task execution failed"."""
    outcome = str(record.get("outcome"))
    ran = _seconds((record.get("metadata") or {}).get("execution_time"))
    after = f" after {human_duration(ran)}" if ran is not None else ""
    head = str(record.get("execution_id", "?"))
    text = {
        "completed": f"{head} completed{after}",
        "failed": f"{head} failed{after}",
        "cancelled": f"{head} was cancelled{after}",
        "timed_out": f"{head} timed out: still running at its deadline",
        "not_found": f"{head} was not found (the API no longer knows it)",
    }.get(outcome, f"{head} ended: {outcome}")
    text += _group(record)
    error = error_text(record.get("error"))
    if error and outcome != "completed":
        text += f": {error}"
    return text, _outcome_level(outcome)


def _group_digest(record: Mapping[str, Any]) -> tuple[str, str]:
    """ "nightly: 291 completed, 9 did not (7 failed, 2 cancelled) — failed: exec_a, exec_b, … (+5)"."""
    outcomes = {str(k): int(v) for k, v in (record.get("outcomes") or {}).items() if isinstance(v, int)}
    total = int(record.get("total") or sum(outcomes.values()))
    done = outcomes.get("completed", 0)
    name = str(record.get("group") or "group")
    if done == total:
        return f"{name}: all {total} completed", SUCCESS
    others = {k: n for k, n in outcomes.items() if k != "completed" and n}
    text = f"{name}: {done} completed, {total - done} did not ({_counts(others)})"
    ids = [str(i) for i in record.get("failed_ids") or []]
    if ids:
        text += _id_list(set(others), ids)
    return text, FAILURE if done == 0 else WARNING


def _stalled(record: Mapping[str, Any]) -> tuple[str, str]:
    """ "exec_123 stalled at 40% (step 3/5) for 30m"."""
    text = f"{record.get('execution_id', '?')} stalled{_progress(record)}"
    step = record.get("current_step")
    if step:
        text += f" (step {_one_line(str(step), 80)})"
    stalled_for = _seconds(record.get("stalled_for_s"))
    if stalled_for is not None:
        text += f" for {human_duration(stalled_for)}"
    return text + _group(record), WARNING


def _resumed(record: Mapping[str, Any]) -> tuple[str, str]:
    """ "exec_123 resumed at 45% after 32m stalled"."""
    text = f"{record.get('execution_id', '?')} resumed{_progress(record)}"
    stalled_for = _seconds(record.get("stalled_for_s"))
    if stalled_for is not None:
        text += f" after {human_duration(stalled_for)} stalled"
    return text + _group(record), INFO


def _generic(record: Mapping[str, Any]) -> tuple[str, str]:
    kind = _one_line(str(record.get("kind", "?")), 40)
    about = record.get("execution_id") or record.get("group")
    text = f"execmon: a '{kind}' record" + (f" for {_one_line(str(about), 80)}" if about else "")
    return text + f" (event {record.get('event_id', '?')})", INFO


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], tuple[str, str]]] = {
    "execution": _execution,
    "group": _group_digest,
    "stalled": _stalled,
    "resumed": _resumed,
}


# -- pieces ------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """45s, 12m 3s, 2h 5m, 3d 4h: two units at most, as people say it."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    first = next((i for i, (n, _) in enumerate(units) if n), len(units) - 1)
    shown = [f"{n}{unit}" for n, unit in units[first : first + 2] if n or unit == units[first][1]]
    return " ".join(shown)


def error_text(error: object) -> str:
    """The API's error as one line: its message, then its details when they add something."""
    if isinstance(error, Mapping):
        parts = [str(error[key]) for key in ("message", "details") if error.get(key)]
        text = ": ".join(parts) or str(error.get("code") or "")
    else:
        text = str(error) if error else ""
    return _one_line(text, _ERROR_CHARS)


def _id_list(outcomes: set[str], ids: Sequence[str]) -> str:
    label = "failed" if outcomes == {"failed"} else "did not complete"
    shown = ", ".join(ids[:SHOWN_IDS])
    more = f", … (+{len(ids) - SHOWN_IDS})" if len(ids) > SHOWN_IDS else ""
    return f" — {label}: {shown}{more}"


def _counts(outcomes: Mapping[str, int]) -> str:
    order = list(_OUTCOME_WORDS)
    ranked = sorted(outcomes.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    return ", ".join(f"{n} {_OUTCOME_WORDS.get(k, k)}" for k, n in ranked)


def _label(record: Mapping[str, Any]) -> str:
    if _is_execution(record):
        outcome = str(record.get("outcome"))
        return _OUTCOME_WORDS.get(outcome, outcome)
    kind = str(record.get("kind"))
    return _KIND_WORDS.get(kind, kind)


def _worst(records: Sequence[Mapping[str, Any]]) -> str:
    levels = {message(r)[1] for r in records}
    return next(level for level in (FAILURE, WARNING, INFO, SUCCESS) if level in levels)


def _outcome_level(outcome: str) -> str:
    return {"completed": SUCCESS, "failed": FAILURE, "timed_out": FAILURE}.get(outcome, WARNING)


def _is_execution(record: Mapping[str, Any]) -> bool:
    return str(record.get("kind", "execution")) == "execution"


def _group(record: Mapping[str, Any]) -> str:
    group = record.get("group")
    return f" (group {_one_line(str(group), 80)})" if group else ""


def _progress(record: Mapping[str, Any]) -> str:
    progress = record.get("progress")
    return f" at {progress}%" if isinstance(progress, int | float) and not isinstance(progress, bool) else ""


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
