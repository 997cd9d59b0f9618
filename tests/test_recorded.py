"""Classification driven by real bulk-stats records from TCG and KVM guests.

The recordings (tests/data, made by ``python -m lab.record`` on this kind of
machine) hold a toggler guest whose vCPU 0 alternates busy/halted and writes a
marker at each phase start, and a guest whose vCPU 1 is parked by the firmware.
"""

from __future__ import annotations

import pytest

from agent.classify import Thresholds
from agent.model import Source, VcpuState
from agent.transitions import HostState, VcpuTransition, advance
from tests.recorded import Recording, load, synthetic_s390_from

RECORDINGS = {"tcg": "records-tcg.json", "kvm": "records-kvm.json"}
EXPECTED_SOURCE = {"tcg": Source.CPUTIME, "kvm": Source.KVM}
PHASE_STATE = {"busy": VcpuState.RUNNING, "halted": VcpuState.HALTED}


def replay(
    rec: Recording, *, every: int = 1, th: Thresholds | None = None
) -> tuple[HostState, list[VcpuTransition]]:
    host = HostState()
    out: list[VcpuTransition] = []
    for records in rec.samples[::every]:
        host, changes = advance(host, records, th or Thresholds(), complete=True)
        out.extend(c for c in changes if isinstance(c, VcpuTransition))
    return host, out


def detectable_markers(rec: Recording, domain: str, interval: float) -> list[tuple[float, str]]:
    """Markers after the first (boot time is unknown) that the samples can see."""
    last_sample = rec.samples[-1][0].t_wall
    return [m for m in rec.markers_of(domain)[1:] if m[0] < last_sample - 2 * interval]


@pytest.mark.parametrize("every", [1, 2, 4], ids=["0.25s", "0.5s", "1s"])
@pytest.mark.parametrize("virt", ["tcg", "kvm"])
def test_each_phase_change_yields_exactly_one_transition_from_the_right_source(
    virt: str, every: int
) -> None:
    rec = load(RECORDINGS[virt])
    interval = rec.interval * every
    _, transitions = replay(rec, every=every)
    for domain in rec.meta["_markers_by_domain"]:  # type: ignore[attr-defined]
        markers = detectable_markers(rec, domain, interval)
        assert len(markers) >= 4
        first = markers[0][0] - interval  # settle: the phase before it began at boot
        seen = [t for t in transitions if t.domain == domain and t.vcpu == 0 and t.at > first]
        seen = [t for t in seen if t.at <= markers[-1][0] + 2 * interval]
        assert [t.after.state for t in seen] == [PHASE_STATE[p] for _, p in markers]
        assert {t.after.source for t in seen} == {EXPECTED_SOURCE[virt]}
        for t in seen:
            assert {t.before.state, t.after.state} == {VcpuState.RUNNING, VcpuState.HALTED}


@pytest.mark.parametrize("virt", ["tcg", "kvm"])
def test_the_change_time_estimate_lands_near_the_guests_own_marker(virt: str) -> None:
    rec = load(RECORDINGS[virt])
    interval = rec.interval * 4  # 1 s samples: the estimate matters most
    _, transitions = replay(rec, every=4)
    markers = detectable_markers(rec, rec.toggler, interval)
    seen = [t for t in transitions if t.domain == rec.toggler and t.vcpu == 0]
    errors = []
    for t_marker, _phase in markers:
        nearest = min(seen, key=lambda t: abs(t.changed_at - t_marker))
        errors.append(abs(nearest.changed_at - t_marker))
        # Seeing the change takes up to two samples; the estimate is far closer.
        assert nearest.at - t_marker > 0
    assert max(errors) < 0.15, errors
    assert sum(errors) / len(errors) < 0.06, errors


@pytest.mark.parametrize("virt", ["tcg", "kvm"])
def test_a_vcpu_parked_by_the_firmware_is_halted_and_stays_halted(virt: str) -> None:
    rec = load(RECORDINGS[virt])
    host, transitions = replay(rec)
    parked = [(uuid, dom) for uuid, dom in host.domains.items() if len(dom.vcpus) == 2]
    assert parked, "the recording has a two-vCPU guest"
    for uuid, dom in parked:
        view = dom.vcpus[1].view
        assert view is not None
        assert view.state is VcpuState.HALTED
        assert view.source is EXPECTED_SOURCE[virt]
        assert not [t for t in transitions if t.uuid == uuid and t.vcpu == 1]


