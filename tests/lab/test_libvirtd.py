"""The harness's libvirtd handling, including a restart that guests survive."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import libvirt
import pytest

from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import probe_kvm
from lab.libvirtd import Libvirtd, libvirtd_answers

pytestmark = pytest.mark.libvirt


def test_libvirtd_answers_once_the_harness_is_up(lab_daemon: Libvirtd) -> None:
    assert libvirtd_answers(lab_daemon.uri)


def test_kvm_status_agrees_with_a_fresh_probe(lab_daemon: Libvirtd) -> None:
    assert probe_kvm().usable == lab_daemon.kvm.usable
    assert lab_daemon.kvm.virt_type == ("kvm" if lab_daemon.kvm.usable else "qemu")


def test_a_borrowed_libvirtd_is_left_alone(lab_daemon: Libvirtd) -> None:
    with Libvirtd(state_dir=Path("/run/vcpu-agent-lab-nested")) as nested:
        assert not nested.owns_libvirtd
        with pytest.raises(RuntimeError, match="did not start"):
            nested.stop_libvirtd()
    assert libvirtd_answers(lab_daemon.uri)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_guests_survive_a_libvirtd_restart(
    lab_daemon: Libvirtd, image_cache: Path, sig: signal.Signals
) -> None:
    if not lab_daemon.owns_libvirtd:
        pytest.skip("libvirtd was running before the tests: not ours to restart")
    image = build_toggler_image(busy_s=0.3, halted_s=0.3, cache_dir=image_cache)
    conn = libvirt.open(lab_daemon.uri)
    try:
        with GuestPool(conn) as pool:
            guest = pool.start(GuestSpec(image=image, virt_type="qemu"))
            guest.truth.wait_for(1, timeout_s=60)
            old_pid = lab_daemon.libvirtd_pid
            lab_daemon.restart_libvirtd(sig)
            assert lab_daemon.libvirtd_pid not in (None, old_pid)
            assert old_pid is not None
            assert not os.path.exists(f"/proc/{old_pid}/exe") or _is_zombie(old_pid)
            # The guest kept toggling through the restart ...
            n = len(guest.truth.markers())
            guest.truth.wait_for(n + 2, timeout_s=30)
            # ... and the new daemon knows it; the old connection is dead.
            with pytest.raises(libvirt.libvirtError):
                conn.getLibVersion()
            conn.close()
            conn = libvirt.open(lab_daemon.uri)
            pool.use_connection(conn)
            assert pool.domain(guest).isActive()
    finally:
        conn.close()


def _is_zombie(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"
