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
from lab.libvirtd import DaemonError, Libvirtd, libvirtd_answers

pytestmark = pytest.mark.libvirt


def test_libvirtd_answers_once_the_harness_is_up(lab_daemon: Libvirtd) -> None:
    assert libvirtd_answers(lab_daemon.uri)


def test_kvm_status_agrees_with_a_fresh_probe(lab_daemon: Libvirtd) -> None:
    assert probe_kvm().usable == lab_daemon.kvm.usable
    assert lab_daemon.kvm.virt_type == ("kvm" if lab_daemon.kvm.usable else "qemu")


def test_a_second_lab_user_shares_the_daemon_and_leaves_it_running(
    lab_daemon: Libvirtd,
) -> None:
    pid = lab_daemon.libvirtd_pid
    with Libvirtd() as second:
        assert second.libvirtd_pid == pid
        assert second.other_users() >= 1
        with pytest.raises(DaemonError, match="refusing"):
            second.stop_libvirtd()
    assert libvirtd_answers(lab_daemon.uri)
    assert lab_daemon.libvirtd_pid == pid


def test_users_are_registered_only_while_inside(lab_daemon: Libvirtd, tmp_path: Path) -> None:
    # A private state dir: the running libvirtd is not "lab-started" there, so
    # this user may only borrow it, and leaving must not stop it.
    with Libvirtd(state_dir=tmp_path, prepare_kvm=False) as borrower:
        assert not borrower.owns_libvirtd
        assert len(list((tmp_path / "users").iterdir())) == 1
        with pytest.raises(DaemonError, match="did not start"):
            borrower.stop_libvirtd()
    assert list((tmp_path / "users").iterdir()) == []
    assert libvirtd_answers(lab_daemon.uri)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_guests_survive_a_libvirtd_restart(
    lab_daemon: Libvirtd, image_cache: Path, sig: signal.Signals
) -> None:
    if not lab_daemon.owns_libvirtd:
        pytest.skip("libvirtd was not started by the lab: not ours to restart")
    if lab_daemon.other_users():
        pytest.skip("another lab session shares libvirtd: restarting it would break that one")
    image = build_toggler_image(busy_s=0.3, halted_s=0.3, cache_dir=image_cache)
    conn = libvirt.open(lab_daemon.uri)
    try:
        with GuestPool(conn) as pool:
            guest = pool.start(GuestSpec(image=image, virt_type="qemu"))
            guest.truth.wait_for(1, timeout_s=60)
            old_pid = lab_daemon.libvirtd_pid
            try:
                lab_daemon.restart_libvirtd(sig)
            except DaemonError as exc:  # another session registered since the check
                if "other lab user" not in str(exc):
                    raise
                pytest.skip(str(exc))
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
