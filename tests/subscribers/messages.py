"""A fake agent, and honest about it: it builds the messages a vcpu-agent would
publish (through ``agent.payloads`` and ``agent.topics``) without libvirt, so chain
checks can be driven through every interleaving, loss and duplicate."""

from __future__ import annotations

import itertools
import uuid as uuidlib
from dataclasses import dataclass, field

from agent.payloads import (
    DomainStatePayload,
    Gap,
    Lifecycle,
    StateName,
    Status,
    Transition,
    VcpuStatePayload,
)
from agent.topics import Topics

AT = "2026-11-26T09:00:00.000Z"
STATES: tuple[StateName, ...] = ("running", "halted", "offline", "unknown", "n/a", "blocked")
LABELS = {
    "running": "running",
    "halted": "running (halted)",
    "offline": "offline",
    "unknown": "no state",
    "n/a": "N/A",
    "blocked": "blocked",
}


@dataclass
class FakeAgent:
    """Publishes like an agent on ``host``: seqs per vCPU within ``epoch``."""

    host: str = "node1"
    prefix: str = "vcpu"
    epoch: str = "e1"
    seqs: dict[tuple[str, int], int] = field(default_factory=dict)
    states: dict[tuple[str, int], StateName] = field(default_factory=dict)
    lifecycle_seq: int = 0
    dropped_total: int = 0

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.prefix, host=self.host)

    def new_epoch(self, epoch: str) -> None:
        self.epoch = epoch
        self.seqs.clear()
        self.lifecycle_seq = 0
        self.dropped_total = 0

    def status(self, status: str = "online") -> tuple[str, Status]:
        body = Status(
            host=self.host,
            status="online" if status == "online" else "offline",
            version="0.1.0",
            started_at=AT,
            epoch=self.epoch,
            at=AT,
        )
        return self.topics.status, body

    def domain_state(self, domain: str, uuid: str, vcpus: int) -> tuple[str, DomainStatePayload]:
        body = DomainStatePayload(
            host=self.host,
            domain=domain,
            uuid=uuid,
            state="running",
            reason=1,
            vcpus_current=vcpus,
            vcpus_maximum=vcpus,
            at=AT,
        )
        return self.topics.domain_state(domain), body

    def vcpu_state(self, domain: str, uuid: str, vcpu: int) -> tuple[str, VcpuStatePayload]:
        state = self.states.setdefault((uuid, vcpu), "running")
        body = VcpuStatePayload(
            host=self.host,
            domain=domain,
            uuid=uuid,
            vcpu=vcpu,
            state=state,
            label=LABELS[state],
            source="cputime",
            ratio=None,
            since=AT,
            seq=self.seqs.get((uuid, vcpu), 0),
            epoch=self.epoch,
            at=AT,
        )
        return self.topics.vcpu_state(domain, vcpu), body

    def transition(
        self, domain: str, uuid: str, vcpu: int, to: StateName | None = None
    ) -> tuple[str, Transition]:
        key = (uuid, vcpu)
        before = self.states.setdefault(key, "running")
        after: StateName = next(s for s in STATES if s != before) if to is None else to
        self.seqs[key] = seq = self.seqs.get(key, 0) + 1
        self.states[key] = after
        body = Transition(
            host=self.host,
            domain=domain,
            uuid=uuid,
            vcpu=vcpu,
            from_state=before,
            to_state=after,
            source="cputime",
            ratio=0.5,
            at=AT,
            changed_at=AT,
            previous_duration_s=1.5,
            seq=seq,
            epoch=self.epoch,
            resync=False,
        )
        return self.topics.vcpu_transition(domain, vcpu), body

    def lifecycle(self, domain: str, uuid: str, event: str = "suspended") -> tuple[str, Lifecycle]:
        self.lifecycle_seq += 1
        body = Lifecycle(
            host=self.host,
            domain=domain,
            uuid=uuid,
            event=event,
            detail="paused",
            at=AT,
            seq=self.lifecycle_seq,
            epoch=self.epoch,
        )
        return self.topics.lifecycle(domain), body

    def gap(self, dropped: int) -> tuple[str, Gap]:
        self.dropped_total += dropped
        body = Gap(
            host=self.host,
            dropped=dropped,
            dropped_total=self.dropped_total,
            epoch=self.epoch,
            at=AT,
        )
        return self.topics.gap, body


def new_uuid() -> str:
    return str(uuidlib.uuid4())


_counter = itertools.count()


def unique(name: str) -> str:
    return f"{name}-{next(_counter)}"
