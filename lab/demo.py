"""Watch the agent get it right, live: ``python -m lab.demo``.

Starts a local mosquitto, libvirtd if none answers, two toggler guests out of
phase (vCPU 0 busy/halted, writing a marker to COM1 at each phase start), and the
real ``vcpu-agent run``; then prints every transition the agent publishes for
those guests as it arrives, with its latency to the guest's own marker. Ctrl-C
(SIGINT) or SIGTERM stops the agent, destroys the guests and stops every daemon
the demo started, by PID; the exit status is 0 when all of that went cleanly.

The pieces it is made of (the agent subprocess, the decoding subscriber, the
referee) live in ``lab/rig.py``, shared with the tests and the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType

import libvirt

from agent.payloads import Transition, parse_rfc3339
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Arrival, Feed
from lab.truth import Marker, Phase

# --- the demo --------------------------------------------------------------------


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


class Demo:
    """Everything the demo starts, in the order it starts it; ``close`` undoes it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.workdir = Path(tempfile.mkdtemp(prefix="vcpu-agent-demo-"))
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._truths: dict[str, Callable[[], list[Marker]]] = {}
        self.printed = 0
        self.agent: AgentProcess | None = None

    def say(self, text: str) -> None:
        with self._lock:
            print(f"demo: {text}", flush=True)

    def run(self) -> int:
        args = self.args
        broker = Mosquitto(workdir=self.workdir / "mosquitto")
        broker.workdir.mkdir()
        broker.start()
        self._stack.callback(broker.stop)
        pid = broker.proc.pid if broker.proc else 0
        self.say(f"started mosquitto pid {pid} on 127.0.0.1:{broker.port}")

        daemon = Libvirtd()
        daemon.start()
        self._stack.callback(daemon.stop)
        if daemon.startup_s is not None:
            self.say(f"started libvirtd pid {daemon.libvirtd_pid} (took {daemon.startup_s:.1f} s)")
        else:
            self.say(f"using the libvirtd already answering on {daemon.uri}")
        virt = args.virt
        if virt == "auto":
            virt = "kvm" if daemon.kvm.usable else "tcg"
        elif virt == "kvm" and not daemon.kvm.usable:
            raise SystemExit(f"demo: KVM unusable: {daemon.kvm.reason}")
        self.say(f"virt mode {virt.upper()} ({daemon.kvm.reason})")

        conn = libvirt.open(daemon.uri)
        self._stack.callback(conn.close)
        self._start_agent(broker.port)
        self._start_guests(conn, kvm=virt == "kvm")
        self.say("transitions as they arrive (Ctrl-C to stop):")
        self.say(
            f"{'time':12}  {'domain':24} vCPU  {'from':>8} -> {'to':8} {'source':8} "
            "latency  (changed_at error)"
        )
        while not self.stop.wait(0.2):
            if self.agent is not None and not self.agent.running():
                self.say(f"vcpu-agent exited early:\n{self.agent.log_tail()}")
                return 1
        self.say("stopping: agent, guests, then daemons we started")
        return 0

    def _start_agent(self, port: int) -> None:
        prefix = f"demo-{os.getpid()}"
        host_id = "demo"
        feed = Feed(port=port, prefix=prefix, on_arrival=self._show)
        self._stack.callback(feed.close)
        self.agent = AgentProcess.lab(
            workdir=self.workdir / "agent",
            broker_port=port,
            prefix=prefix,
            host_id=host_id,
            interval=self.args.interval,
        )
        self.agent.start()
        self._stack.callback(self._stop_agent)
        self.say(
            f"started vcpu-agent pid {self.agent.pid}, interval {self.args.interval} s, "
            f"log {self.agent.log_path}"
        )
        feed.wait_online(host_id)

    def _start_guests(self, conn: libvirt.virConnect, *, kvm: bool) -> None:
        pool = GuestPool(conn, prefix="vcpuagent-demo")
        self._stack.callback(pool.close)
        phase = self.args.phase
        image = build_toggler_image(busy_s=phase, halted_s=phase, cache_dir=self.workdir / "img")
        for n in range(2):
            if self.stop.is_set():
                return
            guest = pool.start(GuestSpec(image=image, virt_type="kvm" if kvm else "qemu", vcpus=2))
            self._truths[guest.name] = guest.truth.markers
            self.say(
                f"started guest {guest.name} ({'KVM' if kvm else 'TCG'}, 2 vCPUs: vCPU 0 "
                f"toggles {phase} s busy / {phase} s halted, vCPU 1 parked)"
            )
            if n == 0:
                # Start the second guest once the first is halted: out of phase.
                self._wait_marker(guest.truth.markers, "halted")

    def _wait_marker(self, markers: Callable[[], list[Marker]], phase: Phase) -> None:
        deadline = time.monotonic() + 120.0
        while not self.stop.wait(0.05):
            if any(m.phase == phase for m in markers()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("guest wrote no marker within 120 s")

    def _show(self, arrival: Arrival) -> None:
        body = arrival.body
        if not isinstance(body, Transition):
            return
        truth = self._truths.get(body.domain)
        if truth is None and not self.args.all:
            return
        latency = error = ""
        if truth is not None and body.to_state in ("running", "halted"):
            phase: Phase = "halted" if body.to_state == "halted" else "busy"
            starts = [m for m in truth() if m.phase == phase and m.t_wall <= arrival.wall]
            if starts:
                latency = f"{(arrival.wall - starts[-1].t_wall) * 1000:+5.0f} ms"
                err = parse_rfc3339(body.changed_at) - starts[-1].t_wall
                error = f"({err * 1000:+.0f} ms)"
        self.printed += 1
        self.say(
            f"{_clock(arrival.wall):12}  {body.domain:24} {body.vcpu:4}  "
            f"{body.from_state:>8} -> {body.to_state:8} {body.source:8} {latency:8} {error}"
        )

    def _stop_agent(self) -> None:
        if self.agent is not None:
            rc = self.agent.stop()
            self.say(f"vcpu-agent pid {self.agent.pid} exited with {rc}")
            if rc != 0:
                raise RuntimeError(f"vcpu-agent exited with {rc}:\n{self.agent.log_tail()}")

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.say("all cleaned up")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lab.demo",
        description="Two toggler guests, the real agent, live transitions. Ctrl-C stops "
        "and cleans up everything the demo started.",
    )
    parser.add_argument("--virt", choices=("auto", "tcg", "kvm"), default="auto")
    parser.add_argument("--interval", type=float, default=0.25, help="agent sample interval, s")
    parser.add_argument("--phase", type=float, default=1.5, help="busy and halted phase, s")
    parser.add_argument(
        "--all", action="store_true", help="also show transitions of other domains on the host"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    demo = Demo(args)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        demo.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    status = 1
    try:
        status = demo.run()
    finally:
        try:
            demo.close()
        except Exception as err:  # report, then fail the exit status
            print(f"demo: cleanup failed: {err}", file=sys.stderr, flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
