"""Fold samples into the host's state and diff it into changes (pure).

``advance`` takes the previous ``HostState`` and a batch of ``DomainRecord``s and
returns the new state plus the ``Change``s to publish. A *complete* batch (a full
bulk sample) also retires domains that are gone; a partial batch (the re-sample
after a lifecycle event) only touches the domains it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from agent.classify import Thresholds, VcpuTrack, observe
from agent.model import DomainRecord, DomainState, RecordOrigin, VcpuRecord, VcpuView


@dataclass(frozen=True, slots=True)
class DomainTrack:
    name: str
    uuid: str
    state: DomainState
    reason: int
    vcpu_current: int | None
    vcpu_maximum: int | None
    vcpus: Mapping[int, VcpuTrack]


@dataclass(frozen=True, slots=True)
class HostState:
    domains: Mapping[str, DomainTrack] = field(default_factory=dict)  # by UUID
    # Domains of the last batch with a vCPU whose change may be under way (see
    # classify._suspect): the service re-samples them soon.
    suspects: frozenset[str] = frozenset()


# --- changes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VcpuTransition:
    """A vCPU's reported state changed."""

    domain: str
    uuid: str
    vcpu: int
    before: VcpuView
    after: VcpuView
    at: float  # wall time of the sample that saw it
    changed_at: float  # best estimate of when it happened
    previous_duration: float  # seconds spent in ``before``
    resync: bool  # the first decision after continuity was lost: found, not seen


@dataclass(frozen=True, slots=True)
class VcpuStateSet:
    """A vCPU's retained state must be (re)published."""

    domain: str
    uuid: str
    vcpu: int
    view: VcpuView
    since: float
    at: float


@dataclass(frozen=True, slots=True)
class VcpuRemoved:
    """A vCPU is gone (unplugged past vcpu.maximum, or its domain vanished)."""

    domain: str
    uuid: str
    vcpu: int


@dataclass(frozen=True, slots=True)
class DomainStateSet:
    domain: str
    uuid: str
    state: DomainState
    reason: int
    vcpu_current: int | None
    vcpu_maximum: int | None
    at: float


@dataclass(frozen=True, slots=True)
class DomainRemoved:
    domain: str
    uuid: str


Change = VcpuTransition | VcpuStateSet | VcpuRemoved | DomainStateSet | DomainRemoved


def _vcpu_records(record: DomainRecord, known: Mapping[int, VcpuTrack]) -> Iterable[VcpuRecord]:
    if record.origin is RecordOrigin.STATE_ONLY:
        # No VCPU group this time (inactive domain, or NOWAIT skipped a busy one):
        # carry the vCPUs we know with empty records; they will rebaseline.
        return (VcpuRecord(vcpu=n) for n in known)
    return record.vcpus


def _advance_domain(
    prev: DomainTrack | None, record: DomainRecord, th: Thresholds, whole: bool
) -> tuple[DomainTrack, list[Change]]:
    changes: list[Change] = []
    known: Mapping[int, VcpuTrack] = prev.vcpus if prev is not None else {}
    vcpus: dict[int, VcpuTrack] = {}
    for vrec in _vcpu_records(record, known):
        before = known.get(vrec.vcpu)
        track = observe(before, vrec, record, th, whole=whole)
        vcpus[vrec.vcpu] = track
        new = track.view
        if new is None:
            continue
        if before is not None and before.view is not None:
            if before.view.state is new.state:
                continue
            changes.append(
                VcpuTransition(
                    domain=record.name,
                    uuid=record.uuid,
                    vcpu=vrec.vcpu,
                    before=before.view,
                    after=new,
                    at=record.t_wall,
                    changed_at=track.since,
                    previous_duration=max(0.0, track.since - before.since),
                    resync=before.gap,
                )
            )
        changes.append(
            VcpuStateSet(
                domain=record.name,
                uuid=record.uuid,
                vcpu=vrec.vcpu,
                view=new,
                since=track.since,
                at=record.t_wall,
            )
        )
    for index in sorted(set(known) - set(vcpus)):
        changes.append(VcpuRemoved(domain=record.name, uuid=record.uuid, vcpu=index))

    current, maximum = record.vcpu_current, record.vcpu_maximum
    if record.origin is RecordOrigin.STATE_ONLY and prev is not None:
        current, maximum = prev.vcpu_current, prev.vcpu_maximum
    domain = DomainTrack(
        name=record.name,
        uuid=record.uuid,
        state=record.state,
        reason=record.reason,
        vcpu_current=current,
        vcpu_maximum=maximum,
        vcpus=vcpus,
    )
    if prev is None or (
        (prev.name, prev.state, prev.reason, prev.vcpu_current, prev.vcpu_maximum)
        != (domain.name, domain.state, domain.reason, domain.vcpu_current, domain.vcpu_maximum)
    ):
        changes.insert(0, _domain_state(domain, record.t_wall))
    return domain, changes


