"""Changes -> MQTT messages (pure but for the sequence counters it advances).

Sequence numbers are per vCPU (transitions) and per domain (lifecycle events),
start at 1 and grow by 1 per message, so a subscriber can spot a duplicate (same
seq again) or a gap (a seq skipped). ``Sequencer`` keeps them; a durable spool can
seed it so they survive restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.model import LifecycleEvent
from agent.outbox import Message
from agent.payloads import (
    DomainStatePayload,
    Lifecycle,
    Payload,
    Transition,
    VcpuStatePayload,
    rfc3339,
)
from agent.topics import Topics
from agent.transitions import (
    Change,
    DomainRemoved,
    DomainStateSet,
    VcpuRemoved,
    VcpuStateSet,
    VcpuTransition,
)

Route = Literal["event", "state"]  # event: outbox, acked; state: retained mirror
SeqKey = tuple[str, int | None]  # (domain uuid, vCPU index or None for the domain)


@dataclass(slots=True)
class Sequencer:
    """Per-key counters; ``counters`` seeds them, ``on_next`` persists each step."""

    counters: dict[SeqKey, int] = field(default_factory=dict)
    # The durable spool's ``save_seq``: it writes the counter in the same transaction
    # as the event that carries it, so seqs survive restarts without going backwards.
    on_next: Callable[[SeqKey, int], None] | None = None

    def next(self, key: SeqKey) -> int:
        value = self.counters.get(key, 0) + 1
        self.counters[key] = value
        if self.on_next is not None:
            self.on_next(key, value)
        return value

    def current(self, key: SeqKey) -> int:
        return self.counters.get(key, 0)


@dataclass(slots=True)
class Renderer:
    topics: Topics
    qos: int
    seqs: Sequencer = field(default_factory=Sequencer)

    def _msg(self, topic: str, body: Payload | None, *, retain: bool) -> Message:
        return Message(topic, body.encode() if body is not None else b"", self.qos, retain)

    def change(self, change: Change) -> tuple[Route, Message]:
        host = self.topics.host
        match change:
            case VcpuTransition():
                body = Transition(
                    host=host,
                    domain=change.domain,
                    uuid=change.uuid,
                    vcpu=change.vcpu,
                    from_state=change.before.state.value,
                    to_state=change.after.state.value,
                    source=change.after.source.value,
                    ratio=_round(change.after.ratio),
                    at=rfc3339(change.at),
                    changed_at=rfc3339(change.changed_at),
                    previous_duration_s=round(change.previous_duration, 3),
                    seq=self.seqs.next((change.uuid, change.vcpu)),
                    resync=change.resync,
                )
                topic = self.topics.vcpu_transition(change.domain, change.vcpu)
                return "event", self._msg(topic, body, retain=False)
            case VcpuStateSet():
                state = VcpuStatePayload(
                    host=host,
                    domain=change.domain,
                    uuid=change.uuid,
                    vcpu=change.vcpu,
                    state=change.view.state.value,
                    label=change.view.state.label,
                    source=change.view.source.value,
                    ratio=_round(change.view.ratio),
                    since=rfc3339(change.since),
                    seq=self.seqs.current((change.uuid, change.vcpu)),
                    at=rfc3339(change.at),
                )
                topic = self.topics.vcpu_state(change.domain, change.vcpu)
                return "state", self._msg(topic, state, retain=True)
            case VcpuRemoved():
                topic = self.topics.vcpu_state(change.domain, change.vcpu)
                return "state", self._msg(topic, None, retain=True)
            case DomainStateSet():
                dom = DomainStatePayload(
                    host=host,
                    domain=change.domain,
                    uuid=change.uuid,
                    state=change.state.text,  # type: ignore[arg-type]  # names match the Literal
                    reason=change.reason,
                    vcpus_current=change.vcpu_current,
                    vcpus_maximum=change.vcpu_maximum,
                    at=rfc3339(change.at),
                )
                return "state", self._msg(self.topics.domain_state(change.domain), dom, retain=True)
            case DomainRemoved():
                return "state", self._msg(
                    self.topics.domain_state(change.domain), None, retain=True
                )

    def lifecycle(self, event: LifecycleEvent) -> Message:
        body = Lifecycle(
            host=self.topics.host,
            domain=event.name,
            uuid=event.uuid,
            event=event.event,
            detail=event.detail,
            at=rfc3339(event.t_wall),
            seq=self.seqs.next((event.uuid, None)),
        )
        return self._msg(self.topics.lifecycle(event.name), body, retain=False)


def _round(ratio: float | None) -> float | None:
    return None if ratio is None else round(ratio, 4)
