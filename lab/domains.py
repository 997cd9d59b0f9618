"""Start uniquely named toggler guests from generated domain XML; clean up exactly them.

Each guest gets its own directory (a copy of the disk image, the serial file)
and a ``SerialTruth`` watching the serial file from before the guest starts, so
the first marker is never missed. ``GuestPool`` destroys (and undefines, when
persistent) only the domains it created, identified by UUID.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from xml.sax.saxutils import escape, quoteattr

import libvirt

from lab.kvm import VirtType
from lab.truth import SerialTruth

NAME_PREFIX = "vcpuagent-test"
EMULATOR = "/usr/bin/qemu-system-x86_64"


@dataclass(frozen=True, slots=True)
class GuestSpec:
    image: Path
    virt_type: VirtType
    vcpus: int = 1  # <vcpu current=...>: online at boot
    max_vcpus: int | None = None  # None: same as vcpus (no hot-plug room)
    memory_mib: int = 64
    persistent: bool = False

    @property
    def maximum(self) -> int:
        return self.vcpus if self.max_vcpus is None else self.max_vcpus


@dataclass(frozen=True, slots=True)
class Guest:
    name: str
    uuid: str
    spec: GuestSpec
    workdir: Path
    serial_path: Path
    started_mono: float  # time.monotonic() right after libvirt started it
    truth: SerialTruth = field(compare=False, repr=False)


def domain_xml(
    *,
    name: str,
    virt_type: VirtType,
    disk: Path,
    serial: Path,
    vcpus: int = 1,
    max_vcpus: int | None = None,
    memory_mib: int = 64,
) -> str:
    """A minimal i440FX guest: one raw IDE disk, COM1 into a file, nothing else."""
    maximum = vcpus if max_vcpus is None else max_vcpus
    if not 1 <= vcpus <= maximum:
        raise ValueError(f"need 1 <= vcpus ({vcpus}) <= max_vcpus ({maximum})")
    # Notes on choices:
    # - machine 'pc' + <acpi/>: CPU hot-plug via ACPI works (virsh setvcpus --live).
    # - tickpolicy='discard': a late PIT tick is dropped rather than replayed in a
    #   burst, so the guest's 10 ms ticks never bunch up after a host stall.
    # - on_reboot=destroy: a triple fault in the boot sector shows as a dead
    #   domain, not as a silent reboot loop that keeps re-emitting markers.
    # - memballoon/usb 'none', no <interface>, no <graphics>: nothing the toggler
    #   does not need (and no network at all).
    return f"""\
<domain type='{virt_type}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static' current='{vcpus}'>{maximum}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='discard'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='hda' bus='ide'/>
    </disk>
    <serial type='file'>
      <source path={quoteattr(str(serial))}/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def unique_name(prefix: str = NAME_PREFIX) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class GuestPool:
    """Context manager creating guests on ``conn`` and destroying exactly those.

    ``conn`` must be a read-write ``libvirt.virConnect`` to qemu:///system.
    """

    def __init__(
        self, conn: libvirt.virConnect, *, base_dir: Path | None = None, prefix: str = NAME_PREFIX
    ) -> None:
        self._conn = conn
        self._prefix = prefix
        self._own_base = base_dir is None
        self._base = (
            Path(tempfile.mkdtemp(prefix="vcpuagent-lab-")) if base_dir is None else base_dir
        )
        # QEMU runs as libvirt-qemu and must traverse to its disk copy.
        self._base.chmod(0o755)
        self._guests: list[Guest] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def use_connection(self, conn: libvirt.virConnect) -> None:
        """Continue on a new connection, e.g. after a libvirtd restart killed the old one."""
        self._conn = conn

    @property
    def guests(self) -> list[Guest]:
        return list(self._guests)

    def start(self, spec: GuestSpec) -> Guest:
        name = unique_name(self._prefix)
        workdir = self._base / name
        workdir.mkdir(mode=0o755)
        disk = workdir / "disk.img"
        shutil.copyfile(spec.image, disk)  # per-guest copy: IDE disks cannot be read-only
        serial = workdir / "serial.log"
        xml = domain_xml(
            name=name,
            virt_type=spec.virt_type,
            disk=disk,
            serial=serial,
            vcpus=spec.vcpus,
            max_vcpus=spec.max_vcpus,
            memory_mib=spec.memory_mib,
        )
        (workdir / "domain.xml").write_text(xml)
        truth = SerialTruth(serial)
        truth.start()
        try:
            if spec.persistent:
                dom = self._conn.defineXML(xml)
                try:
                    dom.create()
                except libvirt.libvirtError:
                    dom.undefine()
                    raise
            else:
                dom = self._conn.createXML(xml, 0)
        except BaseException:
            truth.stop()
            raise
        guest = Guest(
            name=name,
            uuid=dom.UUIDString(),
            spec=spec,
            workdir=workdir,
            serial_path=serial,
            started_mono=time.monotonic(),
            truth=truth,
        )
        self._guests.append(guest)
        return guest

    def domain(self, guest: Guest) -> libvirt.virDomain:
        """The live ``libvirt.virDomain`` for a guest of this pool."""
        return self._conn.lookupByUUIDString(guest.uuid)

    def destroy(self, guest: Guest) -> None:
        """Destroy (and undefine) one guest; tolerate it being gone already."""
        self._guests.remove(guest)
        try:
            dom = self._conn.lookupByUUIDString(guest.uuid)
        except libvirt.libvirtError:
            dom = None
        try:
            if dom is not None:
                if dom.isActive():
                    dom.destroy()
                if guest.spec.persistent:
                    dom.undefine()
        finally:
            guest.truth.stop()

    def close(self) -> None:
        errors: list[BaseException] = []
        for guest in reversed(list(self._guests)):
            try:
                self.destroy(guest)
            except libvirt.libvirtError as exc:
                errors.append(exc)
        if self._own_base:
            shutil.rmtree(self._base, ignore_errors=True)
        if errors:
            raise errors[0]
