"""Metrics: one registry per instance, every series the daemon promises, Prometheus text out."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_every_method_feeds_its_series() -> None:
    metrics = Metrics()
    metrics.request("ok")
    metrics.request("ok")
    metrics.request("transient")
    metrics.throttled()
    metrics.set_budget(used=12, free=18)
    metrics.set_tracked({"running": 40, "completed": 60})
    metrics.observe_detection_delay(3.2)
    metrics.observe_detection_delay(-1)  # clock skew between vendor and us: counted as 0
    metrics.delivery("jsonl", "ok")
    metrics.delivery("webhook", "retry")
    metrics.set_outbox_depth(7)
    metrics.set_dead_letters(2)
    metrics.set_loop_lag(0.004)
    metrics.loop_stalled()
    s = samples(metrics)
    assert s[("execmon_api_requests_total", (("outcome", "ok"),))] == 2
    assert s[("execmon_api_requests_total", (("outcome", "transient"),))] == 1
    assert s[("execmon_api_throttled_total", ())] == 1
    assert s[("execmon_budget_used", ())] == 12
    assert s[("execmon_budget_free", ())] == 18
    assert s[("execmon_executions_tracked", (("state", "running"),))] == 40
    assert s[("execmon_executions_tracked", (("state", "completed"),))] == 60
    assert s[("execmon_detection_delay_seconds_count", ())] == 2
    assert s[("execmon_detection_delay_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("execmon_detection_delay_seconds_bucket", (("le", "5.0"),))] == 2
    assert s[("execmon_sink_deliveries_total", (("result", "ok"), ("sink", "jsonl")))] == 1
    assert s[("execmon_sink_deliveries_total", (("result", "retry"), ("sink", "webhook")))] == 1
    assert s[("execmon_outbox_depth", ())] == 7
    assert s[("execmon_dead_letters", ())] == 2
    assert s[("execmon_event_loop_lag_seconds", ())] == 0.004
    assert s[("execmon_event_loop_stalls_total", ())] == 1


def test_a_state_that_empties_disappears_from_the_breakdown() -> None:
    metrics = Metrics()
    metrics.set_tracked({"running": 3, "pending": 1})
    metrics.set_tracked({"completed": 4})
    s = samples(metrics)
    assert ("execmon_executions_tracked", (("state", "running"),)) not in s
    assert s[("execmon_executions_tracked", (("state", "completed"),))] == 4


def test_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.request("ok")
    assert ("execmon_api_requests_total", (("outcome", "ok"),)) not in samples(second)


def test_render_is_prometheus_text() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "# TYPE execmon_budget_free gauge" in text
    assert "# HELP execmon_detection_delay_seconds" in text
