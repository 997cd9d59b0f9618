"""Each vCPU's chain of transitions, checked on the subscriber side (pure).

The agent's contract (docs/topics.md, docs/subscribers.md): per (host, domain
UUID, vCPU) and *epoch*, transitions carry ``seq`` 1, 2, 3, ... and each one's
``from`` is the previous one's ``to``. A new epoch (new spool, restarted
memory-only agent) starts every seq at 1 again. ``ChainTracker.feed`` takes the
decoded messages in arrival order and returns what a subscriber should see:

- a transition seen before (same seq: a QoS 1 redelivery) is dropped and counted;
- a skipped seq becomes a ``SeqGap`` event before the transition, ``explained``
  when the host announced overflow drops (a ``gap`` message) since the vCPU's
  previous transition;
- a ``from`` that is not the previous ``to`` becomes a ``ChainBroken`` event;
- a host whose epoch changes yields an ``EpochChanged`` event, and its chains
  start over; messages of an epoch already superseded are delivered but never
  move a chain (``stale`` counts them).

Retained states and transitions travel on different topics, and MQTT orders
messages only within a topic, so they are reconciled by seq, not by arrival:
a retained ``vcpu_state`` with seq s is the state after transition s. The first
thing known about a chain (a ledger seed, the retained state, or the start of an
epoch we saw begin) is its base; transitions at or below a base that came from a
retained state are not duplicates (the state simply arrived first) and are
delivered once each.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.payloads import (
    DomainStatePayload,
    Gap,
    Lifecycle,
    Payload,
    Status,
    Transition,
    VcpuStatePayload,
)

MAX_MISSING = 1024  # seqs remembered per vCPU as missing, so a late one is still delivered
MAX_OLD_EPOCHS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class SeqGap:
    """Transitions ``first``..``last`` of one vCPU never arrived (yet)."""

    host: str
    domain: str
    uuid: str
    vcpu: int
    epoch: str
    first: int
    last: int
    explained: bool  # the host announced overflow drops (a ``gap`` message) before it

    @property
    def missing(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainBroken:
    """Transition ``seq`` starts from ``got``, but the previous one ended in ``expected``."""

    host: str
    domain: str
    uuid: str
    vcpu: int
    epoch: str
    seq: int
    expected: str
    got: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochChanged:
    """The host's agent numbers its seqs anew: every chain of the host starts over."""

    host: str
    old: str
    new: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VcpuCleared:
    """A vCPU's retained state was cleared: the vCPU is gone."""

    host: str
    domain: str
    vcpu: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainCleared:
    """A domain's retained state was cleared: the domain is gone."""

    host: str
    domain: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BadMessage:
    """A message that is not a valid vcpu-agent message (counted, logged, skipped)."""

    topic: str
    reason: str  # short and stable: "topic", "json", "schema", "kind", "too-large", ...
    detail: str


@dataclass(frozen=True, slots=True)
class Synced:
    """The retained tree present when the subscription began has arrived (client)."""


ChainEvent = SeqGap | ChainBroken | EpochChanged
Event = (
    Transition
    | VcpuStatePayload
    | DomainStatePayload
    | Lifecycle
    | Status
    | Gap
    | SeqGap
    | ChainBroken
    | EpochChanged
    | VcpuCleared
    | DomainCleared
    | BadMessage
    | Synced
)


@dataclass(frozen=True, slots=True)
class Seed:
    """Where a chain stood when a subscriber last stopped (from its ledger)."""

    host: str
    uuid: str
    vcpu: int
    epoch: str
    seq: int
    state: str  # the ``to`` of transition ``seq``


class _Chain:
    __slots__ = ("below", "epoch", "first", "from_state", "markers", "missing", "seq", "to")

    def __init__(self, epoch: str, seq: int | None, to: str | None, markers: int) -> None:
        self.epoch = epoch
        self.seq = seq  # the base: highest seq known (None: nothing known yet)
        self.to = to  # the state after ``seq`` (None: unknown)
        self.from_state = False  # the base came from a retained state
        self.below: set[int] = set()  # seqs <= a state base delivered since
        self.missing: set[int] = set()
        self.markers = markers  # the host's gap-marker count at the last transition
        self.first: int | None = None  # seq of a first-sight transition, until a state comes


class _Host:
    __slots__ = ("begun", "epoch", "lifecycle", "markers", "old")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.begun = False  # we saw this epoch begin: its chains start at seq 0
        self.old: list[str] = []
        self.markers = 0  # gap markers received in this epoch
        self.lifecycle: dict[str, int] = {}  # domain uuid -> highest lifecycle seq


