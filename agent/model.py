"""The typed values that cross module boundaries.

Data flows one way: libvirt stats -> ``DomainRecord`` -> classified ``VcpuView`` ->
``Change`` -> MQTT messages. Everything here is a frozen value with no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class VcpuState(enum.StrEnum):
    """The seed patch's vCPU vocabulary (``virsh vcpuinfo`` with VIR_VCPU_HALTED)."""

    OFFLINE = "offline"
    RUNNING = "running"
    BLOCKED = "blocked"
    HALTED = "halted"
    UNKNOWN = "unknown"
    NA = "n/a"

    @property
    def label(self) -> str:
        """The human text the seed patch gave this state in ``virsh vcpuinfo``."""
        return _LABELS[self]


_LABELS = {
    VcpuState.OFFLINE: "offline",
    VcpuState.RUNNING: "running",
    VcpuState.BLOCKED: "blocked",
    VcpuState.HALTED: "running (halted)",
    VcpuState.UNKNOWN: "no state",
    VcpuState.NA: "N/A",
}


class Source(enum.StrEnum):
    """Which evidence decided a vCPU's state."""

    LIBVIRT = "libvirt"  # vcpu.<n>.halted, filled by the QEMU driver for s390 only
    KVM = "kvm"  # share of wall time in vcpu.<n>.halt_wait_ns.sum (x86 KVM stats)
    CPUTIME = "cputime"  # share of wall time NOT consumed in vcpu.<n>.time
    VCPUSTATE = "vcpustate"  # libvirt's virVcpuState (offline/running/blocked) as is
    DOMSTATE = "domstate"  # the domain is not running, or the vCPU is beyond vcpu.current


class DomainState(enum.IntEnum):
    """libvirt's virDomainState."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7

    @property
    def text(self) -> str:
        return self.name.lower()

    @property
    def vcpus_active(self) -> bool:
        """Whether the guest's vCPUs can execute in this domain state.

        SHUTDOWN means "being shut down": the guest is still running its shutdown.
        """
        return self in _ACTIVE

    @classmethod
    def parse(cls, value: int) -> DomainState:
        try:
            return cls(value)
        except ValueError:
            return cls.NOSTATE


_ACTIVE = frozenset({DomainState.RUNNING, DomainState.BLOCKED, DomainState.SHUTDOWN})


class VcpuRunState(enum.IntEnum):
    """libvirt's virVcpuState, as upstream shipped it (no HALTED member)."""

    OFFLINE = 0
    RUNNING = 1
    BLOCKED = 2


class RecordOrigin(enum.StrEnum):
    BULK = "bulk"  # virConnectGetAllDomainStats / virDomainListGetStats, VCPU group
    VCPUINFO = "vcpuinfo"  # virDomainGetVcpus: drivers without a bulk VCPU group
    STATE_ONLY = "state-only"  # the VCPU group was missing (inactive, or NOWAIT skipped it)
    # A BULK record's structure (state, online vCPUs) with each vCPU's run and wait
    # counters read from /proc/<qemu pid>/task/<tid>/schedstat (agent/schedstat.py).
    SCHEDSTAT = "schedstat"


class VcpuRecord(NamedTuple):
    """What libvirt said about one vCPU in one sample. ``None`` means "not reported".

    A NamedTuple rather than a frozen dataclass: one is built per vCPU per sample,
    and a frozen dataclass's ``__init__`` costs several times more (bench/core.py).
    """

    vcpu: int  # the vCPU's index
    state: int | None = None
    time_ns: int | None = None
    halted: bool | None = None
    halt_wait_ns: int | None = None
    delay_ns: int | None = None  # time runnable but waiting for a host CPU (run_delay)


@dataclass(frozen=True, slots=True)
class DomainRecord:
    """One domain in one sample, parsed defensively from libvirt's flat stats dict."""

    name: str
    uuid: str
    state: DomainState
    reason: int
    origin: RecordOrigin
    vcpu_current: int | None
    vcpu_maximum: int | None
    vcpus: tuple[VcpuRecord, ...]
    t_mono: float  # time.monotonic() right after the call returned: for rates
    t_wall: float  # time.time() at the same moment: for timestamps
    # How long the call that read it took: the counters were read at some unknown
    # moment within it, so a delta over an interval is dated only this precisely.
    took: float = 0.0


@dataclass(frozen=True, slots=True)
class VcpuView:
    """A vCPU's reported state and the evidence for it."""

    state: VcpuState
    source: Source
    ratio: float | None  # the measured halted share that decided it, if any


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A libvirt domain lifecycle (or reboot) event, translated to neutral names."""

    uuid: str
    name: str
    event: str  # e.g. "started", "suspended", "stopped", "rebooted"
    detail: str  # e.g. "booted", "paused", "destroyed"
    t_wall: float
