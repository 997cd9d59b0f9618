"""Classify one vCPU from consecutive records (pure).

A vCPU's state is decided from the best evidence its record offers, in this order:

1. the domain is not running                     -> ``n/a``      (domstate)
2. the vCPU is unplugged or reported offline     -> ``offline``  (domstate/vcpustate)
3. libvirt reports it blocked (Xen)              -> ``blocked``  (vcpustate)
4. ``vcpu.<n>.halted`` is present (s390)         -> halted/running (libvirt)
5. the share of wall time in KVM's halt-wait     -> halted/running (kvm)
6. the share of wall time neither on a CPU nor    -> halted/running (cputime)
   waiting for one (vcpu.<n>.time + .delay, or
   the same counters from /proc: SCHEDSTAT records)
7. only a run state is known (test driver, Xen)  -> running       (vcpustate)

Shares (5, 6) go through hysteresis: a running vCPU becomes halted when its halted
share reaches ``halted_enter``; a halted vCPU becomes running when it falls to
``halted_leave``; in between, the state holds. A new state must then hold for
``min_samples`` consecutive samples before it is reported. Facts from libvirt
(1-4, 7) are reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent.model import (
    DomainRecord,
    RecordOrigin,
    Source,
    VcpuRecord,
    VcpuRunState,
    VcpuState,
    VcpuView,
)

# A share this close to 1 means "the whole interval": the change happened earlier.
_WHOLE = 0.98
_TICK_SLACK = 0.021  # seconds: two steps of vcpu.<n>.time, plus rounding
# Records whose vcpu.current bounds the online vCPUs.
_STRUCTURED = frozenset({RecordOrigin.BULK, RecordOrigin.SCHEDSTAT})


@dataclass(frozen=True, slots=True)
class Thresholds:
    halted_enter: float = 0.7
    halted_leave: float = 0.3
    min_samples: int = 1
    unknown_after: int = 3  # samples without readable vCPU stats before "unknown"
    # A share that moved this far toward the other state without deciding it makes
    # the vCPU a suspect: the service re-samples its domain soon to confirm.
    suspect: float = 0.1
    # A bulk call that took more than this share of the interval it closes dates
    # its counters too loosely for a share (they were read somewhere within it):
    # such a sample only takes a new baseline.
    misdated: float = 0.25


class Evidence(NamedTuple):
    """What one sample says about one vCPU, before hysteresis and debouncing."""

    state: VcpuState
    source: Source
    share: float | None  # halted share of the interval, for kvm/cputime/libvirt
    immediate: bool  # a fact from libvirt, reported without debouncing


_NA = Evidence(VcpuState.NA, Source.DOMSTATE, None, immediate=True)


class VcpuTrack(NamedTuple):
    """Everything the classifier remembers about one vCPU between samples.

    NamedTuples (here and for ``Evidence``): immutable and typed like a frozen
    dataclass, but several times cheaper to build on this per-vCPU hot path.
    """

    view: VcpuView | None  # the reported state; None until first established
    since: float  # wall time the reported state began (estimated)
    record: VcpuRecord  # the last record, for counter deltas
    t_mono: float
    t_wall: float
    active: bool  # whether the domain was running at the last record
    dt: float  # length of the last interval, seconds (0 when not measured)
    share: float | None  # halted share of the last interval, if measured
    pending: Evidence | None = None  # a state waiting for its streak
    pending_since: float = 0.0
    streak: int = 0
    suspect: bool = False  # a change may be under way: worth a quick second look
    kvm: bool = False  # KVM stats seen while running: their absence means unreadable
    # Continuity was lost (libvirt reconnect): the next decided state may hide a
    # change that happened unseen, so a transition it makes is a resync.
    gap: bool = False


def _idle_share(prev: VcpuRecord, cur: VcpuRecord, dt_ns: float) -> float | None:
    """The share of the interval the vCPU neither ran nor waited for a host CPU."""
    if prev.time_ns is None or cur.time_ns is None:
        return None
    busy = cur.time_ns - prev.time_ns
    if busy < 0:
        return None  # a reset counter (guest or QEMU restart) is no evidence
    # A vCPU that wants to run but waits for a host CPU (vcpu.<n>.delay, the thread's
    # run_delay) is busy, not halted: on a contended host CPU time alone would call a
    # starved busy vCPU halted.
    if prev.delay_ns is not None and cur.delay_ns is not None:
        busy += max(0, cur.delay_ns - prev.delay_ns)
    return max(0.0, 1.0 - busy / dt_ns)


def _share(prev: VcpuRecord, cur: VcpuRecord, dt_ns: float) -> tuple[Source, float] | None:
    """The halted share of the interval, from the best counters both records hold."""
    idle = _idle_share(prev, cur, dt_ns)
    if cur.halt_wait_ns is not None:
        if prev.halt_wait_ns is None:
            return None  # KVM stats are back: take a baseline before trusting them
        delta = cur.halt_wait_ns - prev.halt_wait_ns
        if delta < 0:
            return None
        # A vCPU that never entered the guest (an AP waiting for its startup IPI, a
        # vCPU just hot-plugged) is not in KVM's halt either: its CPU time says it
        # did nothing, so it is halted too (measured: both shares 0.00 vs 0.00).
        return Source.KVM, max(min(1.0, delta / dt_ns), idle or 0.0)
    if idle is not None:
        return Source.CPUTIME, idle
    return None


def evidence(
    prev: VcpuTrack | None, record: VcpuRecord, domain: DomainRecord, th: Thresholds
) -> Evidence | None:
    """What this sample says about the vCPU; None when it says nothing yet."""
    if not domain.state.vcpus_active:
        return _NA
    if domain.origin is RecordOrigin.STATE_ONLY:
        return Evidence(VcpuState.UNKNOWN, Source.DOMSTATE, None, immediate=False)
    if (
        domain.origin in _STRUCTURED
        and domain.vcpu_current is not None
        and record.vcpu >= domain.vcpu_current
    ):
        return Evidence(VcpuState.OFFLINE, Source.DOMSTATE, None, immediate=True)
    if record.state == VcpuRunState.OFFLINE:
        return Evidence(VcpuState.OFFLINE, Source.VCPUSTATE, None, immediate=True)
    if record.state == VcpuRunState.BLOCKED:
        return Evidence(VcpuState.BLOCKED, Source.VCPUSTATE, None, immediate=True)
    if record.halted is not None:
        state = VcpuState.HALTED if record.halted else VcpuState.RUNNING
        return Evidence(state, Source.LIBVIRT, float(record.halted), immediate=True)
    if (
        prev is not None
        and prev.kvm
        and prev.active
        and record.halt_wait_ns is None
        and domain.origin is not RecordOrigin.SCHEDSTAT
    ):
        # KVM's stats come from QEMU's monitor; a NOWAIT sample skips them when the
        # domain's job is stuck (a frozen QEMU, a hung monitor). CPU time alone would
        # call the frozen vCPUs halted: say we cannot tell.
        return Evidence(VcpuState.UNKNOWN, Source.DOMSTATE, None, immediate=False)
    if record.halt_wait_ns is None and record.time_ns is None:
        if record.state == VcpuRunState.RUNNING:
            return Evidence(VcpuState.RUNNING, Source.VCPUSTATE, None, immediate=True)
        return Evidence(VcpuState.UNKNOWN, Source.VCPUSTATE, None, immediate=False)
    if prev is None or not prev.active:
        return None  # counters need a baseline taken while the guest was running
    dt = domain.t_mono - prev.t_mono
    if dt <= 0 or domain.took > th.misdated * dt:
        return None
    dt_ns = dt * 1e9
    measured = _share(prev.record, record, dt_ns)
    if measured is None:
        return None
    source, share = measured
    # The state is decided by hysteresis in `_decide`; RUNNING is a placeholder.
    return Evidence(VcpuState.RUNNING, source, share, immediate=False)


def _decide(current: VcpuView | None, ev: Evidence, th: Thresholds) -> VcpuState:
    if ev.share is None or ev.immediate:
        return ev.state
    held = current.state if current is not None else None
    if held is VcpuState.HALTED:
        return VcpuState.RUNNING if ev.share <= th.halted_leave else VcpuState.HALTED
    if held is VcpuState.RUNNING:
        return VcpuState.HALTED if ev.share >= th.halted_enter else VcpuState.RUNNING
    return VcpuState.HALTED if ev.share >= 0.5 else VcpuState.RUNNING


def _changed_at(prev: VcpuTrack, ev: Evidence, state: VcpuState, t_wall: float, dt: float) -> float:
    """Estimate when the change happened from the shares of straddling intervals.

    A share is the fraction of an interval spent halted, so an interval that
    straddles the change tells how far back in it the change lay.
    """
    if ev.share is None or ev.immediate:
        return t_wall
    new_share = ev.share if state is VcpuState.HALTED else 1.0 - ev.share
    at = t_wall - new_share * dt
    # The whole interval in the new state (up to the counters' granularity: CPU time
    # moves in 10 ms steps, a lot in a 0.1 s confirmation sample): the change lies
    # in the previous interval, as far back as that one's share says.
    whole = new_share >= _WHOLE or (1.0 - new_share) * dt <= _TICK_SLACK
    if whole and prev.share is not None:
        prev_new = prev.share if state is VcpuState.HALTED else 1.0 - prev.share
        at = t_wall - dt - max(0.0, prev_new) * prev.dt
    return max(at, prev.since)


def _track(
    record: VcpuRecord,
    domain: DomainRecord,
    *,
    dt: float,
    share: float | None,
    view: VcpuView | None,
    since: float,
    pending: Evidence | None = None,
    pending_since: float = 0.0,
    streak: int = 0,
    suspect: bool = False,
    kvm: bool = False,
    gap: bool = False,
) -> VcpuTrack:
    # Positional: keyword construction of a NamedTuple is markedly slower.
    return VcpuTrack(
        view,
        since,
        record,
        domain.t_mono,
        domain.t_wall,
        domain.state.vcpus_active,
        dt,
        share,
        pending,
        pending_since,
        streak,
        suspect,
        kvm,
        gap,
    )


def _suspect(prev: VcpuTrack, share: float, held: VcpuState, th: Thresholds) -> bool:
    """Did the share move toward the other state, without (yet) deciding it?

    A change late in an interval shows as a partial share that hysteresis holds
    back; waiting a whole interval for the next sample would double the latency.
    """
    if held is VcpuState.RUNNING:
        toward, before = share, prev.share
    elif held is VcpuState.HALTED:
        toward, before = 1.0 - share, None if prev.share is None else 1.0 - prev.share
    else:
        return False
    return toward >= th.suspect and (before is None or toward - before >= th.suspect)


def observe(
    prev: VcpuTrack | None,
    record: VcpuRecord,
    domain: DomainRecord,
    th: Thresholds,
    *,
    whole: bool = True,
) -> VcpuTrack:
    """Fold one record into a vCPU's track; the track's view is what to report.

    ``whole`` is False for a confirmation re-sample between two regular samples:
    it may decide what needs one sample, but it never counts toward
    ``min_samples`` or ``unknown_after``, which count whole samples.
    """
    if prev is not None and domain.t_mono <= prev.t_mono:
        return prev  # the same sample again (or an older one): nothing new
    ev = evidence(prev, record, domain, th)
    dt = domain.t_mono - prev.t_mono if prev is not None else 0.0
    # Counters from /proc (SCHEDSTAT) never carry KVM's stats: their absence there
    # says nothing about a stuck monitor.
    kvm = record.halt_wait_ns is not None or (
        prev is not None
        and prev.kvm
        and prev.active
        and domain.state.vcpus_active
        and domain.origin is not RecordOrigin.SCHEDSTAT
    )
    share = ev.share if ev is not None and not ev.immediate else None
    if ev is None:
        # Nothing measurable yet (first sample, or a counter reset): hold the state
        # and take this record as the new baseline.
        if prev is None:
            return _track(
                record, domain, dt=dt, share=None, view=None, since=domain.t_wall, kvm=kvm
            )
        return _track(
            record,
            domain,
            dt=dt,
            share=None,
            view=prev.view,
            since=prev.since,
            kvm=kvm,
            gap=prev.gap,
        )
    if prev is None:
        view = VcpuView(_decide(None, ev, th), ev.source, ev.share)
        return _track(record, domain, dt=dt, share=share, view=view, since=domain.t_wall, kvm=kvm)

    state = _decide(prev.view, ev, th)
    if prev.view is not None and prev.view.state is state:
        # Same state: keep the deciding view unless the source changed, no streak.
        if prev.view.source is ev.source and prev.pending is None:
            decided = prev.view
        else:
            decided = VcpuView(state, ev.source, ev.share)
        suspect = ev.share is not None and not ev.immediate and _suspect(prev, ev.share, state, th)
        # The steady state of every quiet vCPU at every tick: built positionally.
        return VcpuTrack(
            decided,
            prev.since,
            record,
            domain.t_mono,
            domain.t_wall,
            domain.state.vcpus_active,
            dt,
            share,
            None,
            0.0,
            0,
            suspect,
            kvm,
            False,
        )

    decided = VcpuView(state, ev.source, ev.share)
    needed = 1 if ev.immediate else th.min_samples
    if state is VcpuState.UNKNOWN:
        needed = th.unknown_after
    continuing = prev.pending is not None and prev.pending.state is state
    step = 1 if whole or needed == 1 else 0
    streak = (prev.streak if continuing else 0) + step
    pending_since = (
        prev.pending_since if continuing else _changed_at(prev, ev, state, domain.t_wall, dt)
    )
    if prev.view is None or streak >= needed:
        return _track(
            record, domain, dt=dt, share=share, view=decided, since=pending_since, kvm=kvm
        )
    return _track(
        record,
        domain,
        dt=dt,
        share=share,
        view=prev.view,
        since=prev.since,
        pending=Evidence(state, ev.source, ev.share, ev.immediate),
        pending_since=pending_since,
        streak=streak,
        suspect=True,
        kvm=kvm,
        gap=prev.gap,
    )