class ChainTracker:
    """Feed decoded messages in arrival order; get the events a subscriber sees."""

    def __init__(self, seeds: Iterable[Seed] = ()) -> None:
        self._hosts: dict[str, _Host] = {}
        self._chains: dict[tuple[str, str, int], _Chain] = {}
        self.duplicates = 0
        self.gaps = 0
        self.missing = 0
        self.late = 0
        self.broken = 0
        self.epoch_changes = 0
        self.stale = 0
        for seed in seeds:
            host = self._host(seed.host)
            if host.epoch is None:
                host.epoch = seed.epoch
            if seed.epoch == host.epoch:
                self._chains[(seed.host, seed.uuid, seed.vcpu)] = _Chain(
                    seed.epoch, seed.seq, seed.state, 0
                )

    def _host(self, name: str) -> _Host:
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = _Host()
        return host

    def epoch_of(self, host: str) -> str | None:
        known = self._hosts.get(host)
        return None if known is None else known.epoch

    def _current(self, name: str, epoch: str, out: list[Event]) -> bool:
        """Is ``epoch`` the host's current one? A new one is announced in ``out``."""
        host = self._host(name)
        if host.epoch == epoch:
            return True
        if host.epoch is None:
            host.epoch = epoch
            return True
        if epoch in host.old:
            self.stale += 1
            return False
        out.append(EpochChanged(host=name, old=host.epoch, new=epoch))
        self.epoch_changes += 1
        host.old.append(host.epoch)
        del host.old[:-MAX_OLD_EPOCHS]
        host.epoch = epoch
        host.begun = True
        host.markers = 0
        host.lifecycle.clear()
        return True

    def _chain(self, host: str, uuid: str, vcpu: int, epoch: str) -> _Chain:
        key = (host, uuid, vcpu)
        chain = self._chains.get(key)
        if chain is None or chain.epoch != epoch:
            h = self._hosts[host]
            chain = _Chain(epoch, 0 if h.begun else None, None, h.markers)
            self._chains[key] = chain
        return chain

    def feed(self, body: Payload) -> list[Event]:
        """The events one decoded message yields (empty for a duplicate)."""
        out: list[Event] = []
        if isinstance(body, Transition):
            self._transition(body, out)
        elif isinstance(body, VcpuStatePayload):
            if self._current(body.host, body.epoch, out):
                self._state(body, out)
                out.append(body)
        elif isinstance(body, Lifecycle):
            if self._current(body.host, body.epoch, out):
                seen = self._hosts[body.host].lifecycle
                if body.seq <= seen.get(body.uuid, 0):
                    self.duplicates += 1
                    return out
                seen[body.uuid] = body.seq
            out.append(body)
        elif isinstance(body, Gap):
            if self._current(body.host, body.epoch, out):
                self._hosts[body.host].markers += 1
            out.append(body)
        elif isinstance(body, Status):
            self._current(body.host, body.epoch, out)
            out.append(body)
        elif isinstance(body, DomainStatePayload):
            out.append(body)
        return out

    def _state(self, body: VcpuStatePayload, out: list[Event]) -> None:
        chain = self._chain(body.host, body.uuid, body.vcpu, body.epoch)
        if chain.seq is None:
            chain.seq, chain.to, chain.from_state = body.seq, body.state, True
        elif chain.first is not None:
            # A transition came first, with no base; this state, on another topic,
            # says where the chain stood before it: seqs in between were lost.
            if body.seq < chain.first - 1:
                self._gap(body, chain, body.seq + 1, chain.first - 1, out)
            chain.first = None

    def _transition(self, t: Transition, out: list[Event]) -> None:
        if not self._current(t.host, t.epoch, out):
            out.append(t)  # a superseded epoch's event: real, but it moves no chain
            return
        chain = self._chain(t.host, t.uuid, t.vcpu, t.epoch)
        base = chain.seq
        seq = t.seq
        if base is None:
            chain.first = seq  # the first thing we know of this chain
        elif seq <= base:
            if chain.from_state and seq not in chain.below:
                chain.below.add(seq)  # the retained state arrived first: not a duplicate
                out.append(t)
            elif seq in chain.missing:
                chain.missing.discard(seq)
                self.late += 1
                out.append(t)
            else:
                self.duplicates += 1
            return
        elif seq == base + 1:
            if chain.to is not None and t.from_state != chain.to:
                self.broken += 1
                out.append(
                    ChainBroken(
                        host=t.host,
                        domain=t.domain,
                        uuid=t.uuid,
                        vcpu=t.vcpu,
                        epoch=t.epoch,
                        seq=seq,
                        expected=chain.to,
                        got=t.from_state,
                    )
                )
        else:
            self._gap(t, chain, base + 1, seq - 1, out)
        chain.seq = seq
        chain.to = t.to_state
        chain.markers = self._hosts[t.host].markers
        if chain.from_state:
            chain.from_state = False
            chain.below.clear()
        out.append(t)

    def _gap(
        self,
        body: Transition | VcpuStatePayload,
        chain: _Chain,
        first: int,
        last: int,
        out: list[Event],
    ) -> None:
        self.gaps += 1
        self.missing += last - first + 1
        out.append(
            SeqGap(
                host=body.host,
                domain=body.domain,
                uuid=body.uuid,
                vcpu=body.vcpu,
                epoch=body.epoch,
                first=first,
                last=last,
                explained=self._hosts[body.host].markers > chain.markers,
            )
        )
        if last - first < MAX_MISSING:
            chain.missing.update(range(first, last + 1))
            if len(chain.missing) > MAX_MISSING:
                chain.missing = set(sorted(chain.missing)[-MAX_MISSING:])