def _domain_state(dom: DomainTrack, at: float) -> DomainStateSet:
    return DomainStateSet(
        domain=dom.name,
        uuid=dom.uuid,
        state=dom.state,
        reason=dom.reason,
        vcpu_current=dom.vcpu_current,
        vcpu_maximum=dom.vcpu_maximum,
        at=at,
    )


def retire(host: HostState, uuid: str) -> tuple[HostState, list[Change]]:
    """Forget a domain that no longer exists, clearing everything it published."""
    gone = host.domains.get(uuid)
    if gone is None:
        return host, []
    domains = {k: v for k, v in host.domains.items() if k != uuid}
    changes: list[Change] = [
        VcpuRemoved(domain=gone.name, uuid=uuid, vcpu=n) for n in sorted(gone.vcpus)
    ]
    changes.append(DomainRemoved(domain=gone.name, uuid=uuid))
    return HostState(domains=domains, suspects=host.suspects - {uuid}), changes


def rebaseline(host: HostState) -> HostState:
    """Forget counter baselines (after a reconnect): the next sample takes new ones.

    States are kept, so nothing is reported until a fresh interval decides it; the
    first decision of each vCPU is then marked as a resync (it may hide a change
    that happened while the agent could not look).
    """
    return HostState(
        domains={
            uuid: replace(
                dom, vcpus={n: t._replace(active=False, gap=True) for n, t in dom.vcpus.items()}
            )
            for uuid, dom in host.domains.items()
        }
    )


def advance(
    host: HostState,
    records: Iterable[DomainRecord],
    th: Thresholds,
    *,
    complete: bool,
    whole: bool | None = None,
) -> tuple[HostState, list[Change]]:
    """Fold a batch of records into the host state; return it with the changes.

    A *complete* batch holds every domain: it retires the domains it lacks. A
    *whole* batch (default: as complete) is a regular sample, one interval after
    the last: it counts toward ``min_samples``/``unknown_after``; a confirmation
    or lifecycle re-sample between two regular samples does not.
    """
    whole = complete if whole is None else whole
    domains = dict(host.domains)
    changes: list[Change] = []
    seen: set[str] = set()
    suspects: set[str] = set()
    for record in records:
        seen.add(record.uuid)
        prev = domains.get(record.uuid)
        if prev is not None and prev.name != record.name:
            # Renamed: the topic names change, so retire the old ones first.
            _, retired = retire(HostState(domains={record.uuid: prev}), record.uuid)
            changes.extend(retired)
            prev = None
        domains[record.uuid], domain_changes = _advance_domain(prev, record, th, whole)
        changes.extend(domain_changes)
        if any(t.suspect for t in domains[record.uuid].vcpus.values()):
            suspects.add(record.uuid)
    state = HostState(domains=domains, suspects=frozenset(suspects))
    if complete:
        for uuid in sorted(set(domains) - seen):
            state, retired = retire(state, uuid)
            changes.extend(retired)
    return state, changes


def current_state(host: HostState, at: float) -> list[Change]:
    """Every domain's and established vCPU's state, as changes (for snapshots)."""
    out: list[Change] = []
    for dom in sorted(host.domains.values(), key=lambda d: (d.name, d.uuid)):
        out.append(_domain_state(dom, at))
        for index in sorted(dom.vcpus):
            track = dom.vcpus[index]
            if track.view is not None:
                out.append(
                    VcpuStateSet(
                        domain=dom.name,
                        uuid=dom.uuid,
                        vcpu=index,
                        view=track.view,
                        since=track.since,
                        at=at,
                    )
                )
    return out
