"""Parse libvirt's flat stats dicts into ``DomainRecord`` values (pure).

The KVM per-vCPU keys (``vcpu.<n>.halt_wait_ns.sum``) are outside libvirt's stable
API promise, and any key may be missing (NOWAIT skips what needs a domain job, old
drivers lack groups), so every key is optional and every value is type-checked:
a malformed value is treated as absent, never as zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from agent.model import DomainRecord, DomainState, RecordOrigin, VcpuRecord

# A guest cannot have more vCPUs than this (QEMU's x86 limit is 4096 in 7.x); a
# larger vcpu.maximum is a corrupt record, not a reason to allocate millions.
MAX_VCPUS = 16384


def _int(stats: Mapping[str, object], key: str) -> int | None:
    value = stats.get(key)
    # Exactly int: bool is an int subclass, and a boolean where a counter belongs
    # is malformed.
    if type(value) is int and value >= 0:
        return value
    return None


@functools.lru_cache(maxsize=MAX_VCPUS)
def _vcpu_keys(n: int) -> tuple[str, str, str, str, str]:
    return (
        f"vcpu.{n}.state",
        f"vcpu.{n}.time",
        f"vcpu.{n}.halted",
        f"vcpu.{n}.halt_wait_ns.sum",
        f"vcpu.{n}.delay",
    )


def _vcpu(stats: Mapping[str, object], n: int) -> VcpuRecord:
    state, time_ns, halted, halt_wait, delay = _vcpu_keys(n)
    return VcpuRecord(
        n,
        _int(stats, state),
        _int(stats, time_ns),
        _bool(stats, halted),
        _int(stats, halt_wait),
        _int(stats, delay),
    )


def _bool(stats: Mapping[str, object], key: str) -> bool | None:
    value = stats.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _count(stats: Mapping[str, object], key: str) -> int | None:
    value = _int(stats, key)
    return value if value is not None and value <= MAX_VCPUS else None


def domain_record(
    *,
    name: str,
    uuid: str,
    stats: Mapping[str, object],
    t_mono: float,
    t_wall: float,
    took: float = 0.0,
) -> DomainRecord:
    """Build a record from one ``(domain, stats)`` pair of a bulk stats call."""
    state = DomainState.parse(_int(stats, "state.state") or 0)
    reason = _int(stats, "state.reason") or 0
    current = _count(stats, "vcpu.current")
    maximum = _count(stats, "vcpu.maximum")
    if current is None and maximum is None:
        origin = RecordOrigin.STATE_ONLY
        vcpus: tuple[VcpuRecord, ...] = ()
    else:
        origin = RecordOrigin.BULK
        # Per-vCPU keys exist for indices < maximum; take whichever bound we have.
        top = max(current or 0, maximum or 0)
        vcpus = tuple(_vcpu(stats, n) for n in range(top))
    return DomainRecord(
        name=name,
        uuid=uuid,
        state=state,
        reason=reason,
        origin=origin,
        vcpu_current=current,
        vcpu_maximum=maximum,
        vcpus=vcpus,
        t_mono=t_mono,
        t_wall=t_wall,
        took=took,
    )


def vcpuinfo_record(
    *,
    name: str,
    uuid: str,
    state: int,
    reason: int,
    vcpu_info: Sequence[tuple[int, int, int, int]],
    maximum: int | None,
    t_mono: float,
    t_wall: float,
    took: float = 0.0,
) -> DomainRecord:
    """Build a record from ``virDomainGetVcpus`` (drivers without a bulk VCPU group).

    Only the vCPU run state is kept: the CPU time of such drivers (the test driver
    invents it) is not trusted for halted detection.
    """
    vcpus = {
        number: VcpuRecord(vcpu=number, state=run_state)
        for number, run_state, _cpu_time, _cpu in vcpu_info
        if 0 <= number <= MAX_VCPUS
    }
    top = max([*vcpus, -1]) + 1
    if maximum is not None:
        top = max(top, min(maximum, MAX_VCPUS))
    return DomainRecord(
        name=name,
        uuid=uuid,
        state=DomainState.parse(state),
        reason=reason,
        origin=RecordOrigin.VCPUINFO,
        vcpu_current=len(vcpus),
        vcpu_maximum=top,
        vcpus=tuple(vcpus.get(n, VcpuRecord(vcpu=n, state=0)) for n in range(top)),
        t_mono=t_mono,
        t_wall=t_wall,
        took=took,
    )
