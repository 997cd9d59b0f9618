"""Is /dev/kvm usable by libvirt's QEMU here, and which virt type follows.

/dev/kvm on this kind of machine exists (nested) but starts ``crw------- root
root``, so QEMU, which libvirt runs as ``libvirt-qemu`` (a member of group
``kvm``), cannot open it. ``grant_kvm`` makes it ``kvm:0660`` and returns the
original mode and group, which ``restore_kvm`` puts back (lab/libvirtd.py does
that when the last lab user leaves).

Do it BEFORE libvirtd starts: libvirtd caches per-emulator capabilities and
re-probes every emulator when /dev/kvm's permissions (ctime) change, which took
minutes with many emulators installed (docs/platform.md). The mode is only
touched when it differs, so an already-correct device keeps its ctime.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

VirtType = Literal["kvm", "qemu"]

KVM_DEVICE = Path("/dev/kvm")
KVM_GROUP = "kvm"
KVM_MODE = 0o660
# <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01); KVMIO is 0xAE.
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_API_VERSION = 12


@dataclass(frozen=True, slots=True)
class KvmStatus:
    """Outcome of probing /dev/kvm; ``reason`` is meant for pytest skip messages."""

    usable: bool
    reason: str

    @property
    def virt_type(self) -> VirtType:
        """libvirt's domain type: "kvm" when usable, else "qemu" (TCG)."""
        return "kvm" if self.usable else "qemu"


def probe_kvm(device: Path = KVM_DEVICE, group: str = KVM_GROUP) -> KvmStatus:
    """Check that KVM can create a VM and that group ``group`` may open the device.

    Opening as root proves little about QEMU (which runs as libvirt-qemu), so the
    group/mode check stands in for "QEMU can open it"; KVM_CREATE_VM proves that
    the (possibly nested) hypervisor actually works.
    """
    try:
        st = device.stat()
    except FileNotFoundError:
        return KvmStatus(False, f"{device} does not exist (no KVM: guests use TCG)")
    if not stat.S_ISCHR(st.st_mode):
        return KvmStatus(False, f"{device} is not a character device")
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmStatus(False, f"cannot open {device}: {exc.strerror}")
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION, 0)
        if version != _KVM_API_VERSION:
            return KvmStatus(False, f"{device}: KVM API version {version}, expected 12")
        try:
            vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        except OSError as exc:
            return KvmStatus(
                False, f"{device}: KVM_CREATE_VM failed: {errno.errorcode.get(exc.errno or 0)}"
            )
        os.close(vm_fd)
    finally:
        os.close(fd)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return KvmStatus(False, f"group {group!r} does not exist")
    if st.st_gid != gid or st.st_mode & 0o060 != 0o060:
        mode = stat.filemode(st.st_mode)
        return KvmStatus(
            False, f"{device} is {mode} gid {st.st_gid}: QEMU (group {group}) cannot open it"
        )
    return KvmStatus(True, f"{device} usable (group {group}, mode {stat.filemode(st.st_mode)})")


def grant_kvm(device: Path = KVM_DEVICE, group: str = KVM_GROUP) -> tuple[int, int] | None:
    """Make ``device`` ``group:0660`` if we can; return the (mode, gid) it had.

    Returns None when nothing was changed: not root, no device or group, or it
    was right already (then its ctime is left alone, so libvirtd keeps its
    capability cache).
    """
    if os.geteuid() != 0:
        return None
    try:
        st = device.stat()
        gid = grp.getgrnam(group).gr_gid
    except (FileNotFoundError, KeyError):
        return None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_gid == gid and mode == KVM_MODE:
        return None
    os.chown(device, -1, gid)
    os.chmod(device, KVM_MODE)
    return mode, st.st_gid


def restore_kvm(saved: tuple[int, int], device: Path = KVM_DEVICE) -> None:
    """Put back what ``grant_kvm`` returned."""
    mode, gid = saved
    os.chown(device, -1, gid)
    os.chmod(device, mode)
