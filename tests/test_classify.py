from __future__ import annotations

from dataclasses import replace

import pytest

from agent.classify import Thresholds, evidence, observe
from agent.model import Source, VcpuState
from agent.transitions import HostState, VcpuTransition, advance
from tests.builders import UUID, busy, dom


def states(records: list, th: Thresholds | None = None) -> list[VcpuState | None]:  # type: ignore[type-arg]
    """vCPU 0's reported state after each record."""
    track = None
    out = []
    for record in records:
        track = observe(track, record.vcpus[0], record, th or Thresholds())
        out.append(track.view.state if track.view else None)
    return out


def test_a_counter_needs_two_samples_before_it_says_anything() -> None:
    assert states([busy(0, 0.0), busy(1, 1.0)]) == [None, VcpuState.RUNNING]


def test_cpu_time_that_stops_growing_means_halted() -> None:
    records = [busy(0, 0.0), busy(1, 1.0), busy(2, 1.0), busy(3, 1.01)]
    assert states(records) == [None, VcpuState.RUNNING, VcpuState.HALTED, VcpuState.HALTED]


def test_kvm_halt_wait_beats_cpu_time() -> None:
    # CPU time says busy, KVM's halt-wait counter says halted: KVM wins.
    a = dom(0, v0_state=1, v0_time=0, v0_hw=0)
    b = dom(1, v0_state=1, v0_time=int(1e9), v0_hw=int(0.99e9))
    track = observe(observe(None, a.vcpus[0], a, Thresholds()), b.vcpus[0], b, Thresholds())
    assert track.view is not None
    assert (track.view.state, track.view.source) == (VcpuState.HALTED, Source.KVM)
    assert track.view.ratio == pytest.approx(0.99)


def test_the_s390_halted_flag_is_taken_at_once() -> None:
    records = [dom(0, v0_state=1, v0_halted=False), dom(1, v0_state=1, v0_halted=True)]
    assert states(records) == [VcpuState.RUNNING, VcpuState.HALTED]


def test_hysteresis_holds_a_state_inside_the_band() -> None:
    # 50 % busy sits between halted_leave (0.3) and halted_enter (0.7): no flapping.
    records = [busy(0, 0.0), busy(1, 0.0), busy(2, 0.5), busy(3, 0.9), busy(4, 1.5)]
    assert states(records) == [
        None,
        VcpuState.HALTED,
        VcpuState.HALTED,
        VcpuState.HALTED,
        VcpuState.HALTED,
    ]
    records = [busy(0, 0.0), busy(1, 1.0), busy(2, 1.5), busy(3, 2.1), busy(4, 2.4)]
    assert states(records) == [
        None,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.HALTED,
    ]


def test_min_samples_debounces_a_single_odd_sample() -> None:
    th = Thresholds(min_samples=2)
    records = [busy(0, 0), busy(1, 1), busy(2, 1), busy(3, 2), busy(4, 2), busy(5, 2)]
    assert states(records, th) == [
        None,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.HALTED,
    ]


def test_a_confirmation_resample_never_counts_toward_min_samples() -> None:
    th = Thresholds(min_samples=2)
    track = None
    for record in [busy(0, 0), busy(1, 1), busy(2, 1)]:  # halted for one whole sample
        track = observe(track, record.vcpus[0], record, th)
    assert track is not None
    assert track.view is not None
    assert track.view.state is VcpuState.RUNNING
    resample = busy(2.1, 1)  # 0.1 s later, still halted: not a second whole sample
    track = observe(track, resample.vcpus[0], resample, th, whole=False)
    assert track.view is not None
    assert track.view.state is VcpuState.RUNNING
    record = busy(3, 1)  # the second whole sample decides it
    track = observe(track, record.vcpus[0], record, th)
    assert track.view is not None
    assert track.view.state is VcpuState.HALTED


def test_confirmation_resamples_never_count_toward_unknown_after() -> None:
    th = Thresholds(unknown_after=3)
    track = None
    for t in (0.0, 1.0):
        record = dom(t, v0_state=1, v0_time=int(t * 1e9), v0_hw=0)
        track = observe(track, record.vcpus[0], record, th)
    # The KVM keys vanish (a frozen QEMU): a bulk sample, then re-samples 0.1 s apart.
    for t, whole in [(2.0, True), (2.1, False), (2.2, False), (2.3, False), (2.4, False)]:
        record = dom(t, v0_state=1, v0_time=int(t * 1e9))
        track = observe(track, record.vcpus[0], record, th, whole=whole)
        assert track.view is not None
        assert track.view.state is VcpuState.RUNNING, f"unknown after {t - 2.0:.1f} s"
    for t in (3.0, 4.0):  # whole samples 2 and 3
        record = dom(t, v0_state=1, v0_time=int(t * 1e9))
        track = observe(track, record.vcpus[0], record, th)
    assert track is not None
    assert track.view is not None
    assert track.view.state is VcpuState.UNKNOWN


