"""Watch the agent get it right, live: ``python -m lab.demo``.

Starts a local mosquitto, libvirtd if none answers, two toggler guests out of
phase (vCPU 0 busy/halted, writing a marker to COM1 at each phase start), and the
real ``vcpu-agent run``; then prints every transition the agent publishes for
those guests as it arrives, with its latency to the guest's own marker. Ctrl-C
(SIGINT) or SIGTERM stops the agent, destroys the guests and stops every daemon
the demo started, by PID; the exit status is 0 when all of that went cleanly.

The pieces the demo is made of are reused by the end-to-end tests
(``tests/e2e``) and the latency benchmark (``bench/latency.py``):

- ``AgentProcess``: the real agent as a subprocess with a temp config;
- ``Feed``: a paho subscriber on ``<prefix>/#`` that decodes every message;
- ``judge``: lines transitions up against the markers (matched, missed, false).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

import libvirt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.payloads import Payload, PayloadError, Status, Transition, decode, parse_rfc3339
from agent.topics import ParsedTopic, TopicError, encode_level, parse_topic
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.truth import Marker, Phase

URI = "qemu:///system"
STATE_OF_PHASE: dict[Phase, str] = {"busy": "running", "halted": "halted"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the agent as a subprocess -----------------------------------------------------


def agent_command() -> list[str]:
    """The installed ``vcpu-agent`` console script next to this interpreter."""
    script = Path(sys.executable).with_name("vcpu-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent"]


class AgentProcess:
    """``vcpu-agent run --config FILE`` against ``uri`` and a broker on loopback.

    The agent runs in its own session, so a terminal's Ctrl-C reaches only the
    demo, which then stops the agent with SIGTERM (its clean-stop signal).
    """

    def __init__(
        self,
        *,
        workdir: Path,
        broker_port: int,
        prefix: str,
        host_id: str,
        interval: float,
        uri: str = URI,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "agent.toml"
        self.log_path = workdir / "agent.log"
        self.prefix = prefix
        self.host_id = host_id
        self.interval = interval
        self._config = (
            f'[agent]\nhost_id = "{host_id}"\n\n'
            f'[libvirt]\nuri = "{uri}"\n\n'
            f"[sampling]\ninterval = {interval}\n\n"
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ntopic_prefix = "{prefix}"\n\n'
            # A spool of its own: the default path is shared by every agent on the host.
            f'[spool]\npath = "{workdir / "spool.sqlite3"}"\n\n'
            f'[log]\nformat = "json"\nlevel = "{log_level}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("agent not started")
        return self.proc.pid

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*agent_command(), "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the agent so far, from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM by PID and wait; SIGKILL after ``timeout``. Returns the exit status."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("agent not started")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no agent log)"


# --- what a subscriber sees --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message as it reached our subscriber; ``body`` is None for a clear."""

    topic: str
    where: ParsedTopic
    body: Payload | None
    retain: bool
    wall: float  # time.time() on arrival: comparable with Marker.t_wall
    mono: float


@dataclass(frozen=True, slots=True)
class Seen:
    """One transition as it arrived, with its times parsed back to floats."""

    arrival: Arrival
    transition: Transition
    at: float  # the agent's sample time (wall clock)
    changed_at: float  # the agent's estimate of the change

    @property
    def domain(self) -> str:
        return self.transition.domain

    @property
    def vcpu(self) -> int:
        return self.transition.vcpu


