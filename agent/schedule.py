"""When to re-sample single domains between regular samples (pure).

Two reasons to look again before the next tick (docs/design.md, "Latency"):

- a lifecycle event: look at once, and again ``followup`` seconds later (the
  first look after a start or resume can only take a counter baseline);
- a *suspect* vCPU, whose share moved toward the other state without deciding
  it: look again ``confirm_after`` seconds later, once per domain at a time.

While a libvirt call is stalled, due re-samples are dropped rather than run: only
the spare worker thread is left, and the next regular sample covers every domain
anyway (a per-domain call was seen to block behind a frozen QEMU's monitor where
the bulk call did not; docs/reliability.md, "libvirt faults").
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Resamples:
    followup: float  # sampling.event_followup; 0 = no second look
    confirm_after: float  # sampling.confirm_after; 0 = never
    _heap: list[tuple[float, str]] = field(default_factory=list)  # (monotonic due, UUID)
    _confirming: set[str] = field(default_factory=set)  # UUIDs with a confirmation queued

    def lifecycle(self, uuid: str, now: float) -> None:
        heapq.heappush(self._heap, (now, uuid))
        if self.followup > 0:
            heapq.heappush(self._heap, (now + self.followup, uuid))

    def suspects(self, uuids: Iterable[str], now: float) -> None:
        if self.confirm_after <= 0:
            return
        due = now + self.confirm_after
        for uuid in set(uuids) - self._confirming:
            self._confirming.add(uuid)
            heapq.heappush(self._heap, (due, uuid))

    def take(self, now: float, *, stalled: bool = False) -> set[str]:
        """The domains due by ``now`` (none while stalled: they are dropped)."""
        due: set[str] = set()
        while self._heap and self._heap[0][0] <= now:
            due.add(heapq.heappop(self._heap)[1])
        self._confirming -= due
        return set() if stalled else due

    def next_at(self) -> float | None:
        """When the earliest re-sample is due (monotonic), if any."""
        return self._heap[0][0] if self._heap else None