def test_a_bulk_call_that_took_most_of_the_interval_only_takes_a_baseline() -> None:
    # Busy all along, but the call that read the second record took 0.6 s of the
    # 1 s interval: its counters may have been read at its start, so the delta
    # (0.4 s of CPU over "1 s") would look 60 % halted. It must not decide.
    th = Thresholds(halted_enter=0.5, halted_leave=0.3)
    track = None
    for record in (busy(0, 0), busy(1, 1)):
        track = observe(track, record.vcpus[0], record, th)
    assert track is not None
    assert track.view is not None
    assert track.view.state is VcpuState.RUNNING
    late = replace(dom(2, v0_state=1, v0_time=int(1.4e9)), took=0.6)
    track = observe(track, late.vcpus[0], late, th)
    assert track.view is not None
    assert track.view.state is VcpuState.RUNNING
    assert track.record.time_ns == int(1.4e9)  # the new baseline


def test_a_paused_domain_makes_every_vcpu_na_at_once() -> None:
    records = [busy(0, 0), busy(1, 1), busy(2, 2, state=3)]
    assert states(records) == [None, VcpuState.RUNNING, VcpuState.NA]


def test_after_a_resume_counters_take_a_fresh_baseline() -> None:
    # While paused the CPU time did not grow; measuring across the pause would
    # call a busy vCPU halted.
    records = [busy(0, 0), busy(1, 1), busy(2, 1, state=3), busy(10, 1), busy(11, 2)]
    assert states(records) == [
        None,
        VcpuState.RUNNING,
        VcpuState.NA,
        VcpuState.NA,
        VcpuState.RUNNING,
    ]


def test_vcpus_beyond_vcpu_current_are_offline() -> None:
    record = dom(0, current=1, maximum=2, v0_state=1, v0_time=0)
    ev = evidence(None, record.vcpus[1], record, Thresholds())
    assert ev is not None
    assert (ev.state, ev.source) == (VcpuState.OFFLINE, Source.DOMSTATE)


def test_libvirt_blocked_state_is_reported_as_blocked() -> None:
    record = dom(0, v0_state=2)
    assert states([record]) == [VcpuState.BLOCKED]


def test_a_counter_going_backwards_is_no_evidence() -> None:
    # A guest reset or QEMU restart resets counters: hold the state, rebaseline.
    records = [busy(0, 5), busy(1, 6), busy(2, 0.5), busy(3, 1.5)]
    assert states(records) == [None, VcpuState.RUNNING, VcpuState.RUNNING, VcpuState.RUNNING]


def test_unreadable_vcpus_become_unknown_only_after_several_samples() -> None:
    host = HostState()
    th = Thresholds(unknown_after=3)
    for t in range(2):
        host, _ = advance(host, [busy(t, t)], th, complete=True)
    seen = []
    for t in range(2, 6):  # the VCPU group is missing (e.g. NOWAIT skipped the domain)
        host, changes = advance(host, [dom(t, current=None)], th, complete=True)
        seen.append([c.after.state for c in changes if isinstance(c, VcpuTransition)])
    assert seen == [[], [], [VcpuState.UNKNOWN], []]


def test_the_change_time_is_estimated_from_the_straddling_interval() -> None:
    # Busy until t=2.6, then halted: the sample at t=3 shows 60 % halted (not yet
    # enough), the one at t=4 100 %: the change is put at 2.6, not at 3 or 4.
    host = HostState()
    found = []
    for record in [busy(0, 0), busy(1, 1), busy(2, 2), busy(3, 2.6), busy(4, 2.6)]:
        host, changes = advance(host, [record], Thresholds(), complete=True)
        found += [c for c in changes if isinstance(c, VcpuTransition)]
    assert len(found) == 1
    assert found[0].changed_at - 1e9 == pytest.approx(2.6)
    assert found[0].at - 1e9 == pytest.approx(4)
    # Running since the first measured interval began (t=0): 2.6 s.
    assert found[0].previous_duration == pytest.approx(2.6)


def test_a_partial_move_toward_the_other_state_makes_a_suspect() -> None:
    host = HostState()
    for record in [busy(0, 0), busy(1, 1), busy(2, 2)]:
        host, _ = advance(host, [record], Thresholds(), complete=True)
    assert not host.suspects
    host, _ = advance(host, [busy(3, 2.6)], Thresholds(), complete=True)  # 40 % halted
    assert host.suspects == {busy(0, 0).uuid}


def test_a_steady_mixed_load_is_not_a_suspect_every_time() -> None:
    host = HostState()
    for t in range(8):  # 50 % busy, steadily
        host, _ = advance(host, [busy(t, t * 0.5)], Thresholds(), complete=True)
    assert not host.suspects


