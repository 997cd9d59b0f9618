"""Measure the lab itself: the numbers quoted in docs/lab.md.

    python -m lab.measure [--rounds 3]

- watcher latency: write() of one marker byte by this process -> its stamp;
- guest boot: createXML returned -> first marker, per virt type;
- marker jitter: |observed phase length - configured| (guest phases are exact
  10 ms ticks, so this is the error of the whole guest -> file -> stamp path);
- bulk call: ``getAllDomainStats(VCPU | STATE, NOWAIT)`` wall time with the
  guests of this run alive.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import libvirt

from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.record import DEFAULT_CACHE
from lab.truth import SerialTruth

BUSY_S = HALTED_S = 0.5


def _summary(name: str, values_s: Sequence[float]) -> str:
    ms = sorted(v * 1000 for v in values_s)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (
        f"{name}: n={len(ms)} median {statistics.median(ms):.3f} ms, "
        f"p95 {p95:.3f} ms, max {ms[-1]:.3f} ms"
    )


def watcher_latency(n: int = 200) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "serial.log"
        out: list[float] = []
        with SerialTruth(path) as truth, path.open("ab", buffering=0) as f:
            for i in range(n):
                t0 = time.monotonic()
                f.write(b"BH"[i % 2 : i % 2 + 1])
                out.append(truth.wait_for(i + 1, 5.0)[-1].t_mono - t0)
                time.sleep(0.005)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.measure")
    parser.add_argument("--rounds", type=int, default=3, help="guests booted per virt type")
    parser.add_argument("--phases", type=int, default=12, help="markers watched per guest")
    args = parser.parse_args(argv)

    print(_summary("watcher latency (write -> stamp)", watcher_latency()))
    image = build_toggler_image(busy_s=BUSY_S, halted_s=HALTED_S, cache_dir=DEFAULT_CACHE)
    with Libvirtd() as daemon:
        if daemon.startup_s is not None:
            print(f"libvirtd start -> answers: {daemon.startup_s:.2f} s")
        print(f"KVM: {daemon.kvm.reason}")
        types: list[VirtType] = ["qemu", "kvm"] if daemon.kvm.usable else ["qemu"]
        conn = libvirt.open(daemon.uri)
        try:
            with GuestPool(conn) as pool:
                for virt_type in types:
                    boots: list[float] = []
                    errors: list[float] = []
                    for _ in range(args.rounds):
                        t0 = time.monotonic()
                        guest = pool.start(GuestSpec(image=image, virt_type=virt_type, vcpus=2))
                        created = time.monotonic()
                        markers = guest.truth.wait_for(args.phases, 120.0)
                        boots.append(markers[0].t_mono - created)
                        print(f"{virt_type}: createXML took {created - t0:.3f} s")
                        errors += [
                            abs(b.t_mono - a.t_mono - BUSY_S)
                            for a, b in itertools.pairwise(markers)
                        ]
                        print(f"{virt_type}: {guest.truth.stats()}")
                        pool.destroy(guest)  # one guest at a time: no self-inflicted load
                    print(_summary(f"{virt_type}: boot (created -> first marker)", boots))
                    print(_summary(f"{virt_type}: |phase length error|", errors))
                for vcpus in (1, 2):  # the lab.record scenario
                    pool.start(GuestSpec(image=image, virt_type="qemu", vcpus=vcpus))
                flags = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE
                nowait = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
                calls: list[float] = []
                for _ in range(100):
                    t0 = time.monotonic()
                    conn.getAllDomainStats(flags, nowait)
                    calls.append(time.monotonic() - t0)
                    time.sleep(0.02)
                print(_summary(f"bulk call, {len(pool.guests)} guests", calls))
        finally:
            conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
