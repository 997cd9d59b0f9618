"""How fast and how exactly the agent sees each vCPU change, judged by the guest.

    python bench/latency.py --virt tcg|kvm [--interval 0.25] [--libvirt-interval 1] --duration 120

Runs one toggler guest (vCPU 0 alternates busy/halted and writes a marker to COM1
at each phase start; vCPU 1 stays parked) under a real libvirtd, the real
``vcpu-agent run`` and a real mosquitto, and prints for each phase change the
delay from the guest's marker to the transition's arrival at an MQTT subscriber,
and the error of the payload's ``changed_at`` estimate against the marker; then
p50/p90/p99/max, missed and false transitions, and the agent's CPU use (utime +
stime from /proc/<pid>/stat over the measured window). ``--json FILE`` also
writes the summary as JSON. Phases default to max(1.5 s, 4 x interval) + 0.37 x interval, so every
change lies clear of the next by several samples and the sample grid drifts
across the markers instead of locking onto one offset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import libvirt

# Runnable as `python bench/latency.py` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import SamplingSection
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed, Verdict, judge, revive
from lab.truth import Marker

BOOT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Summary:
    virt: str
    interval_s: float
    libvirt_interval_s: float
    phase_s: float
    duration_s: float
    changes: int
    matched: int
    missed: int
    false: int
    false_parked: int  # transitions on the parked vCPU 1 (should be none)
    latency_ms: dict[str, float]
    estimate_error_ms: dict[str, float]
    agent_cpu_pct: float
    loadavg_start: float
    loadavg_end: float
    domains_on_host: int
    libvirt_reconnects: int  # the agent lost libvirtd during the run: numbers suspect


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 50), 1),
        "p90": round(percentile(ms, 90), 1),
        "p99": round(percentile(ms, 99), 1),
        "max": round(max(ms), 1),
        "min": round(min(ms), 1),
    }


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    version = subprocess.run(
        ["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, check=False
    ).stdout
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "virsh version": " / ".join(v.strip() for v in version.splitlines() if v.strip()),
    }


def print_changes(verdict: Verdict, t0: float) -> None:
    print(f"{'marker s':>9} {'to':8} {'latency ms':>10} {'changed_at err ms':>17} {'src':8}")
    rows: list[tuple[float, str]] = []
    for m in verdict.matched:
        t = m.seen.transition
        rows.append(
            (
                m.change.t_wall,
                f"{m.change.t_wall - t0:9.3f} {t.to_state:8} {m.latency * 1000:10.1f} "
                f"{m.estimate_error * 1000:17.1f} {t.source:8}",
            )
        )
    rows += [(c.t_wall, f"{c.t_wall - t0:9.3f} {c.phase:8} {'MISSED':>10}") for c in verdict.missed]
    rows += [
        (
            s.at,
            f"{s.at - t0:9.3f} {s.transition.to_state:8} {'FALSE':>10} "
            f"({s.transition.from_state}->{s.transition.to_state} ratio {s.transition.ratio})",
        )
        for s in verdict.false
    ]
    for _, row in sorted(rows):
        print(row)


def run(args: argparse.Namespace) -> tuple[dict[str, str], Summary]:
    # Phases at a whole multiple of the interval would lock the sample grid to the
    # markers and measure one offset over and over; +0.37 interval walks it around.
    # KVM vCPUs stay with libvirt: they are looked at every libvirt_interval.
    every = args.interval if args.virt == "tcg" else max(args.interval, args.libvirt_interval)
    phase = args.phase or round(max(1.5, 4 * every) + 0.37 * every, 2)
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-bench-"))
    with Libvirtd() as daemon, Mosquitto(workdir=workdir) as broker:
        if args.virt == "kvm" and not daemon.kvm.usable:
            raise SystemExit(f"KVM unusable: {daemon.kvm.reason}")
        conn = libvirt.open(daemon.uri)
        prefix, host_id = f"bench-{os.getpid()}", "bench"
        feed = Feed(port=broker.port, prefix=prefix)
        agent = AgentProcess.lab(
            workdir=workdir / "agent",
            broker_port=broker.port,
            prefix=prefix,
            host_id=host_id,
            interval=args.interval,
            sampling={"libvirt_interval": args.libvirt_interval},
        )
        try:
            pool = GuestPool(conn, prefix="vcpuagent-bench")
            try:
                agent.start()
                feed.wait_online(host_id)
                image = build_toggler_image(busy_s=phase, halted_s=phase, cache_dir=workdir)
                virt_type: VirtType = "kvm" if args.virt == "kvm" else "qemu"
                guest = pool.start(GuestSpec(image=image, virt_type=virt_type, vcpus=2))
                guest.truth.wait_for(1, BOOT_TIMEOUT_S)
                load0 = os.getloadavg()[0]
                cpu0, t0 = agent.cpu_seconds(), time.monotonic()
                time.sleep(args.duration)
                cpu1, t1 = agent.cpu_seconds(), time.monotonic()
                load1 = os.getloadavg()[0]
                time.sleep(0.5)  # transitions sampled before the end are still in flight
                markers: list[Marker] = guest.truth.markers()
                end_wall = markers[-1].t_wall  # judge closed phases only
                verdict = judge(markers, feed.transitions(guest.name, 0), end_wall=end_wall)
                parked = [s for s in feed.transitions(guest.name, 1) if s.at >= markers[0].t_wall]
                domains = {a.where.domain for a in feed.snapshot() if a.where and a.where.domain}
            finally:
                conn = revive(pool, conn)
                pool.close()
        finally:
            rc = agent.stop()
            feed.close()
            conn.close()
        host = machine()  # while libvirtd still answers
        if rc != 0:
            raise SystemExit(f"vcpu-agent exited with {rc}:\n{agent.log_tail()}")

    if args.verbose:
        print_changes(verdict, markers[0].t_wall)
    return host, Summary(
        virt=args.virt,
        interval_s=args.interval,
        libvirt_interval_s=args.libvirt_interval,
        phase_s=phase,
        duration_s=round(t1 - t0, 1),
        changes=verdict.changes,
        matched=len(verdict.matched),
        missed=len(verdict.missed),
        false=len(verdict.false),
        false_parked=len(parked),
        latency_ms=spread([m.latency for m in verdict.matched]),
        estimate_error_ms=spread([m.estimate_error for m in verdict.matched]),
        agent_cpu_pct=round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
        loadavg_start=load0,
        loadavg_end=load1,
        domains_on_host=len(domains),
        libvirt_reconnects=agent.log_path.read_text().count("libvirt.disconnected"),
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # Also for SIGTERM, and for SIGINT when a non-interactive shell started us in
    # the background with SIGINT ignored: unwind, so the guest and daemons are
    # cleaned up by the finally blocks.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--virt", choices=("tcg", "kvm"), default="tcg")
    shipped = SamplingSection()
    parser.add_argument(
        "--interval", type=float, default=shipped.interval, help="sampling.interval, s"
    )
    parser.add_argument(
        "--libvirt-interval",
        type=float,
        default=shipped.libvirt_interval,
        help="sampling.libvirt_interval, s (KVM guests are sampled at this pace)",
    )
    parser.add_argument("--duration", type=float, default=120.0, help="measured window, s")
    parser.add_argument("--phase", type=float, default=None, help="busy = halted phase, s")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false")
    args = parser.parse_args()
    host, summary = run(args)
    for key, value in host.items():
        print(f"{key}: {value}")
    for key, value in asdict(summary).items():
        print(f"{key}: {value}")
    if args.json is not None:
        body = {"machine": host, "summary": asdict(summary)}
        args.json.write_text(json.dumps(body, indent=1) + "\n")
    return 0 if summary.missed == 0 and summary.false == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
