"""The schedstat source against the libvirt source, judged by the truth guests.

    python bench/accuracy.py [--duration 60] [--interval 0.2] [--before DIR]

For each virt type (TCG; KVM when /dev/kvm is usable) and each source, runs two
toggler guests (vCPU 0 busy/halted 1.25 s / 1.25 s and 1.0 s / 1.75 s, marker
on COM1 at each phase start; vCPU 1 parked) under the real agent and judges
every transition against the markers (``lab.rig.judge``): missed and false
transitions, latency marker -> MQTT arrival, ``changed_at`` error, agent CPU.

- ``schedstat``: this checkout's agent (counters from /proc, libvirt every 5 s);
- ``libvirt``: the agent of ``--before`` (an ``agent`` package from before the
  schedstat source: ``git archive 310ac7f agent | tar -x -C DIR``), which takes
  every counter from libvirt's bulk call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.latency import spread
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed, judge, revive

PHASES_S = ((1.25, 1.25), (1.0, 1.75))


def one(
    daemon: Libvirtd, broker: Mosquitto, virt: VirtType, source: str, args: argparse.Namespace
) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-accuracy-"))
    workdir.chmod(0o755)
    prefix = f"acc-{os.getpid()}-{virt}-{source}"
    feed = Feed(port=broker.port, prefix=prefix)
    agent = AgentProcess.lab(
        workdir=workdir / "agent",
        broker_port=broker.port,
        prefix=prefix,
        host_id="acc",
        interval=args.interval,
    )
    if source == "libvirt":  # the older package (the editable install wins over PYTHONPATH)
        code = (
            f"import sys; sys.path.insert(0, {args.before!r}); "
            "from agent.cli import main; sys.exit(main())"
        )
        agent.argv = [sys.executable, "-c", code, "run", "--config"]
    conn = libvirt.open(daemon.uri)
    pool = GuestPool(conn, prefix="vcpuagent-acc")
    try:
        agent.start()
        feed.wait_online("acc")
        guests = []
        for busy, halted in PHASES_S:
            image = build_toggler_image(busy_s=busy, halted_s=halted, cache_dir=workdir)
            guests.append(pool.start(GuestSpec(image=image, virt_type=virt, vcpus=2)))
        for g in guests:
            g.truth.wait_for(2, 120.0)
        cpu0, t0 = procs.thread_ns(agent.pid), time.monotonic()
        time.sleep(args.duration)
        cpu1, t1 = procs.thread_ns(agent.pid), time.monotonic()
        time.sleep(0.6)
        matched, missed, false, parked, changes = [], 0, 0, 0, 0
        for g in guests:
            markers = g.truth.markers()
            v = judge(markers, feed.transitions(g.name, 0), end_wall=markers[-1].t_wall)
            changes += v.changes
            matched += v.matched
            missed += len(v.missed)
            false += len(v.false)
            parked += len([s for s in feed.transitions(g.name, 1) if s.at >= markers[0].t_wall])
        served = agent.log_path.read_text().count('"schedstat.serving"')
    finally:
        conn = revive(pool, conn)
        pool.close()
        agent.stop()
        feed.close()
        conn.close()
    lat = spread([m.latency for m in matched])
    err = spread([m.estimate_error for m in matched])
    sources = sorted({m.seen.transition.source for m in matched})
    return (
        f"| {virt.replace('qemu', 'TCG').replace('kvm', 'KVM')} | {source} | {args.interval} "
        f"| {changes} | {missed} | {false} ({parked}) | {lat.get('p50')} / {lat.get('p90')} / "
        f"{lat.get('p99')} / {lat.get('max')} | {err.get('p50')} / {err.get('p90')} / "
        f"{err.get('min')}..{err.get('max')} | {(cpu1 - cpu0) / (t1 - t0) / 1e7:.2f} "
        f"| {','.join(sources)} | {served} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--before", default="/tmp/agent-before")
    parser.add_argument("--virt", default="tcg,kvm")
    parser.add_argument("--sources", default="libvirt,schedstat")
    args = parser.parse_args()
    rows = []
    with Libvirtd() as daemon, Mosquitto() as broker:
        for name in args.virt.split(","):
            if name == "kvm" and not daemon.kvm.usable:
                print(f"KVM skipped: {daemon.kvm.reason}")
                continue
            virt: VirtType = "kvm" if name == "kvm" else "qemu"
            for source in args.sources.split(","):
                row = one(daemon, broker, virt, source, args)
                print(row, flush=True)
                rows.append(row)
    print(
        "\n| virt | source | interval s | changes | missed | false (parked) "
        "| latency ms p50 / p90 / p99 / max | changed_at err ms p50 / p90 / range "
        "| agent CPU % | sources | domains from /proc |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|---|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
