"""The delivery protocol: what the publisher needs from whatever holds the stream.

Everything the agent publishes for a vCPU or a domain (transitions, lifecycle
events *and* retained states) goes through one ordered ``Outbox``; the broker is
handed entries in that order and an entry leaves only when the broker has
acknowledged it. So per vCPU the publish order is the order of decision, across
outages and restarts: nothing sent on a reconnect can overtake an older event.

Beside the queue an outbox keeps the *chain*: per vCPU what subscribers were last
told (the state and the seq of the transition into it), and per domain the last
lifecycle seq. A chain record is stored with the message that carries it (one
transaction for the durable spool), so a restart continues the story exactly
where subscribers were left. Seqs are numbered within an ``epoch``: a fresh
outbox (memory-only agent restarted, a new or replaced spool file) starts a new
one, and every payload names it.

Two implementations: ``MemoryOutbox`` (here; survives broker outages, not agent
restarts) and ``agent.spool.SqliteSpool`` (survives both).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Protocol

SeqKey = tuple[str, int | None]  # (domain UUID, vCPU index; None: the domain's lifecycle)


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publication, ready to send."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Told(NamedTuple):
    """What subscribers were last told about one key of the chain.

    For a vCPU: the state they were told and the seq of the transition into it
    (0 when no transition has entered it yet), and when that state began. For a
    domain's lifecycle counter only ``seq`` is meaningful.
    """

    seq: int
    state: str | None = None
    since: float = 0.0


ChainUpdate = tuple[SeqKey, Told]


def new_epoch() -> str:
    """A fresh, random epoch name: 12 hex digits, compared only for equality."""
    return secrets.token_hex(6)


class Outbox(Protocol):
    """An ordered, bounded queue of messages plus the chain they tell."""

    @property
    def epoch(self) -> str:
        """The numbering space of every seq in this outbox's chain."""
        ...

    def chain(self) -> dict[SeqKey, Told]:
        """What subscribers were told, per key: seeds the renderer at start."""
        ...

    def put(self, message: Message, told: ChainUpdate | None = None) -> int:
        """Queue a message (and the chain record it carries); return its id.

        Ids grow. A retained message supersedes a queued retained message for
        the same topic (only the latest value of a topic is worth sending). Past
        the capacity the oldest entries are dropped and counted in ``dropped``.
        """
        ...

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        """Up to ``limit`` queued entries with id > ``after``, oldest first."""
        ...

    def ack(self, entry_id: int) -> None:
        """The broker has it: forget it (an unknown id is ignored)."""
        ...

    def drop(self, entry_id: int) -> None:
        """The broker can never take this entry (too large): remove it and count it
        in ``dropped``, so a ``gap`` message tells subscribers."""
        ...

    def __len__(self) -> int:
        """Entries queued and not yet acknowledged."""
        ...

    @property
    def dropped(self) -> int:
        """Entries dropped for lack of room in this epoch."""
        ...

    @property
    def gap_reported(self) -> int:
        """How many of ``dropped`` an acknowledged ``gap`` message announced."""
        ...

    def record_gap_reported(self, total: int) -> None: ...

    def flush(self) -> bool:
        """Make everything put and told so far durable (one transaction).

        The publisher calls it before handing entries to the broker. Acks may be
        written later, in batches (an acked entry kept after a crash is only sent
        once more). False when it could not be written: the entries stay queued
        in memory and are still delivered; the next flush tries again.
        """
        ...

    def close(self) -> None:
        """Write what is buffered and release the storage (a clean stop)."""
        ...


class Put(NamedTuple):
    """What ``Queue.put`` did."""

    entry_id: int
    superseded: int | None  # the queued retained message of the same topic it replaced
    dropped: list[int]  # the oldest entries it pushed out for room


class Queue:
    """The ordered, bounded, topic-coalescing queue both outboxes keep in memory."""

    def __init__(self, capacity: int, next_id: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.entries: OrderedDict[int, Message] = OrderedDict()
        self._retained: dict[str, int] = {}  # topic -> id of its queued retained message
        self.next_id = next_id

    def load(self, entry_id: int, message: Message) -> None:
        """Re-queue a stored entry (ids in increasing order)."""
        self.entries[entry_id] = message
        if message.retain:
            self._retained[message.topic] = entry_id
        self.next_id = max(self.next_id, entry_id + 1)

    def put(self, message: Message) -> Put:
        """Queue a message; say what it superseded and what overflow dropped."""
        superseded = None
        if message.retain:
            old = self._retained.pop(message.topic, None)
            if old is not None and self.entries.pop(old, None) is not None:
                superseded = old
        entry_id = self.next_id
        self.next_id += 1
        self.entries[entry_id] = message
        if message.retain:
            self._retained[message.topic] = entry_id
        dropped: list[int] = []
        while len(self.entries) > self.capacity:
            old_id, old_msg = self.entries.popitem(last=False)
            self._forget(old_id, old_msg)
            dropped.append(old_id)
        return Put(entry_id, superseded, dropped)

    def ack(self, entry_id: int) -> bool:
        message = self.entries.pop(entry_id, None)
        if message is None:
            return False
        self._forget(entry_id, message)
        return True

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        out: list[tuple[int, Message]] = []
        if not self.entries or limit <= 0:
            return out
        for entry_id, message in self.entries.items():
            if entry_id > after:
                out.append((entry_id, message))
                if len(out) >= limit:
                    break
        return out

    def _forget(self, entry_id: int, message: Message) -> None:
        if message.retain and self._retained.get(message.topic) == entry_id:
            del self._retained[message.topic]


class MemoryOutbox:
    """An ``Outbox`` in memory: survives broker outages, not agent restarts.

    Each instance is a new epoch: a restarted memory-only agent numbers its seqs
    from 1 again, and says so with a new epoch.
    """

    def __init__(self, capacity: int) -> None:
        self._queue = Queue(capacity)
        self._chain: dict[SeqKey, Told] = {}
        self._epoch = new_epoch()
        self._dropped = 0
        self._gap_reported = 0

    @property
    def epoch(self) -> str:
        return self._epoch

    def chain(self) -> dict[SeqKey, Told]:
        return dict(self._chain)

    def put(self, message: Message, told: ChainUpdate | None = None) -> int:
        done = self._queue.put(message)
        self._dropped += len(done.dropped)
        if told is not None:
            self._chain[told[0]] = told[1]
        return done.entry_id

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        return self._queue.pending(after, limit)

    def ack(self, entry_id: int) -> None:
        self._queue.ack(entry_id)

    def drop(self, entry_id: int) -> None:
        if self._queue.ack(entry_id):
            self._dropped += 1

    def __len__(self) -> int:
        return len(self._queue.entries)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def gap_reported(self) -> int:
        return self._gap_reported

    def record_gap_reported(self, total: int) -> None:
        self._gap_reported = max(self._gap_reported, total)

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        pass
