"""The rules of `monitor.learning.LearningKeeper` at unit level (a Monitor restarted on its state file
starts with what it learned: tests/test_monitor.py)."""

from __future__ import annotations

import logging

import pytest

from monitor.errors import StoreFault
from monitor.learning import LearningKeeper
from monitor.schedule.adaptive import AdaptivePolicy
from monitor.schedule.policy import BackoffPolicy


class _Store:
    """The two calls the keeper makes, counted; `fail` makes the write raise as a full disk would."""

    def __init__(self, text: str | None = None) -> None:
        self.text = text
        self.writes = 0
        self.fail = False

    def load_learning(self) -> str | None:
        return self.text

    def save_learning(self, text: str) -> None:
        if self.fail:
            raise StoreFault("disk full")
        self.writes += 1
        self.text = text


def _keeper(store: _Store, policy: AdaptivePolicy | BackoffPolicy, faults: list[StoreFault]) -> LearningKeeper:
    return LearningKeeper(store, policy, on_fault=faults.append, state_name="state.db")  # type: ignore[arg-type]


def test_unchanged_learning_is_not_rewritten_and_a_fault_is_reported() -> None:
    store, faults = _Store(), list[StoreFault]()
    policy = AdaptivePolicy()
    keeper = _keeper(store, policy, faults)
    keeper.save()
    keeper.save()
    assert store.writes == 1
    policy.import_learning({"runs": [{"kind": "etl", "n": 3, "mean": 7.0, "m2": 0.5}]})
    store.fail = True
    with pytest.raises(StoreFault):
        keeper.save()
    store.fail = False
    keeper.save()
    assert store.writes == 2
    assert store.text is not None
    assert '"kind":"etl"' in store.text


def test_a_policy_that_learns_nothing_writes_nothing() -> None:
    store, faults = _Store(), list[StoreFault]()
    keeper = _keeper(store, BackoffPolicy(), faults)
    keeper.load()
    keeper.save()
    assert store.writes == 0


def test_unreadable_learning_is_reported_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    store, faults = _Store("{not json"), list[StoreFault]()
    policy = AdaptivePolicy()
    with caplog.at_level(logging.WARNING, logger="monitor"):
        _keeper(store, policy, faults).load()
    assert "ignoring unreadable learned run times" in caplog.text
    assert policy.export_learning()["runs"] == []
