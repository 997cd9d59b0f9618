"""Bulk-stat samples of one guest, and windows known (from truth) to lie in one phase.

Counters become rates over two samples: ``rate(a, b, "vcpu.0.time")`` is the
fraction of wall time vCPU 0 ran (ns per ns). ``vcpu.<n>.time`` moves in 10 ms
steps, so a window of ``span_s`` has a rate error of about ``0.01 / span_s``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import libvirt

from lab.truth import Phase, SerialTruth

StatValue = int | bool | str | float


@dataclass(frozen=True, slots=True)
class DomainSample:
    t_mono: float  # time.monotonic() right after the bulk call returned
    stats: Mapping[str, StatValue]


def sample_domain(conn: libvirt.virConnect, uuid: str) -> DomainSample:
    """One ``getAllDomainStats(VCPU | STATE, NOWAIT)`` call, kept for one domain."""
    flags = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE
    records = conn.getAllDomainStats(flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
    t_mono = time.monotonic()
    for dom, stats in records:
        if dom.UUIDString() == uuid:
            return DomainSample(t_mono=t_mono, stats=dict(stats))
    raise LookupError(f"domain {uuid} not in bulk stats")


def rate(a: DomainSample, b: DomainSample, key: str) -> float:
    """Growth of a nanosecond counter per nanosecond of wall time between samples."""
    va, vb = a.stats[key], b.stats[key]
    if not isinstance(va, int) or not isinstance(vb, int):
        raise TypeError(f"{key} is not an integer counter: {va!r}, {vb!r}")
    return (vb - va) / 1e9 / (b.t_mono - a.t_mono)


def sample_within_phase(
    conn: libvirt.virConnect,
    uuid: str,
    truth: SerialTruth,
    phase: Phase,
    *,
    lead_s: float,
    span_s: float,
    attempts: int = 4,
    phase_timeout_s: float = 30.0,
    require: str | None = None,
) -> tuple[DomainSample, DomainSample]:
    """Two samples ``span_s`` apart, both inside one ``phase`` per the truth.

    Waits for the next marker of ``phase``, samples ``lead_s`` after it and
    ``span_s`` later, then checks that no other marker arrived before the second
    sample; a host hiccup that breaks that is retried, not misreported.

    ``require``: retry a window where a sample lacks this key. With NOWAIT,
    libvirt skips the monitor (QMP query-stats: all KVM ``*.sum``/``*.cur``
    keys) of a domain whose job another client holds at that moment, so such
    keys vanish from some samples whenever something else polls the same guest.
    """
    for _ in range(attempts):
        seen = len(truth.markers())
        start = _next_marker(truth, phase, seen, phase_timeout_s)
        time.sleep(max(0.0, start + lead_s - time.monotonic()))
        a = sample_domain(conn, uuid)
        time.sleep(max(0.0, a.t_mono + span_s - time.monotonic()))
        b = sample_domain(conn, uuid)
        later = [m for m in truth.markers() if m.t_mono > start]
        clean = not later or later[0].t_mono > b.t_mono
        if clean and (require is None or (require in a.stats and require in b.stats)):
            return a, b
    missing = f" with {require!r} in both samples" if require else ""
    raise RuntimeError(f"no clean {phase} window of {span_s} s{missing} in {attempts} attempts")


def _next_marker(truth: SerialTruth, phase: Phase, seen: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        markers = truth.wait_for(seen + 1, max(0.0, deadline - time.monotonic()))
        if markers[-1].phase == phase:
            return markers[-1].t_mono
        seen = len(markers)
