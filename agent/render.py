"""Changes -> MQTT messages, and the chain they tell (pure but for the chain).

The chain is what subscribers were told: per vCPU the last state and the seq of
the transition into it, per domain the last lifecycle seq (``delivery.Told``).
The renderer is the only place that advances it, and it keeps one invariant by
construction: every change of a vCPU's published state is a transition whose
``from`` is the state subscribers were last told and whose ``seq`` is one more
than the last. When the tracker reports a state that differs from what was told
without a transition of its own (the first decision after an agent restart, a
vCPU that comes back), the renderer tells the change as a ``resync`` transition.

Each message comes with the chain record it carries, so the outbox can store
both in one transaction. Seqs start at 1 within an epoch (``Outbox.epoch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from agent.delivery import ChainUpdate, Message, SeqKey, Told
from agent.model import LifecycleEvent, VcpuView
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


class Outgoing(NamedTuple):
    """A message to publish and the chain record it carries (if any)."""

    message: Message
    told: ChainUpdate | None = None
    transition: Transition | None = None  # the body, when the message is a transition


@dataclass(slots=True)
class Renderer:
    topics: Topics
    qos: int
    epoch: str
    chain: dict[SeqKey, Told] = field(default_factory=dict)

    def _msg(self, topic: str, body: Payload | None, *, retain: bool) -> Message:
        return Message(topic, body.encode() if body is not None else b"", self.qos, retain)

    def change(self, change: Change) -> list[Outgoing]:
        match change:
            case VcpuTransition():
                return self._transition(change)
            case VcpuStateSet():
                return self._state(change)
            case VcpuRemoved():
                topic = self.topics.vcpu_state(change.domain, change.vcpu)
                return [Outgoing(self._msg(topic, None, retain=True))]
            case DomainStateSet():
                dom = DomainStatePayload(
                    host=self.topics.host,
                    domain=change.domain,
                    uuid=change.uuid,
                    state=change.state.text,  # type: ignore[arg-type]  # names match the Literal
                    reason=change.reason,
                    vcpus_current=change.vcpu_current,
                    vcpus_maximum=change.vcpu_maximum,
                    at=rfc3339(change.at),
                )
                topic = self.topics.domain_state(change.domain)
                return [Outgoing(self._msg(topic, dom, retain=True))]
            case DomainRemoved():
                topic = self.topics.domain_state(change.domain)
                return [Outgoing(self._msg(topic, None, retain=True))]

    def _transition(self, change: VcpuTransition) -> list[Outgoing]:
        told = self.chain.get((change.uuid, change.vcpu))
        before = change.before.state.value
        if told is not None and told.state is not None:
            if told.state == change.after.state.value:
                return []  # subscribers already hold this state (told as a resync)
            resync = change.resync or told.state != before
            before = told.state
        else:
            resync = change.resync
        return [
            self._tell(
                domain=change.domain,
                uuid=change.uuid,
                vcpu=change.vcpu,
                before=before,
                after=change.after,
                at=change.at,
                changed_at=change.changed_at,
                previous_duration=change.previous_duration,
                resync=resync,
            )
        ]

    def _state(self, change: VcpuStateSet) -> list[Outgoing]:
        key = (change.uuid, change.vcpu)
        told = self.chain.get(key)
        state = change.view.state.value
        out: list[Outgoing] = []
        update: ChainUpdate | None = None
        if told is None or told.state is None:
            # Never told (a new vCPU in this epoch): its first state enters at seq 0.
            told = Told(told.seq if told is not None else 0, state, change.since)
            update = (key, told)
        elif told.state != state:
            # Found, not seen: it changed while we could not look (docs/topics.md).
            # It happened before ``since`` (the first look), after the told state began.
            out.append(
                self._tell(
                    domain=change.domain,
                    uuid=change.uuid,
                    vcpu=change.vcpu,
                    before=told.state,
                    after=change.view,
                    at=change.at,
                    changed_at=change.since,
                    previous_duration=max(0.0, change.since - told.since),
                    resync=True,
                )
            )
            told = self.chain[key]
        body = VcpuStatePayload(
            host=self.topics.host,
            domain=change.domain,
            uuid=change.uuid,
            vcpu=change.vcpu,
            state=change.view.state.value,
            label=change.view.state.label,
            source=change.view.source.value,
            ratio=_round(change.view.ratio),
            since=rfc3339(told.since),
            seq=told.seq,
            epoch=self.epoch,
            at=rfc3339(change.at),
        )
        topic = self.topics.vcpu_state(change.domain, change.vcpu)
        out.append(Outgoing(self._msg(topic, body, retain=True), update))
        return out

    def _tell(
        self,
        *,
        domain: str,
        uuid: str,
        vcpu: int,
        before: str,
        after: VcpuView,
        at: float,
        changed_at: float,
        previous_duration: float,
        resync: bool,
    ) -> Outgoing:
        key = (uuid, vcpu)
        told = self.chain.get(key)
        seq = (told.seq if told is not None else 0) + 1
        new = Told(seq, after.state.value, changed_at)
        self.chain[key] = new
        body = Transition(
            host=self.topics.host,
            domain=domain,
            uuid=uuid,
            vcpu=vcpu,
            from_state=before,  # type: ignore[arg-type]  # a VcpuState value
            to_state=after.state.value,
            source=after.source.value,
            ratio=_round(after.ratio),
            at=rfc3339(at),
            changed_at=rfc3339(changed_at),
            previous_duration_s=round(previous_duration, 3),
            seq=seq,
            epoch=self.epoch,
            resync=resync,
        )
        topic = self.topics.vcpu_transition(domain, vcpu)
        return Outgoing(self._msg(topic, body, retain=False), (key, new), body)

    def lifecycle(self, event: LifecycleEvent) -> Outgoing:
        key: SeqKey = (event.uuid, None)
        told = self.chain.get(key)
        new = Told((told.seq if told is not None else 0) + 1)
        self.chain[key] = new
        body = Lifecycle(
            host=self.topics.host,
            domain=event.name,
            uuid=event.uuid,
            event=event.event,
            detail=event.detail,
            at=rfc3339(event.t_wall),
            seq=new.seq,
            epoch=self.epoch,
        )
        return Outgoing(
            self._msg(self.topics.lifecycle(event.name), body, retain=False), (key, new)
        )


def _round(ratio: float | None) -> float | None:
    return None if ratio is None else round(ratio, 4)
