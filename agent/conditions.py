"""Whole-domain conditions for ``react --when`` (pure): state held for a while.

- ``all-halted=D``: every current vCPU of a running domain (``vcpus_current`` of
  its retained ``domain_state``) has been ``halted`` for at least D seconds;
- ``any-unknown=D``: a vCPU has been ``unknown`` (stats unreadable: a frozen QEMU, a
  hung monitor) for at least D seconds; one firing per vCPU.

"For D seconds" is measured from the states' ``since`` (the agent's estimate of
when each began, on the agent's clock) to this process's clock: hosts and
subscriber should run NTP. A condition fires once per *episode*, and an episode
has a stable identity (``Firing.key``: the epoch, vCPU and seq of the transition
that completed it), so the ledger can tell after a restart whether its hook ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from agent.chain import DomainCleared, EpochChanged, Event, VcpuCleared
from agent.payloads import DomainStatePayload, Transition, VcpuStatePayload, parse_rfc3339

ConditionName = Literal["all-halted", "any-unknown"]
NAMES: tuple[ConditionName, ...] = ("all-halted", "any-unknown")


@dataclass(frozen=True, slots=True)
class Condition:
    name: ConditionName
    hold: float  # seconds

    @classmethod
    def parse(cls, text: str) -> Condition:
        name, sep, seconds = text.partition("=")
        try:
            hold = float(seconds)
        except ValueError:
            hold = -1.0
        if not sep or name not in NAMES or not math.isfinite(hold) or hold < 0:
            raise ValueError(f"--when {text!r}: expected all-halted=SECONDS or any-unknown=SECONDS")
        return cls(name, hold)


@dataclass(frozen=True, slots=True)
class Firing:
    """A condition that has held long enough: what the hook is told."""

    condition: ConditionName
    hold: float
    host: str
    domain: str
    uuid: str
    vcpus: tuple[int, ...]  # the vCPUs it is about
    since: float  # when the episode began (UNIX time)
    key: tuple[str, int, int]  # (epoch, vcpu, seq) of the transition that completed it

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": "condition",
            "condition": self.condition,
            "hold_s": self.hold,
            "host": self.host,
            "domain": self.domain,
            "uuid": self.uuid,
            "vcpus": list(self.vcpus),
            "since": self.since,
            "epoch": self.key[0],
        }


@dataclass(slots=True)
class _Vcpu:
    state: str
    since: float
    epoch: str
    seq: int


@dataclass(slots=True)
class _Domain:
    uuid: str = ""
    running: bool = False
    current: int = 0
    vcpus: dict[int, _Vcpu] = field(default_factory=dict)


class DomainWatch:
    """Feed it the subscriber's events; ask ``due(now)`` for conditions to act on."""

    def __init__(self, conditions: tuple[Condition, ...]) -> None:
        self.conditions = conditions
        self._domains: dict[tuple[str, str], _Domain] = {}
        self._fired: set[tuple[str, str, ConditionName, tuple[str, int, int]]] = set()

    def apply(self, event: Event) -> None:
        if isinstance(event, DomainStatePayload):
            d = self._domains.setdefault((event.host, event.domain), _Domain())
            d.uuid = event.uuid
            d.running = event.state == "running"
            d.current = event.vcpus_current or 0
        elif isinstance(event, VcpuStatePayload | Transition):
            d = self._domains.setdefault((event.host, event.domain), _Domain())
            d.uuid = event.uuid
            if isinstance(event, Transition):
                state, since, seq = event.to_state, event.changed_at, event.seq
            else:
                state, since, seq = event.state, event.since, event.seq
            known = d.vcpus.get(event.vcpu)
            if known is not None and known.epoch == event.epoch and known.seq > seq:
                return  # older than what we know (state and transition topics interleave)
            d.vcpus[event.vcpu] = _Vcpu(state, _time(since), event.epoch, seq)
        elif isinstance(event, VcpuCleared):
            gone = self._domains.get((event.host, event.domain))
            if gone is not None:
                gone.vcpus.pop(event.vcpu, None)
        elif isinstance(event, DomainCleared):
            self._domains.pop((event.host, event.domain), None)
        elif isinstance(event, EpochChanged):
            for (host, _), d in self._domains.items():
                if host == event.host:
                    d.vcpus.clear()  # the new epoch's states follow

    def _candidates(self) -> list[tuple[Condition, Firing]]:
        found: list[tuple[Condition, Firing]] = []
        for (host, name), d in self._domains.items():
            for cond in self.conditions:
                if cond.name == "all-halted":
                    found.extend((cond, f) for f in self._all_halted(cond, host, name, d))
                else:
                    found.extend((cond, f) for f in self._any_unknown(cond, host, name, d))
        return found

    def _all_halted(self, cond: Condition, host: str, name: str, d: _Domain) -> list[Firing]:
        if not d.running or d.current <= 0:
            return []
        vcpus = [d.vcpus.get(n) for n in range(d.current)]
        if any(v is None or v.state != "halted" for v in vcpus):
            return []
        present = [(v.since, n, v) for n, v in enumerate(vcpus) if v is not None]
        since, last, v = max(present, key=lambda p: (p[0], p[1]))  # deterministic on ties
        key = (v.epoch, last, v.seq)
        everyone = tuple(range(d.current))
        return [Firing(cond.name, cond.hold, host, name, d.uuid, everyone, since, key)]

    def _any_unknown(self, cond: Condition, host: str, name: str, d: _Domain) -> list[Firing]:
        return [
            Firing(cond.name, cond.hold, host, name, d.uuid, (n,), v.since, (v.epoch, n, v.seq))
            for n, v in sorted(d.vcpus.items())
            if v.state == "unknown"
        ]

    def due(self, now: float) -> list[Firing]:
        """Conditions held for their time, each episode once (then remembered)."""
        out = []
        for cond, firing in self._candidates():
            mark = (firing.host, firing.uuid, cond.name, firing.key)
            if mark not in self._fired and now - firing.since >= cond.hold:
                self._fired.add(mark)
                out.append(firing)
        return out

    def next_due(self, now: float) -> float | None:
        """Seconds until the next episode comes due (None: none pending)."""
        waits = [
            max(0.0, firing.since + cond.hold - now)
            for cond, firing in self._candidates()
            if (firing.host, firing.uuid, cond.name, firing.key) not in self._fired
        ]
        return min(waits) if waits else None


def _time(text: str) -> float:
    try:
        return parse_rfc3339(text)
    except ValueError:
        return math.inf  # unparsable: never held long enough
