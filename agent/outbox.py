"""Where QoS 1 events wait until the broker has acknowledged them.

An ``Outbox`` holds events (transitions, lifecycle) in production order until
their PUBACK arrives; a reconnect resends everything still in it, so a broker
outage loses nothing (subscribers drop the rare duplicate by ``seq``). It is
bounded: past ``capacity`` the oldest events are dropped and counted, so a gap is
visible rather than silent. ``MemoryOutbox`` keeps them in memory; a durable
spool that survives an agent restart implements the same protocol.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publication, ready to send."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox(Protocol):
    def put(self, message: Message) -> int:
        """Store an event; return its id (increasing)."""
        ...

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        """Up to ``limit`` stored events with id > ``after``, oldest first."""
        ...

    def ack(self, event_id: int) -> None:
        """The broker has it: forget it."""
        ...

    def __len__(self) -> int: ...

    @property
    def dropped(self) -> int:
        """Events dropped for lack of room since this outbox was created."""
        ...


class MemoryOutbox:
    """An in-memory ``Outbox``: survives broker outages, not agent restarts."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._events: OrderedDict[int, Message] = OrderedDict()
        self._next_id = 1
        self._dropped = 0

    def put(self, message: Message) -> int:
        event_id = self._next_id
        self._next_id += 1
        self._events[event_id] = message
        while len(self._events) > self.capacity:
            self._events.popitem(last=False)
            self._dropped += 1
        return event_id

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        out: list[tuple[int, Message]] = []
        for event_id, message in self._events.items():
            if event_id > after:
                out.append((event_id, message))
                if len(out) >= limit:
                    break
        return out

    def ack(self, event_id: int) -> None:
        self._events.pop(event_id, None)

    def __len__(self) -> int:
        return len(self._events)

    @property
    def dropped(self) -> int:
        return self._dropped
