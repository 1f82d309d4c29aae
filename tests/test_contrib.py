"""contrib/: the Prometheus alert rules and the Grafana dashboard name only metrics the daemon exposes.

The exposed names come from what `Metrics().render()` actually writes, read back with
prometheus_client's own parser; the names an expression uses come from its PromQL, with label
matchers, label lists, range selectors and function names taken out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import Metrics

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
# What a scraper stores for each family type (a counter family `x` is the series `x_total`).
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)")  # Grafana's variable query
_NAME = re.compile(r"[A-Za-z_:][\w:]*")


def exposed_series() -> set[str]:
    body, _ = Metrics().render()
    names: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        suffixes = SERIES_SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _LABEL_VALUES.sub(r"\1", expr)
    for pattern in (_STRING, _MATCHERS, _RANGE, _LABEL_LIST):
        text = pattern.sub(" ", text)
    names: set[str] = set()
    for match in _NAME.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((CONTRIB / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CONTRIB / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries(board: dict[str, Any]) -> Iterator[str]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield str(target["expr"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        yield str(query.get("query", "") if isinstance(query, dict) else query or "")


def test_the_expression_reader_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(execmon_detection_delay_seconds_bucket{instance=~"$i"}[5m])))'
        " > 2 and on (instance) execmon_budget_free unless absent(up)"
    )
    assert metric_names(expr) == {"execmon_detection_delay_seconds_bucket", "execmon_budget_free", "up"}
    assert metric_names("label_values(execmon_state_store_healthy, instance)") == {"execmon_state_store_healthy"}


def test_every_alert_names_only_exposed_metrics_and_covers_the_failures() -> None:
    exposed = exposed_series()
    rules = alert_rules()
    used: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exposed, f"{rule['alert']} names {sorted(names - exposed)}, which the daemon does not expose"
        used |= names
    assert len({r["alert"] for r in rules}) == len(rules)
    assert {
        "execmon_api_requests_total",  # the key rejected: polling stopped
        "execmon_state_store_healthy",
        "execmon_dead_letters",
        "execmon_outbox_depth",
        "execmon_event_loop_stalls_total",
        "execmon_event_loop_lag_seconds",
        "execmon_stalled_executions",
    } <= used


def test_every_dashboard_panel_names_only_exposed_metrics_and_covers_the_daemon() -> None:
    exposed = exposed_series()
    board = dashboard()
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    used: set[str] = set()
    for query in dashboard_queries(board):
        names = metric_names(query)
        assert names <= exposed, f"{query!r} names {sorted(names - exposed)}, which the daemon does not expose"
        used |= names
    assert all(panel["targets"] for panel in board["panels"])
    assert {
        "execmon_api_requests_total",
        "execmon_budget_used",
        "execmon_budget_free",
        "execmon_executions_tracked",
        "execmon_detection_delay_seconds_bucket",
        "execmon_sink_deliveries_total",
        "execmon_outbox_depth",
        "execmon_dead_letters",
        "execmon_event_loop_lag_seconds",
        "execmon_stalled_executions",
    } <= used


def test_the_stalled_gauge_is_per_kind_and_replaced_whole() -> None:
    metrics = Metrics()
    metrics.set_stalled({"etl": 2, "eval": 1})
    metrics.set_stalled({"etl": 3})
    body, _ = metrics.render()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "execmon_stalled_executions"
    }
    assert samples == {("execmon_stalled_executions", (("kind", "etl"),)): 3.0}
