"""The public API is what the contract lists ("The Python API"): no more, no less (as httpx tests it)."""

from __future__ import annotations

import importlib

import monitor

# The contract's names, plus the version string the package has always exported.
CONTRACT = {"Monitor", "Outcome", "Result", "ExecmonError", "KeyRejectedError", "MonitorFailed", "__version__"}


def test_exported_members() -> None:
    module = importlib.import_module("monitor")
    for name in monitor.__all__:
        assert hasattr(module, name), name
    assert set(monitor.__all__) == CONTRACT
    assert len(monitor.__all__) == len(set(monitor.__all__))


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from monitor import *", namespace)  # what users write
    assert set(namespace) - {"__builtins__"} == CONTRACT


def test_errors_share_one_root() -> None:
    assert issubclass(monitor.KeyRejectedError, monitor.ExecmonError)
    assert issubclass(monitor.MonitorFailed, monitor.ExecmonError)
    assert issubclass(monitor.ExecmonError, Exception)


def test_outcome_is_a_str_enum_with_the_contract_members() -> None:
    assert [o.value for o in monitor.Outcome] == ["completed", "failed", "cancelled", "not_found", "timed_out"]
    assert all(isinstance(o, str) for o in monitor.Outcome)
