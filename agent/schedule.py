"""When to sample: the regular ticks and bulk calls, and re-samples between them (pure).

``Ticks`` is the clock of regular samples (below). ``Resamples`` says when to
look again at single domains between them.

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

import enum
import heapq
import math
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


class Due(enum.Enum):
    """What a regular sample is, when one is due."""

    BULK = "bulk"  # the libvirt bulk call (it reads /proc for the domains /proc serves)
    FAST = "fast"  # /proc only, for the domains it serves


@dataclass(slots=True)
class Ticks:
    """The regular samples' clock: every ``interval`` a tick, some of them bulk calls.

    A tick reads /proc for the domains it serves; the bulk call takes a tick's
    place every ``every`` seconds (the caller's pace: ``libvirt_interval`` while a
    running domain is not on /proc, longer while /proc serves them all). With
    nothing on /proc a tick has nothing to read, so the clock waits for the bulk
    call. A late tick is not made up for: the clock never bursts to catch up.
    """

    interval: float
    start: float  # monotonic time of the first tick
    _next: float = 0.0
    _last_bulk: float = -math.inf

    def __post_init__(self) -> None:
        self._next = self.start

    def due(self, now: float, *, fast: bool, every: float) -> Due | float:
        """What is due at ``now``, or (nothing due) the monotonic time to look again.

        ``fast``: /proc serves some domain; ``every``: the bulk call's period now.
        """
        # Half a tick of slack: a bulk call due at a tick is not put off to the next
        # one by the clock's jitter.
        bulk_at = self._last_bulk + every - self.interval / 2
        at = self._next if fast else max(self._next, bulk_at)
        if now < at:
            return at
        self._next += self.interval
        if self._next < now:
            self._next = now + self.interval
        if now >= bulk_at:
            self._last_bulk = now
            return Due.BULK
        return Due.FAST
