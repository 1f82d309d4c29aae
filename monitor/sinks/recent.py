"""The event_ids a sink wrote last: a duplicate check bounded in memory (the jsonl and stdout sinks).

Why a bounded window is enough: a record is sent to a sink again only while the outbox has not
recorded that the sink confirmed it, i.e. it was among
- the sends in flight when the process was killed (at most the sink's `concurrency`);
- sends that timed out but still finished (retried after a backoff of seconds to minutes);
- after a power cut, the confirmations since the last fsynced commit (a confirmation is not
  fsynced, every terminal result is).
So a duplicate can only be one of the most recent lines written. RECENT_EVENT_IDS covers that with a
wide margin while bounding memory (about 1 MB) and the jsonl sink's start-up read (its last lines).
A receiver can always drop what gets past it by `event_id` (e.g. a power cut in the middle of
draining a larger backlog).
"""

from __future__ import annotations

from collections import OrderedDict

RECENT_EVENT_IDS = 10_000


class RecentIds:
    """The last `capacity` event_ids added, each with a number of the caller's; the oldest go first."""

    def __init__(self, capacity: int = RECENT_EVENT_IDS) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, int] = OrderedDict()  # O(1) to drop the oldest, unlike a dict

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def get(self, event_id: str) -> int | None:
        return self._ids.get(event_id)

    def add(self, event_id: str, number: int = 0) -> None:
        self._ids[event_id] = number
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
