"""The agent's own CPU cost per vCPU per sample: parse + classify + diff + encode.

    .venv/bin/python -m bench.core [--samples 40]

Real bulk-stats records (tests/data/records-kvm.json, a KVM guest toggling
busy/halted every 1.5 s, sampled every 0.25 s) are scaled up to N domains x M
vCPUs: every vCPU replays the recorded vCPU 0 with its own phase offset, so about
one vCPU in six changes state per sample, as in the recording. Each sample runs
what the agent runs per tick on the loop thread: ``domain_record`` for every
domain, ``advance``, and the rendering (JSON encoding) of every change. The
libvirt call itself is not included (it runs in the worker thread; ~4 ms for 4
guests, docs/platform.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from agent.classify import Thresholds
from agent.records import domain_record
from agent.render import Renderer
from agent.topics import Topics
from agent.transitions import HostState, advance

DATA = Path(__file__).parent.parent / "tests" / "data" / "records-kvm.json"


Batch = list[tuple[str, str, dict[str, Any], float]]


def scaled_samples(domains: int, vcpus: int, samples: int, *, toggling: bool) -> list[Batch]:
    """``toggling``: every vCPU replays the toggler's vCPU 0; else the parked vCPU 1
    of the two-vCPU guest (halted throughout: the steady state of an idle host)."""
    doc = json.loads(DATA.read_text())
    toggler = doc["meta"]["markers_domain"]
    source = next(d["name"] for d in doc["samples"][0]["domains"] if d["name"] != toggler)
    domain, vcpu = (toggler, 0) if toggling else (source, 1)
    series = [
        (s["t_mono"], next(d["stats"] for d in s["domains"] if d["name"] == domain))
        for s in doc["samples"]
    ]
    per_vcpu = [k.split(".", 2)[2] for k in series[0][1] if k.startswith(f"vcpu.{vcpu}.")]
    out = []
    for i in range(samples):
        t = series[i % len(series)][0] + (i // len(series)) * 100.0
        batch = []
        for d in range(domains):
            stats: dict[str, Any] = {
                "state.state": 1,
                "state.reason": 1,
                "vcpu.current": vcpus,
                "vcpu.maximum": vcpus,
            }
            for v in range(vcpus):
                src = series[(i + d + v) % len(series)][1]
                for key in per_vcpu:
                    stats[f"vcpu.{v}.{key}"] = src[f"vcpu.{vcpu}.{key}"]
            batch.append((f"guest-{d:04d}", f"00000000-0000-4000-8000-{d:012d}", stats, t))
        out.append(batch)
    return out


def run(domains: int, vcpus: int, samples: int, *, toggling: bool) -> tuple[float, int]:
    """Seconds of CPU per vCPU per sample, and events (transitions) produced."""
    batches = scaled_samples(domains, vcpus, samples, toggling=toggling)
    renderer = Renderer(Topics(prefix="vcpu", host="bench"), qos=1, epoch="bench")
    th = Thresholds()
    host = HostState()
    transitions = 0
    start = time.process_time()
    for batch in batches:
        records = [
            domain_record(name=name, uuid=uuid, stats=stats, t_mono=t, t_wall=t)
            for name, uuid, stats, t in batch
        ]
        host, changes = advance(host, records, th, complete=True)
        for change in changes:
            transitions += sum(out.transition is not None for out in renderer.change(change))
    cpu = time.process_time() - start
    return cpu / (domains * vcpus * samples), transitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    target = 10e-6
    print(
        f"{'scenario':>9} {'domains x vCPUs':>16} {'us/vCPU/sample':>15} {'ms/sample':>10} "
        f"{'events/sample':>14} {'vs 10 us target':>16}"
    )
    for toggling in (False, True):
        for domains, vcpus in ((100, 4), (1000, 8)):
            per_vcpu, events = run(domains, vcpus, args.samples, toggling=toggling)
            print(
                f"{'toggling' if toggling else 'steady':>9} {f'{domains} x {vcpus}':>16} "
                f"{per_vcpu * 1e6:>15.2f} {per_vcpu * domains * vcpus * 1e3:>10.1f} "
                f"{events / args.samples:>14.1f} {per_vcpu / target:>15.2f}x"
            )


if __name__ == "__main__":
    main()