class Feed:
    """A real paho subscriber (own thread) on ``<prefix>/#``, decoding as it goes.

    Anything under the prefix that is not a vcpu-agent topic or body is an error
    kept in ``errors``: tests assert it stays empty.
    """

    def __init__(
        self,
        *,
        port: int,
        prefix: str,
        topic: str | None = None,
        on_arrival: Callable[[Arrival], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.arrivals: list[Arrival] = []
        self.errors: list[str] = []
        self._on_arrival = on_arrival
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.subscribe(topic or f"{prefix}/#", qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise RuntimeError("MQTT subscribe not acknowledged within 10 s")

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        wall, mono = time.time(), time.monotonic()
        try:
            where = parse_topic(self.prefix, msg.topic)
            body = decode(bytes(msg.payload)) if msg.payload else None
        except (TopicError, PayloadError) as err:
            with self._cond:
                self.errors.append(f"{msg.topic}: {err}")
            return
        arrival = Arrival(msg.topic, where, body, bool(msg.retain), wall, mono)
        with self._cond:
            self.arrivals.append(arrival)
            self._cond.notify_all()
        if self._on_arrival is not None:
            self._on_arrival(arrival)

    def snapshot(self) -> list[Arrival]:
        with self._cond:
            return list(self.arrivals)

    def transitions(self, domain: str | None = None, vcpu: int | None = None) -> list[Seen]:
        out = []
        for a in self.snapshot():
            body = a.body
            if not isinstance(body, Transition):
                continue
            if (domain is not None and body.domain != domain) or (
                vcpu is not None and body.vcpu != vcpu
            ):
                continue
            out.append(Seen(a, body, parse_rfc3339(body.at), parse_rfc3339(body.changed_at)))
        return out

    def wait_for(
        self, predicate: Callable[[Arrival], bool], *, timeout: float, what: str = "a message"
    ) -> Arrival:
        """The first arrival (past or future) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for a in self.arrivals:
                    if predicate(a):
                        return a
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout} s")
                self._cond.wait(left)

    def wait_online(self, host_id: str, timeout: float = 30.0) -> Arrival:
        def online(a: Arrival) -> bool:
            return (
                isinstance(a.body, Status)
                and a.body.status == "online"
                and (a.body.host == host_id)
            )

        return self.wait_for(online, timeout=timeout, what=f"status online from {host_id}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(port: int, topic_filter: str, *, settle: float = 1.0) -> dict[str, bytes]:
    """What a brand-new subscriber gets as retained messages on ``topic_filter``.

    The broker sends retained messages right after SUBACK; ``settle`` is how long
    we keep listening for them.
    """
    found: dict[str, bytes] = {}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            with lock:
                found[msg.topic] = bytes(msg.payload)

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.subscribe(topic_filter, qos=1)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError("MQTT subscribe not acknowledged within 10 s")
        time.sleep(settle)
    finally:
        client.loop_stop()
        client.disconnect()
    with lock:
        return dict(found)


def revive(pool: GuestPool, conn: libvirt.virConnect, uri: str = URI) -> libvirt.virConnect:
    """A live connection for cleaning up ``pool``: a libvirtd restart kills the old one.

    Without this, destroying a guest after a restart would fail to find it and
    leave its QEMU running.
    """
    with contextlib.suppress(libvirt.libvirtError):
        if conn.isAlive():
            return conn
    fresh = libvirt.open(uri)
    pool.use_connection(fresh)
    return fresh


def vcpu_state_filter(prefix: str, host_id: str, domain: str) -> str:
    return f"{prefix}/{encode_level(host_id)}/{encode_level(domain)}/vcpu/+/state"


# --- the referee: transitions against the guest's markers ----------------------------


@dataclass(frozen=True, slots=True)
class Match:
    change: Marker  # the marker that started the new phase
    seen: Seen

    @property
    def latency(self) -> float:
        """Marker -> MQTT arrival at our subscriber, seconds."""
        return self.seen.arrival.wall - self.change.t_wall

    @property
    def estimate_error(self) -> float:
        """The payload's ``changed_at`` minus the marker time, seconds."""
        return self.seen.changed_at - self.change.t_wall


@dataclass(frozen=True, slots=True)
class Verdict:
    changes: int  # phase changes judged (markers after the first, before the end)
    matched: list[Match] = field(default_factory=list)
    missed: list[Marker] = field(default_factory=list)
    false: list[Seen] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missed and not self.false and len(self.matched) == self.changes

    def describe(self) -> str:
        lines = [f"{self.changes} changes, {len(self.matched)} matched"]
        lines += [f"  missed: {m.phase} at {m.t_wall:.3f}" for m in self.missed]
        lines += [
            f"  false: {s.transition.from_state}->{s.transition.to_state} at {s.at:.3f}"
            f" seq {s.transition.seq}"
            for s in self.false
        ]
        return "\n".join(lines)


def judge(markers: Sequence[Marker], seen: Sequence[Seen], *, end_wall: float) -> Verdict:
    """Line up one vCPU's transitions with its guest's phase changes.

    Time before the first marker is unknown (the firmware boots), so the first
    marker opens the record and every later marker before ``end_wall`` is a
    change to judge. A change owns the transitions the agent observed (``at``,
    its sample time) from that marker until the next one (or ``end_wall``).
    Exactly one of them must go from the old phase's state to the new one; any
    other is false, and a change without one is missed. Phases must last well
    over two sample intervals for the windows to be fair.
    """
    changes = [m for m in markers[1:] if m.t_wall < end_wall]
    verdict = Verdict(changes=len(changes))
    for i, change in enumerate(changes):
        before = markers[i]  # changes[i] is markers[i + 1]
        stop = changes[i + 1].t_wall if i + 1 < len(changes) else end_wall
        inside = [s for s in seen if change.t_wall <= s.at < stop]
        want = (STATE_OF_PHASE[before.phase], STATE_OF_PHASE[change.phase])
        good = [s for s in inside if (s.transition.from_state, s.transition.to_state) == want]
        if good:
            verdict.matched.append(Match(change, good[0]))
            verdict.false.extend(s for s in inside if s is not good[0])
        else:
            verdict.missed.append(change)
            verdict.false.extend(inside)
    return verdict


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
        self.agent = AgentProcess(
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
