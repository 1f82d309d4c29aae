"""One error root for everything execmon raises; exit statuses are mapped only in `monitor.cli`."""

from __future__ import annotations


class ExecmonError(Exception):
    """The root: every error execmon raises on purpose derives from this one."""


class UsageError(ExecmonError):
    """Bad input from the user: a flag, a config value, an ID, a state file that cannot be used."""


class KeyRejectedError(ExecmonError):
    """The API key was rejected (401): nothing more is sent with it until it is replaced."""


class MonitorFailed(ExecmonError):
    """execmon itself could not go on (an internal task died, the state store failed past its
    grace period). The cause is chained (`__cause__`); nothing delivered is lost, and a restart
    with the same state resumes."""


class StoreFault(ExecmonError):
    """A transient fault of the state store (disk full, I/O error, database busy): not corruption.
    Polling pauses and the store is retried; the operation that raised it did not happen."""


class LeaseLost(ExecmonError):
    """Replicas: another replica holds this execution now (this one's lease lapsed and was taken).
    What this replica was about to write for it was not written; the new owner reports the result.
    Not a StoreFault: the store works, this replica just no longer owns the execution."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"execution {execution_id} is held by another replica now")
        self.execution_id = execution_id
