"""Record real bulk vCPU stats plus serial ground truth into a JSON file.

    python -m lab.record --virt-type qemu --out tests/data/records-tcg.json
    python -m lab.record --virt-type kvm  --out tests/data/records-kvm.json
    python -m lab.record --virt-type qemu --hotplug --out tests/data/records-hotplug-tcg.json

Default scenario: guest "toggler" (1 vCPU) plus guest "parked" (2 vCPUs: vCPU 0
toggles with its own phase offset, vCPU 1 stays parked by SeaBIOS). ``markers``
holds the toggler's markers (``meta.markers_domain`` names it);
``markers_by_domain`` holds every guest's. Hot-plug scenario: one toggler guest
booted with 1 of 2 vCPUs, ``setvcpus 2 --live`` half-way (``meta.hotplug``).

Samples are ``conn.getAllDomainStats(VCPU | STATE, NOWAIT)`` filtered to these
guests, every ``interval_s`` on a fixed schedule (no drift), values exactly as
libvirt-python returned them. ``t_mono`` is taken right after the call returned.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import libvirt

from lab.domains import Guest, GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import URI, ensure_libvirtd

DEFAULT_CACHE = Path.home() / ".cache" / "vcpu-agent-lab"
BOOT_TIMEOUT_S = 60.0
JsonDict = dict[str, Any]


def _version(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _sample(conn: libvirt.virConnect, uuids: set[str]) -> tuple[JsonDict, float]:
    flags = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE
    t0 = time.monotonic()
    records = conn.getAllDomainStats(flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
    t_mono, t_wall = time.monotonic(), time.time()
    domains = [
        {"name": dom.name(), "uuid": dom.UUIDString(), "stats": dict(stats)}
        for dom, stats in records
        if dom.UUIDString() in uuids
    ]
    return {"t_mono": t_mono, "t_wall": t_wall, "domains": domains}, t_mono - t0


def record(
    *,
    virt_type: VirtType,
    duration_s: float,
    interval_s: float,
    busy_s: float,
    halted_s: float,
    hotplug: bool,
    cache_dir: Path,
) -> JsonDict:
    image = build_toggler_image(busy_s=busy_s, halted_s=halted_s, cache_dir=cache_dir)
    with ensure_libvirtd() as daemon:
        if virt_type == "kvm" and not daemon.kvm.usable:
            raise SystemExit(f"KVM requested but unusable: {daemon.kvm.reason}")
        conn = libvirt.open(URI)
        try:
            with GuestPool(conn) as pool:
                return _record_guests(
                    conn,
                    pool,
                    image=image,
                    virt_type=virt_type,
                    duration_s=duration_s,
                    interval_s=interval_s,
                    busy_s=busy_s,
                    halted_s=halted_s,
                    hotplug=hotplug,
                )
        finally:
            conn.close()


def _record_guests(
    conn: libvirt.virConnect,
    pool: GuestPool,
    *,
    image: Path,
    virt_type: VirtType,
    duration_s: float,
    interval_s: float,
    busy_s: float,
    halted_s: float,
    hotplug: bool,
) -> JsonDict:
    guests: list[tuple[str, Guest]] = []
    if hotplug:
        spec = GuestSpec(image=image, virt_type=virt_type, vcpus=1, max_vcpus=2)
        guests.append(("toggler, booted with 1 of 2 vCPUs, vCPU 1 hot-plugged", pool.start(spec)))
    else:
        guests.append(("toggler", pool.start(GuestSpec(image=image, virt_type=virt_type))))
        spec = GuestSpec(image=image, virt_type=virt_type, vcpus=2)
        guests.append(("vCPU 0 toggles, vCPU 1 parked by firmware", pool.start(spec)))
    for _, guest in guests:  # sample only once every guest runs its boot sector
        guest.truth.wait_for(1, BOOT_TIMEOUT_S)
    uuids = {g.uuid for _, g in guests}

    samples: list[JsonDict] = []
    call_s: list[float] = []
    hotplug_meta: JsonDict | None = None
    n = round(duration_s / interval_s)
    start = time.monotonic()
    for k in range(n + 1):
        time.sleep(max(0.0, start + k * interval_s - time.monotonic()))
        sample, took = _sample(conn, uuids)
        samples.append(sample)
        call_s.append(took)
        if hotplug and hotplug_meta is None and k >= n // 2:
            dom = pool.domain(guests[0][1])
            before = time.monotonic()
            dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            hotplug_meta = {
                "domain": guests[0][1].name,
                "vcpus_from": 1,
                "vcpus_to": 2,
                "t_mono_before": before,
                "t_mono_after": time.monotonic(),
            }

    primary = guests[0][1]
    notes = "; ".join(f"{g.name}: {role}" for role, g in guests)
    meta: JsonDict = {
        "virt_type": virt_type,
        "libvirt_version": _version(conn.getLibVersion()),
        "qemu_version": _version(conn.getVersion()),
        "interval_s": interval_s,
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "busy_s": busy_s,
        "halted_s": halted_s,
        "note": (
            f"lab.record; guests: {notes}. markers are {primary.name}'s; "
            "markers_by_domain has every guest's. Phases are whole 10 ms guest ticks."
        ),
        "markers_domain": primary.name,
        "bulk_call_s": {
            "min": min(call_s),
            "median": statistics.median(call_s),
            "max": max(call_s),
        },
        # Calls longer than the interval break the schedule: seen (1.2-2.0 s, even
        # with NOWAIT) while other sessions started guests or restarted libvirtd.
        "stalled_calls": sum(1 for c in call_s if c > interval_s),
    }
    if hotplug_meta is not None:
        meta["hotplug"] = hotplug_meta
    if virt_type == "kvm":
        # NOWAIT drops the monitor-provided KVM keys of a domain whose job another
        # client holds at that instant (e.g. an agent polling all domains).
        meta["samples_without_kvm_keys"] = sum(
            1
            for s in samples
            for d in s["domains"]
            if not any(k.endswith(".sum") for k in d["stats"])
        )
    by_domain = {g.name: [asdict(m) for m in g.truth.markers()] for _, g in guests}
    return {
        "meta": meta,
        "samples": samples,
        "markers": by_domain[primary.name],
        "markers_by_domain": by_domain,
    }


def dump(data: JsonDict) -> str:
    """One sample per line: diffable, and far smaller than fully indented JSON."""
    lines = ["{", f'"meta": {json.dumps(data["meta"], indent=1)},', '"samples": [']
    samples = data["samples"]
    lines += [json.dumps(s) + ("," if i < len(samples) - 1 else "") for i, s in enumerate(samples)]
    lines.append("],")
    lines.append(f'"markers": {json.dumps(data["markers"])},')
    lines.append(f'"markers_by_domain": {json.dumps(data["markers_by_domain"])}')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    if json.loads(text) != data:  # the hand layout must stay plain JSON
        raise AssertionError("record layout does not round-trip")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.record", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--virt-type", choices=["qemu", "kvm"], default="qemu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of sampling")
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--busy", type=float, default=1.5, help="busy phase, seconds")
    parser.add_argument("--halted", type=float, default=1.5, help="halted phase, seconds")
    parser.add_argument("--hotplug", action="store_true", help="record setvcpus 1 -> 2 --live")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    data = record(
        virt_type=args.virt_type,
        duration_s=args.duration,
        interval_s=args.interval,
        busy_s=args.busy,
        halted_s=args.halted,
        hotplug=args.hotplug,
        cache_dir=args.cache_dir,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(data))
    bulk = data["meta"]["bulk_call_s"]
    if data["meta"]["stalled_calls"]:
        print(
            f"WARNING: {data['meta']['stalled_calls']} bulk call(s) took longer than "
            f"{args.interval} s: the host was busy; record again on a quiet host",
            file=sys.stderr,
        )
    print(
        f"{args.out}: {len(data['samples'])} samples, {len(data['markers'])} markers, "
        f"bulk call median {bulk['median'] * 1000:.1f} ms (max {bulk['max'] * 1000:.1f} ms)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
