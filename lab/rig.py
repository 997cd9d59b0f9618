"""The pieces a real-guest run is made of: the agent as a subprocess, a decoding
subscriber, and the referee that lines transitions up with the guest's markers.

Used by the demo (``lab/demo.py``), the end-to-end tests (``tests/e2e``), the
libvirt fault tests (``tests/faults``) and the latency benchmark
(``bench/latency.py``):

- ``AgentProcess``: the real ``vcpu-agent run`` with a temp config and spool;
- ``Feed``: a paho subscriber on ``<prefix>/#`` that decodes every message;
- ``judge``: transitions against the markers (matched, missed, false).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.payloads import Payload, PayloadError, Status, Transition, decode, parse_rfc3339
from agent.topics import ParsedTopic, TopicError, encode_level, parse_topic
from lab.domains import GuestPool
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
        libvirt_keys: dict[str, float] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "agent.toml"
        self.log_path = workdir / "agent.log"
        self.prefix = prefix
        self.host_id = host_id
        self.interval = interval
        self._config = (
            f'[agent]\nhost_id = "{host_id}"\n\n'
            f'[libvirt]\nuri = "{uri}"\n'
            + "".join(f"{k} = {v}\n" for k, v in (libvirt_keys or {}).items())
            + "\n"
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

    def log_events(self) -> list[dict[str, object]]:
        """The agent's JSON log lines so far, parsed (other lines skipped)."""
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_log(self, event: str, timeout: float) -> dict[str, object]:
        """The first log line with this event name, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.log_events():
                if e.get("event") == event:
                    return e
            time.sleep(0.1)
        raise TimeoutError(f"no {event} in the agent log:\n{self.log_tail()}")

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
