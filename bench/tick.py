"""What one sample costs the agent's thread, hot and as the agent really runs it.

    python bench/tick.py [--guests 8] [--rounds 40]

Starts ``--guests`` quiet TCG lab guests (as bench/peers.py), opens their vCPU
threads' schedstat files as the agent does (``agent/schedstat.py``), and times,
in this one thread (``time.thread_time``, CPU not wall):

- the /proc tick (read every vCPU's counters, ``advance`` the pure core) run
  back to back, then spaced by 0.01 / 0.05 / 0.25 / 1 s of sleep: between
  ticks other processes (here the guests' QEMU) evict the interpreter's code
  and data from the CPU caches, so a tick spaced like the agent's costs more
  than a hot loop says;
- one timed wake-up, 0.25 s apart: of an asyncio loop (``asyncio.timeout``
  over a queue: the agent's tick before agent/ticker.py), of the agent's ticker
  thread (``agent.ticker.Ticker``: poll(2) on a pipe, the schedule, the pace),
  and of a blocking ``time.sleep`` (the raw loop's);
- the raw bulk call's caller CPU and parsing its result into records.

Nothing is published; this is the floor under ``bench/peers.py``'s agent rows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import SamplingSection
from agent.model import DomainRecord
from agent.records import domain_record
from agent.schedstat import SchedstatSource
from agent.ticker import Pace, Ticker
from agent.transitions import HostState, advance
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.libvirtd import Libvirtd

FLAGS = libvirt.VIR_DOMAIN_STATS_VCPU | libvirt.VIR_DOMAIN_STATS_STATE
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


def cpu_us(fn: Callable[[], object], rounds: int, gap: float) -> float:
    """Median thread CPU of ``fn()``, each call after ``gap`` seconds of sleep."""
    spent = []
    for _ in range(rounds):
        if gap:
            time.sleep(gap)
        c0 = time.thread_time()
        fn()
        spent.append(time.thread_time() - c0)
    return statistics.median(spent) * 1e6


def ticker_wake_us(rounds: int, gap: float) -> float:
    """CPU of the ticker thread per tick, its callback doing nothing."""
    stamps: list[float] = []
    done = threading.Event()

    def on_fast() -> None:
        stamps.append(time.thread_time())
        if len(stamps) > rounds:
            done.set()

    def on_error(err: BaseException) -> None:
        raise SystemExit(f"ticker: {err!r}")

    ticker = Ticker(
        interval=gap,
        pace=lambda: Pace(fast=True, every=1e9),  # ticks only (the first is a bulk one)
        on_fast=on_fast,
        on_bulk=lambda: None,
        on_error=on_error,
    )
    ticker.start()
    done.wait()
    ticker.stop()
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)) * 1e6


def wake_us(rounds: int, gap: float) -> tuple[float, float]:
    """CPU per timed wake-up: an asyncio wait, a blocking sleep."""

    async def waits() -> float:
        queue: asyncio.Queue[object] = asyncio.Queue()
        c0 = time.thread_time()
        for _ in range(rounds):
            try:
                async with asyncio.timeout(gap):
                    await queue.get()
            except TimeoutError:
                pass
        return (time.thread_time() - c0) / rounds * 1e6

    asleep = asyncio.run(waits())
    c0 = time.thread_time()
    for _ in range(rounds):
        time.sleep(gap)
    return asleep, (time.thread_time() - c0) / rounds * 1e6


def records(conn: libvirt.virConnect, prefix: str) -> list[DomainRecord]:
    now, wall = time.monotonic(), time.time()
    return [
        domain_record(name=d.name(), uuid=d.UUIDString(), stats=s, t_mono=now, t_wall=wall)
        for d, s in conn.getAllDomainStats(FLAGS, NOWAIT)
        if d.name().startswith(prefix)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-tick-"))
    workdir.chmod(0o755)
    prefix = "vcpuagent-tick"
    with Libvirtd() as daemon:
        conn = libvirt.open(daemon.uri)
        image = build_toggler_image(busy_s=0.01, halted_s=655.0, cache_dir=workdir)
        with GuestPool(conn, prefix=prefix) as pool:
            guests = [
                pool.start(GuestSpec(image=image, virt_type="qemu", vcpus=2))
                for _ in range(args.guests)
            ]
            for g in guests:
                g.truth.wait_for(2, 180.0)
            ro = libvirt.openReadOnly(daemon.uri)
            base = records(ro, prefix)
            fast = SchedstatSource()
            if not all(fast.attach(r) for r in base):
                raise SystemExit(f"/proc refused: {fast.refused}")
            th = SamplingSection().thresholds()
            state = [advance(HostState(), base, th, complete=True)[0]]

            def tick() -> None:
                now, wall = time.monotonic(), time.time()
                fresh = [fast.read(r, now, wall) for r in base]
                state[0] = advance(
                    state[0], [r for r in fresh if r is not None], th, complete=False, whole=True
                )[0]

            vcpus = sum(len(r.vcpus) for r in base)
            print(f"TCG: {len(base)} guests, {vcpus} vCPUs on /proc; median of {args.rounds}")
            print(f"{'what':<44} {'CPU us':>8}")
            for gap in (0.0, 0.01, 0.05, 0.25, 1.0):
                label = "back to back" if not gap else f"after {gap:g} s asleep"
                print(f"{'/proc tick, ' + label:<44} {cpu_us(tick, args.rounds, gap):>8.1f}")
            asleep, blocked = wake_us(args.rounds, 0.25)
            print(f"{'asyncio timed wake-up (0.25 s)':<44} {asleep:>8.1f}")
            ticker = ticker_wake_us(args.rounds, 0.25)
            print(f"{'the ticker thread, per tick (0.25 s)':<44} {ticker:>8.1f}")
            print(f"{'blocking time.sleep wake-up (0.25 s)':<44} {blocked:>8.1f}")
            call = cpu_us(lambda: ro.getAllDomainStats(FLAGS, NOWAIT), args.rounds, 1.0)
            print(f"{'raw bulk call, caller CPU (1 s apart)':<44} {call:>8.1f}")
            parse = cpu_us(lambda: records(ro, prefix), args.rounds, 1.0)
            print(f"{'bulk call + records, caller CPU (1 s apart)':<44} {parse:>8.1f}")
            fast.close()
            ro.close()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