def test_a_hot_plugged_vcpu_goes_from_offline_to_running_or_halted() -> None:
    rec = load("records-hotplug-tcg.json")
    hotplug = rec.meta["hotplug"]
    assert isinstance(hotplug, dict)
    host = HostState()
    first_seen: dict[VcpuState, float] = {}
    transitions: list[VcpuTransition] = []
    for records in rec.samples:
        host, changes = advance(host, records, Thresholds(), complete=True)
        transitions.extend(c for c in changes if isinstance(c, VcpuTransition) and c.vcpu == 1)
        view = next(iter(host.domains.values())).vcpus[1].view
        assert view is not None
        first_seen.setdefault(view.state, records[0].t_mono)
    assert VcpuState.OFFLINE in first_seen
    assert transitions, "the hot-plug was reported"
    assert transitions[0].before.state is VcpuState.OFFLINE
    assert transitions[0].after.state in (VcpuState.RUNNING, VcpuState.HALTED)
    # Within two sample intervals of the hot-plug call returning.
    online_at = min(t for s, t in first_seen.items() if s is not VcpuState.OFFLINE)
    assert online_at - float(hotplug["t_mono_after"]) <= 2 * rec.interval + 0.05


def _delays(rec: Recording, transitions: list[VcpuTransition], interval: float) -> list[float]:
    seen = [t for t in transitions if t.domain == rec.toggler and t.vcpu == 0]
    return [
        min(t.at - m for t in seen if t.at > m)
        for m, _ in detectable_markers(rec, rec.toggler, interval)
    ]


@pytest.mark.parametrize("virt", ["tcg", "kvm"])
def test_a_quick_second_look_at_suspects_cuts_the_detection_delay(virt: str) -> None:
    """At 1 s samples, re-sample suspect domains at the next 0.25 s record."""
    rec = load(RECORDINGS[virt])
    every, interval = 4, 1.0
    host = HostState()
    probed: list[VcpuTransition] = []
    for i in range(0, len(rec.samples), every):
        host, changes = advance(host, rec.samples[i], Thresholds(), complete=True)
        probed.extend(c for c in changes if isinstance(c, VcpuTransition))
        if host.suspects and i + 1 < len(rec.samples):
            batch = [r for r in rec.samples[i + 1] if r.uuid in host.suspects]
            host, changes = advance(host, batch, Thresholds(), complete=False)
            probed.extend(c for c in changes if isinstance(c, VcpuTransition))
    _, plain = replay(rec, every=every)

    with_probe, without = _delays(rec, probed, interval), _delays(rec, plain, interval)
    assert len(with_probe) == len(without) >= 4
    # Without the second look a late change waits a whole extra interval.
    assert max(without) > interval + 0.25
    assert max(with_probe) <= interval + 0.05
    assert sum(with_probe) < sum(without)


def test_the_s390_halted_flag_decides_at_once_on_fake_s390_records() -> None:
    rec = synthetic_s390_from("records-tcg.json")  # FAKE: see synthetic_s390_from
    host, transitions = replay(rec)
    interval = rec.interval
    markers = detectable_markers(rec, rec.toggler, interval)
    seen = [
        t
        for t in transitions
        if t.domain == rec.toggler and t.vcpu == 0 and t.at > markers[0][0] - interval
    ]
    assert [t.after.state for t in seen][: len(markers)] == [PHASE_STATE[p] for _, p in markers]
    assert {t.after.source for t in seen} == {Source.LIBVIRT}
    # A flag is a fact: seen at the first sample after the marker, never later.
    for t, (t_marker, _phase) in zip(seen, markers, strict=False):
        assert 0 < t.at - t_marker <= interval + 0.05
    parked = [d for d in host.domains.values() if len(d.vcpus) == 2]
    for dom in parked:
        assert dom.vcpus[1].view is not None
        assert dom.vcpus[1].view.source is Source.LIBVIRT
        assert dom.vcpus[1].view.state is VcpuState.HALTED
