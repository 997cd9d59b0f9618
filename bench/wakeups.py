"""Where the agent's CPU goes beyond the libvirt call: wake-ups per thread, syscalls.

    python bench/wakeups.py --virt tcg --guests 8 [--window 20] [--interval 1.0]
                            [--strace] [--py-spy FILE.txt] [--set KEY=VALUE ...]

Starts ``--guests`` quiet lab guests (as bench/peers.py), a lab mosquitto and
``vcpu-agent run`` (shipped defaults plus ``--set`` keys of ``[sampling]``),
and over ``--window`` seconds prints, per thread of the agent: its name, CPU
(schedstat, ns precision), and how often it went to sleep voluntarily
(``voluntary_ctxt_switches`` in /proc/<pid>/task/<tid>/status: each is one
wake-up). With ``--strace`` it then attaches ``strace -f -c`` for another window
and prints the syscall counts; with ``--py-spy`` it records the agent with
py-spy (``--idle`` excluded) and writes the collapsed stacks to FILE.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import SamplingSection
from bench import procs
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import agent_command


def threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, run ns, voluntary switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            name = Path(f"{base}/comm").read_text().strip()
            run = int(Path(f"{base}/schedstat").read_text().split()[0])
            vol = next(
                int(line.split()[1])
                for line in Path(f"{base}/status").read_text().splitlines()
                if line.startswith("voluntary_ctxt_switches")
            )
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = (name, run, vol)
    return out


def main() -> int:  # noqa: PLR0915 - one straight script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--virt", choices=("tcg", "kvm"), default="tcg")
    parser.add_argument("--guests", type=int, default=8)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=SamplingSection().interval)
    parser.add_argument("--set", action="append", default=[], help="[sampling] KEY=VALUE")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--py-spy", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-wakeups-"))
    workdir.chmod(0o755)
    try:
        with Libvirtd() as daemon, Mosquitto(workdir=workdir) as broker:
            virt: VirtType = "kvm" if args.virt == "kvm" and daemon.kvm.usable else "qemu"
            conn = libvirt.open(daemon.uri)
            image = build_toggler_image(busy_s=0.01, halted_s=655.0, cache_dir=workdir)
            with GuestPool(conn, prefix="vcpuagent-peers") as pool:
                guests = [
                    pool.start(GuestSpec(image=image, virt_type=virt, vcpus=2))
                    for _ in range(args.guests)
                ]
                for g in guests:
                    g.truth.wait_for(2, 180.0)
                cfg = workdir / "agent.toml"
                extra = "".join(f"{kv}\n" for kv in args.set)
                cfg.write_text(
                    '[agent]\nhost_id = "wakeups"\n\n'
                    f"[sampling]\ninterval = {args.interval}\n{extra}\n"
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                    'topic_prefix = "wakeups"\n\n'
                    f'[spool]\npath = "{workdir / "spool.sqlite3"}"\n\n[log]\nformat = "json"\n'
                )
                with (workdir / "agent.log").open("wb") as log:
                    agent = subprocess.Popen(
                        [*agent_command(), "run", "--config", str(cfg)],
                        stdout=log,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                    )
                try:
                    time.sleep(6)
                    a, t0 = threads(agent.pid), time.monotonic()
                    time.sleep(args.window)
                    b, t1 = threads(agent.pid), time.monotonic()
                    dt = t1 - t0
                    samples = dt / args.interval
                    print(
                        f"{virt}: {args.guests} guests; agent interval {args.interval} s "
                        f"{' '.join(args.set)}; window {dt:.1f} s"
                    )
                    print(f"{'thread':<20} {'CPU ms/s':>9} {'us/sample':>10} {'wake-ups/s':>11}")
                    total_run = total_vol = 0
                    for tid, (name, run, vol) in sorted(b.items()):
                        run0, vol0 = a.get(tid, (name, 0, 0))[1:]
                        total_run += run - run0
                        total_vol += vol - vol0
                        print(
                            f"{name[:20]:<20} {(run - run0) / dt / 1e6:>9.3f} "
                            f"{(run - run0) / samples / 1e3:>10.1f} {(vol - vol0) / dt:>11.2f}"
                        )
                    print(
                        f"{'total':<20} {total_run / dt / 1e6:>9.3f} "
                        f"{total_run / samples / 1e3:>10.1f} {total_vol / dt:>11.2f}"
                    )
                    print(f"RSS {procs.rss_kib(agent.pid) / 1024:.1f} MiB")
                    if args.strace:
                        out = workdir / "strace.txt"
                        st = subprocess.Popen(
                            ["strace", "-f", "-c", "-o", str(out), "-p", str(agent.pid)]
                        )
                        time.sleep(args.window)
                        st.terminate()
                        st.wait()
                        print(out.read_text())
                    if args.py_spy is not None:
                        subprocess.run(
                            [
                                str(Path(sys.executable).with_name("py-spy")),
                                "record",
                                "--pid",
                                str(agent.pid),
                                "--duration",
                                str(int(args.window)),
                                "--rate",
                                "1000",
                                "--threads",
                                "--format",
                                "raw",
                                "--output",
                                str(args.py_spy),
                            ],
                            check=False,
                            capture_output=True,
                        )
                        print(f"py-spy collapsed stacks: {args.py_spy}")
                finally:
                    agent.terminate()
                    agent.wait(15)
            conn.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
