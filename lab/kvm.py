"""Is /dev/kvm usable by libvirt's QEMU here, and which virt type follows.

/dev/kvm on this kind of machine exists (nested) but starts ``crw------- root
root``, so QEMU, which libvirt runs as ``libvirt-qemu`` (a member of group
``kvm``), cannot open it. ``KvmAccess`` grants ``kvm:0660`` for the duration of a
lab session and restores the original owner group and mode afterwards.

Do it BEFORE libvirtd starts: libvirtd caches per-emulator capabilities and
re-probes every emulator when /dev/kvm's permissions (ctime) change, which took
minutes with many emulators installed (see shared NOTES). The mode is only
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
from types import TracebackType
from typing import Literal, Self

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


class KvmAccess:
    """Context manager: make /dev/kvm ``kvm:0660`` if we can, restore it on exit.

    ``status`` is the probe after the fix-up. Without root, or without the
    device, nothing is changed and ``status`` says why KVM is unusable.
    """

    def __init__(self, device: Path = KVM_DEVICE, group: str = KVM_GROUP) -> None:
        self._device = device
        self._group = group
        self._saved: tuple[int, int] | None = None  # (mode bits, gid) to restore
        self.status = KvmStatus(False, "not probed yet")

    def __enter__(self) -> Self:
        self._grant()
        self.status = probe_kvm(self._device, self._group)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()

    def _grant(self) -> None:
        if os.geteuid() != 0:
            return
        try:
            st = self._device.stat()
            gid = grp.getgrnam(self._group).gr_gid
        except (FileNotFoundError, KeyError):
            return
        mode = stat.S_IMODE(st.st_mode)
        if st.st_gid == gid and mode == KVM_MODE:
            return  # already right: leave ctime alone so libvirtd keeps its cache
        self._saved = (mode, st.st_gid)
        os.chown(self._device, -1, gid)
        os.chmod(self._device, KVM_MODE)

    def restore(self) -> None:
        """Put back the original mode and group (idempotent)."""
        if self._saved is None:
            return
        mode, gid = self._saved
        self._saved = None
        os.chown(self._device, -1, gid)
        os.chmod(self._device, mode)
