"""A real toggler guest under libvirt: its markers, and what the bulk stats show.

One module-scoped guest per virt type (TCG always, KVM when usable) with 2 vCPUs:
vCPU 0 toggles 1.0 s busy / 1.0 s halted, vCPU 1 stays parked by SeaBIOS.
Stat windows are placed inside a phase using the serial truth, never by
trusting the wall clock alone.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from lab.domains import Guest, GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.sampling import rate, sample_domain, sample_within_phase
from lab.truth import Marker

pytestmark = pytest.mark.libvirt

BUSY_S = 1.0
HALTED_S = 1.0
BOOT_TIMEOUT_S = 60.0
# Phase boundaries are exact 10 ms guest ticks; what we see adds the QEMU ->
# virtlogd -> inotify path (measured: a few ms) and host scheduling on 2 cores.
PHASE_TOLERANCE_S = 0.15
MEDIAN_TOLERANCE_S = 0.008
# Placement of a stats window inside a 1.0 s phase: clear of both boundaries.
WINDOW_LEAD_S = 0.15
WINDOW_SPAN_S = 0.7


@pytest.fixture(scope="module")
def toggler(guest_pool: GuestPool, virt_type: VirtType, image_cache: Path) -> Iterator[Guest]:
    image = build_toggler_image(busy_s=BUSY_S, halted_s=HALTED_S, cache_dir=image_cache)
    guest = guest_pool.start(GuestSpec(image=image, virt_type=virt_type, vcpus=2))
    guest.truth.wait_for(1, BOOT_TIMEOUT_S)
    yield guest
    guest_pool.destroy(guest)


def _intervals(markers: list[Marker]) -> list[tuple[str, float]]:
    return [(a.phase, b.t_mono - a.t_mono) for a, b in itertools.pairwise(markers)]


def test_markers_alternate_starting_with_busy(toggler: Guest) -> None:
    markers = toggler.truth.wait_for(5, timeout_s=30)
    phases = [m.phase for m in markers]
    assert phases[0] == "busy"
    assert all(a != b for a, b in itertools.pairwise(phases)), phases
    assert toggler.truth.stats().ignored_bytes == 0


def test_phases_last_as_configured(toggler: Guest) -> None:
    markers = toggler.truth.wait_for(9, timeout_s=30)
    expected = {"busy": BUSY_S, "halted": HALTED_S}
    errors = [length - expected[phase] for phase, length in _intervals(markers)]
    # Typical error is < 1 ms (KVM) / ~3 ms (TCG); a phase one 10 ms tick too
    # long or short would move the median by 10 ms. Single intervals may be off
    # by host scheduling (a descheduled vCPU emits its marker late).
    assert abs(statistics.median(errors)) < MEDIAN_TOLERANCE_S, errors
    assert max(abs(e) for e in errors) < PHASE_TOLERANCE_S, errors


def test_vcpu_time_grows_while_busy_and_stalls_while_halted(
    lab_conn: libvirt.virConnect, toggler: Guest
) -> None:
    busy = sample_within_phase(
        lab_conn, toggler.uuid, toggler.truth, "busy", lead_s=WINDOW_LEAD_S, span_s=WINDOW_SPAN_S
    )
    halted = sample_within_phase(
        lab_conn, toggler.uuid, toggler.truth, "halted", lead_s=WINDOW_LEAD_S, span_s=WINDOW_SPAN_S
    )
    # Measured on an idle host: time ~1.00 busy, 0.00-0.04 halted (10 ms steps).
    # On an overloaded host a busy vCPU runs only part of the time and waits in
    # the run queue (``delay``) for the rest: with 3 CPU hogs, KVM showed time
    # 0.51 + delay 0.52. During other sessions' guest tests, time fell to 0.40
    # and time + delay below 0.8 once (waits that neither counter sees, e.g.
    # QEMU's big lock). A halted vCPU sleeps: it grows neither.
    busy_time, halted_time = rate(*busy, "vcpu.0.time"), rate(*halted, "vcpu.0.time")
    busy_all = busy_time + rate(*busy, "vcpu.0.delay")
    halted_all = halted_time + rate(*halted, "vcpu.0.delay")
    rates = f"busy time {busy_time:.2f} (+delay {busy_all:.2f}), halted {halted_time:.2f}"
    assert busy_time > 0.1, rates
    assert busy_all > 0.5, rates
    assert halted_time < 0.1, rates
    assert halted_all < 0.15, rates


def test_parked_vcpu_accumulates_no_time(lab_conn: libvirt.virConnect, toggler: Guest) -> None:
    # Any 1.4 s window holds >= 0.4 s of a 1.0/1.0 s cycle's busy phase, so vCPU 0
    # must show time: proof that the window saw a running guest.
    a = sample_domain(lab_conn, toggler.uuid)
    time.sleep(1.4)
    b = sample_domain(lab_conn, toggler.uuid)
    assert a.stats["vcpu.current"] == 2
    assert rate(a, b, "vcpu.0.time") > 0.2
    assert rate(a, b, "vcpu.1.time") < 0.02


@pytest.mark.kvm
@pytest.mark.parametrize("virt_type", ["kvm"], indirect=True)
def test_kvm_halt_wait_grows_only_while_halted(
    lab_conn: libvirt.virConnect, toggler: Guest
) -> None:
    key = "vcpu.0.halt_wait_ns.sum"
    busy = sample_within_phase(
        lab_conn,
        toggler.uuid,
        toggler.truth,
        "busy",
        lead_s=WINDOW_LEAD_S,
        span_s=WINDOW_SPAN_S,
        attempts=8,
        require=key,
    )
    halted = sample_within_phase(
        lab_conn,
        toggler.uuid,
        toggler.truth,
        "halted",
        lead_s=WINDOW_LEAD_S,
        span_s=WINDOW_SPAN_S,
        attempts=8,
        require=key,
    )
    # Measured here: 0.00 busy, ~0.99-1.00 halted.
    assert rate(*halted, key) > 0.8
    assert rate(*busy, key) < 0.1


def test_kvm_statistics_appear_only_under_kvm(
    toggler: Guest, lab_conn: libvirt.virConnect, virt_type: VirtType
) -> None:
    stats = sample_domain(lab_conn, toggler.uuid).stats
    kvm_keys = [k for k in stats if k.endswith((".sum", ".cur", ".max"))]
    if virt_type == "kvm":
        # With NOWAIT a concurrent poller can make KVM keys vanish from a sample.
        for _ in range(20):
            if "vcpu.1.halt_wait_ns.sum" in kvm_keys:
                break
            stats = sample_domain(lab_conn, toggler.uuid).stats
            kvm_keys = [k for k in stats if k.endswith((".sum", ".cur", ".max"))]
        assert "vcpu.1.halt_wait_ns.sum" in kvm_keys
    else:
        assert kvm_keys == []
