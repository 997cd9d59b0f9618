"""Hand-built records for the pure core's tests, in libvirt's own key format."""

from __future__ import annotations

from typing import Any

from agent.model import DomainRecord
from agent.records import domain_record

UUID = "00000000-0000-4000-8000-000000000001"


def dom(
    t: float,
    *,
    state: int = 1,
    current: int | None = 1,
    maximum: int | None = None,
    name: str = "vm",
    uuid: str = UUID,
    **vcpu_keys: object,
) -> DomainRecord:
    """A domain record at time ``t`` (seconds); ``v0_time=...`` -> ``vcpu.0.time``."""
    stats: dict[str, object] = {"state.state": state, "state.reason": 1}
    if current is not None:
        stats["vcpu.current"] = current
        stats["vcpu.maximum"] = maximum if maximum is not None else current
    for key, value in vcpu_keys.items():
        index, _, field = key[1:].partition("_")
        name_map = {
            "time": "time",
            "state": "state",
            "halted": "halted",
            "hw": "halt_wait_ns.sum",
            "delay": "delay",
        }
        stats[f"vcpu.{index}.{name_map[field]}"] = value
    return domain_record(name=name, uuid=uuid, stats=stats, t_mono=t, t_wall=1e9 + t)


def busy(t: float, busy_seconds: float, **kw: Any) -> DomainRecord:
    """vCPU 0 has consumed ``busy_seconds`` of CPU by time ``t`` (TCG-style record)."""
    return dom(t, v0_state=1, v0_time=int(busy_seconds * 1e9), **kw)
