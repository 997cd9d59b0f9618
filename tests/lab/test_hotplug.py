"""vCPU hot-plug on a lab guest: no event exists for it, only the bulk stats show it."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.sampling import rate, sample_domain

pytestmark = pytest.mark.libvirt


def test_setvcpus_live_adds_a_vcpu_that_stays_parked(
    guest_pool: GuestPool, lab_conn: libvirt.virConnect, image_cache: Path
) -> None:
    image = build_toggler_image(busy_s=0.5, halted_s=0.5, cache_dir=image_cache)
    guest = guest_pool.start(GuestSpec(image=image, virt_type="qemu", vcpus=1, max_vcpus=2))
    try:
        guest.truth.wait_for(1, timeout_s=60)
        before = sample_domain(lab_conn, guest.uuid)
        assert (before.stats["vcpu.current"], before.stats["vcpu.maximum"]) == (1, 2)
        assert "vcpu.1.state" not in before.stats

        guest_pool.domain(guest).setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        plugged = sample_domain(lab_conn, guest.uuid)
        assert plugged.stats["vcpu.current"] == 2
        assert plugged.stats["vcpu.1.state"] == libvirt.VIR_VCPU_RUNNING

        # Nothing in the guest starts the new CPU: it never runs.
        n = len(guest.truth.markers())
        guest.truth.wait_for(n + 2, timeout_s=30)  # let a full cycle pass
        after = sample_domain(lab_conn, guest.uuid)
        assert rate(plugged, after, "vcpu.1.time") < 0.02
    finally:
        guest_pool.destroy(guest)