def test_kvm_stats_that_vanish_make_the_vcpu_unknown_then_it_recovers() -> None:
    # A frozen QEMU: NOWAIT samples skip the monitor-derived KVM stats, CPU time
    # stops. Without the rule, the vCPU would be called halted.
    th = Thresholds(unknown_after=3)
    t, hw, records = 0.0, 0, []
    for _ in range(3):  # busy under KVM
        records.append(dom(t, v0_state=1, v0_time=int(t * 1e9), v0_hw=hw))
        t += 1
    for _ in range(4):  # frozen: only /proc-based keys
        records.append(dom(t, v0_state=1, v0_time=int(2e9)))
        t += 1
    for _ in range(3):  # thawed and busy again
        records.append(dom(t, v0_state=1, v0_time=int(t * 1e9), v0_hw=hw))
        t += 1
    assert states(records, th) == [
        None,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
        VcpuState.UNKNOWN,
        VcpuState.UNKNOWN,
        VcpuState.UNKNOWN,
        VcpuState.RUNNING,
        VcpuState.RUNNING,
    ]


def test_a_guest_restarted_without_kvm_is_not_stuck_unknown() -> None:
    records = [
        dom(0, v0_state=1, v0_time=0, v0_hw=0),
        dom(1, v0_state=1, v0_time=int(1e9), v0_hw=0),
        dom(2, state=5),  # shut off; started again under TCG: no KVM stats any more
        busy(3, 0.0),
        busy(4, 1.0),
    ]
    assert states(records) == [
        None,
        VcpuState.RUNNING,
        VcpuState.NA,
        VcpuState.NA,
        VcpuState.RUNNING,
    ]


def test_a_busy_vcpu_starved_of_host_cpu_is_still_running() -> None:
    # 30 % on a CPU and 65 % waiting in the host's run queue: busy, not 70 % halted.
    records = [
        dom(0, v0_state=1, v0_time=0, v0_delay=0),
        dom(1, v0_state=1, v0_time=int(0.3e9), v0_delay=int(0.65e9)),
        dom(2, v0_state=1, v0_time=int(0.6e9), v0_delay=int(1.3e9)),
    ]
    assert states(records) == [None, VcpuState.RUNNING, VcpuState.RUNNING]
    without_delay = [dom(0, v0_state=1, v0_time=0), dom(1, v0_state=1, v0_time=int(0.3e9))]
    assert states(without_delay) == [None, VcpuState.HALTED]


def test_a_short_confirmation_sample_does_not_spoil_the_change_time() -> None:
    # Busy until 2.6; the 1 s sample at 3 shows 40 % halted (a suspect), a 0.1 s
    # confirmation sample at 3.1 shows 90 % halted: CPU time moved one 10 ms step.
    # The change is still put at 2.6, not somewhere in the short sample.
    host = HostState()
    found = []
    for record in [busy(0, 0), busy(1, 1), busy(2, 2), busy(3, 2.6), busy(3.1, 2.61)]:
        host, changes = advance(host, [record], Thresholds(), complete=True)
        found += [c for c in changes if isinstance(c, VcpuTransition)]
    assert len(found) == 1
    assert found[0].at - 1e9 == pytest.approx(3.1)
    assert found[0].changed_at - 1e9 == pytest.approx(2.6)


def test_under_kvm_a_vcpu_that_never_runs_is_halted_not_running() -> None:
    # A hot-plugged vCPU waiting for its startup IPI: no KVM halt-wait, no CPU time.
    records = [
        dom(0, v0_state=1, v0_time=0, v0_hw=0, v0_delay=0),
        dom(1, v0_state=1, v0_time=0, v0_hw=0, v0_delay=0),
    ]
    track = None
    for record in records:
        track = observe(track, record.vcpus[0], record, Thresholds())
    assert track is not None
    assert track.view is not None
    assert (track.view.state, track.view.source) == (VcpuState.HALTED, Source.KVM)


def test_regular_ticks_of_some_domains_count_as_whole_samples_and_resamples_do_not() -> None:
    # The /proc fast path samples the domains it serves on every tick (a partial
    # batch that is still a regular sample); re-samples between ticks are not.
    th = Thresholds(min_samples=2)

    def last_state(whole: bool) -> VcpuState:
        host = HostState()
        for record in (busy(0, 0), busy(1, 1)):
            host, _ = advance(host, [record], th, complete=True)
        for record in (busy(2, 1), busy(3, 1)):  # halted for two intervals
            host, _ = advance(host, [record], th, complete=False, whole=whole)
        view = host.domains[UUID].vcpus[0].view
        assert view is not None
        return view.state

    assert last_state(whole=True) is VcpuState.HALTED
    assert last_state(whole=False) is VcpuState.RUNNING
