"""What the policy learned (run times and curve bends per `kind`), kept in the state store.

A restarted daemon, or tomorrow's batch in the same state file or database, then starts from what
the earlier runs taught it instead of from priors. It is one small JSON row in `meta`, written when
it changed, once a minute and at a clean stop (a kill loses at most a minute of learning, nothing
else). With replicas every one saves what it learned from the runs it finished: the last save is
what the next one to start reads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from monitor.errors import StoreFault
from monitor.logs import get_logger
from monitor.schedule.base import Policy
from monitor.state.protocol import StateStore

log = get_logger(__name__)

SAVE_EVERY_S = 60.0  # learned run times change slowly


class LearningKeeper:
    """Loads the policy's learning from the store at start and saves it back when it changed."""

    def __init__(
        self, store: StateStore, policy: Policy, *, on_fault: Callable[[StoreFault], None], state_name: str
    ) -> None:
        self._store = store
        self._policy = policy
        self._on_fault = on_fault
        self._state_name = state_name
        self._saved: str | None = None  # the JSON last read or written: unchanged learning is not rewritten

    def load(self) -> None:
        """Hand the policy what an earlier process saved; unreadable text is reported and ignored."""
        text = self._store.load_learning()
        if text is None:
            return
        try:
            data = json.loads(text)
        except ValueError:
            log.warning("ignoring unreadable learned run times", state=self._state_name)
            return
        self._policy.import_learning(data)
        self._saved = text

    def save(self) -> None:
        """Write the policy's learning if it changed since the last save (raises StoreFault)."""
        learned = self._policy.export_learning()
        if learned is None:
            return
        text = json.dumps(learned, separators=(",", ":"), sort_keys=True)
        if text != self._saved:
            self._store.save_learning(text)
            self._saved = text

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            try:
                self.save()
            except StoreFault as exc:
                self._on_fault(exc)
