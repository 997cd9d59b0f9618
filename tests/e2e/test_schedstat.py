"""The /proc schedstat source on real QEMU guests, against libvirt's own counters.

libvirt's ``vcpu.<n>.time`` is the vCPU thread's utime + stime in 10 ms ticks and
``vcpu.<n>.delay`` its schedstat run-queue wait, so the two sources must agree to
within a tick plus the time between the two reads. And the agent must serve a
real TCG guest from /proc (its log says so), and leave a KVM guest to libvirt,
whose halt-wait counter judged the truth guests better (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from agent.records import domain_record
from agent.schedstat import SchedstatSource
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from tests.e2e.rig import Rig

pytestmark = pytest.mark.libvirt

INTERVAL = 0.25  # read by the rig fixture
STATS = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE


@pytest.fixture(scope="module")
def pool(e2e_daemon: Libvirtd) -> Iterator[GuestPool]:
    conn = libvirt.open(e2e_daemon.uri)
    try:
        with GuestPool(conn) as p:
            yield p
    finally:
        conn.close()


def test_proc_counters_agree_with_libvirts(
    pool: GuestPool, virt_type: VirtType, tmp_path: Path
) -> None:
    image = build_toggler_image(busy_s=0.3, halted_s=0.3, cache_dir=tmp_path)
    guest = pool.start(GuestSpec(image=image, virt_type=virt_type, vcpus=2))
    try:
        guest.truth.wait_for(3, 90.0)
        dom = pool.domain(guest)
        src = SchedstatSource(kvm=True)
        for _ in range(5):
            stats = dom.connect().domainListGetStats([dom], STATS)[0][1]
            t = time.monotonic()
            lv = domain_record(
                name=guest.name, uuid=guest.uuid, stats=stats, t_mono=t, t_wall=time.time()
            )
            assert src.attach(lv), src.refused
            proc = src.read(lv, time.monotonic(), time.time())
            assert proc is not None
            for a, b in zip(lv.vcpus, proc.vcpus, strict=True):
                assert a.time_ns is not None
                assert b.time_ns is not None
                # Same thread, same clock: libvirt's value is truncated to 10 ms
                # ticks and read a few ms earlier.
                assert -0.005e9 <= b.time_ns - a.time_ns <= 0.05e9, (a, b)
                assert 0 <= (b.delay_ns or 0) - (a.delay_ns or 0) <= 0.05e9, (a, b)
            time.sleep(0.2)
        src.close()
    finally:
        pool.destroy(guest)


def test_the_agent_serves_a_running_guest_from_proc(rig: Rig, tmp_path: Path) -> None:
    image = build_toggler_image(busy_s=0.5, halted_s=0.5, cache_dir=tmp_path)
    guest = rig.pool.start(GuestSpec(image=image, virt_type=rig.virt_type, vcpus=1))
    try:
        guest.truth.wait_for(2, 90.0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            said = [
                e
                for e in rig.agent.log_events()
                if str(e.get("event", "")).startswith("schedstat.") and e.get("uuid") == guest.uuid
            ]
            if said:
                break
            time.sleep(0.2)
        if rig.virt_type == "kvm":  # KVM's halt-wait decides better: libvirt keeps it
            assert [e["event"] for e in said] == ["schedstat.unavailable"], said
            assert "KVM" in str(said[0]["reason"])
        else:
            assert [e["event"] for e in said] == ["schedstat.serving"], said
    finally:
        rig.pool.destroy(guest)
