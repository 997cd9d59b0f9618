"""The one test rig: the config writer, the agent as a process, the subscriber,
and the referee that lines transitions up with a guest's markers.

Used by every suite (``tests/``), the demo (``lab/demo.py``) and the benchmarks:

- ``config_document`` / ``write_config``: an agent config for a loopback broker;
- ``AgentProcess``: the real ``vcpu-agent run`` (or a harness around the same
  entry point), by PID, with its JSON log lines;
- ``Feed``: a paho subscriber that records and decodes every message, plain or
  with a persistent session, and waits on arrivals, never on a fixed sleep;
- ``retained``: what a new subscriber gets as retained messages;
- ``judge``: transitions against the markers (matched, missed, false).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGTERM

import libvirt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.payloads import Payload, PayloadError, Status, Transition, decode, parse_rfc3339
from agent.topics import ParsedTopic, TopicError, encode_level, parse_topic
from lab.domains import GuestPool
from lab.truth import Marker, Phase

ROOT = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
STATE_OF_PHASE: dict[Phase, str] = {"busy": "running", "halted": "halted"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the one config writer ----------------------------------------------------------


def config_document(
    *,
    port: int,
    prefix: str,
    host_id: str,
    uri: str = URI,
    interval: float = 0.25,
    spool_path: Path | str = "",
    fast: bool = True,
    **sections: Mapping[str, object],
) -> dict[str, dict[str, object]]:
    """An agent config as TOML's dict: loopback broker, JSON logs, a spool of its
    own (the default path is shared by every agent on the host); ``fast``: short
    reconnect backoffs for fault tests. ``sections`` override key by key."""
    doc: dict[str, dict[str, object]] = {
        "agent": {"host_id": host_id},
        "libvirt": {"uri": uri},
        "sampling": {"interval": interval, "libvirt_interval": interval},
        "mqtt": {"host": "127.0.0.1", "port": port, "topic_prefix": prefix},
        "spool": {"path": str(spool_path)},
        "log": {"format": "json", "level": "info"},
    }
    if fast:
        doc["libvirt"] |= {"reconnect_min": 0.1, "reconnect_max": 0.5}
        doc["mqtt"] |= {
            "keepalive": 5,
            "reconnect_min": 0.05,
            "reconnect_max": 0.3,
            "client_id": f"agent-{uuid.uuid4().hex[:8]}",
        }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    mqtt = sections.get("mqtt", {})
    if mqtt.get("servers"):
        # ``servers`` replaces host/port: the loopback ones above would name a second
        # broker, which agent/config.py refuses. A host or port given here stays.
        for key in ("host", "port"):
            if key not in mqtt:
                del doc["mqtt"][key]
    return doc


def write_config(path: Path, doc: Mapping[str, Mapping[str, object]]) -> Path:
    """Write a config document (``config_document(...)``) as a TOML file."""
    lines = []
    for name, values in doc.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (for state with no event to wait on: files, processes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- the one agent-process runner --------------------------------------------------


def agent_command() -> list[str]:
    """The installed ``vcpu-agent`` console script next to this interpreter."""
    script = Path(sys.executable).with_name("vcpu-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent"]


class AgentProcess:
    """A real agent process, by PID: ``vcpu-agent run --config FILE`` by default,
    or any ``argv`` (a harness module around the same entry point).

    It runs in its own session, so a terminal's Ctrl-C reaches only the demo,
    which then stops it with SIGTERM (its clean-stop signal). Output (JSON log
    lines) goes to ``log_path``.
    """

    def __init__(
        self,
        config: Path | None = None,
        *,
        log_path: Path | None = None,
        argv: Sequence[str] | None = None,
        host_id: str = "",
    ) -> None:
        if config is None and (argv is None or log_path is None):
            raise ValueError("an AgentProcess needs a config, or an argv and a log path")
        self.config_path = config
        self.log_path = log_path or Path(f"{config}.log")
        self.argv = list(argv) if argv is not None else [*agent_command(), "run", "--config"]
        self.host_id = host_id
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def lab(
        cls,
        *,
        workdir: Path,
        broker_port: int,
        prefix: str,
        host_id: str,
        interval: float,
        uri: str = URI,
        log_level: str = "info",
        libvirt_keys: Mapping[str, float] | None = None,
        mqtt: Mapping[str, object] | None = None,
        sampling: Mapping[str, object] | None = None,
    ) -> AgentProcess:
        """The agent of a real-guest run: production timings but for ``interval``.

        ``mqtt`` overrides the ``[mqtt]`` section key by key, e.g. a cluster's
        ``servers`` (which then replace host/port) and ``protocol = "3.1.1"``;
        ``sampling`` likewise, e.g. the shipped ``libvirt_interval`` instead of
        ``interval``.
        """
        doc = config_document(
            port=broker_port,
            prefix=prefix,
            host_id=host_id,
            uri=uri,
            interval=interval,
            spool_path=workdir / "spool.sqlite3",
            fast=False,
            libvirt=dict(libvirt_keys or {}),
            log={"level": log_level},
            mqtt=dict(mqtt or {}),
            sampling=dict(sampling or {}),
        )
        config = write_config(workdir / "agent.toml", doc)
        return cls(config, log_path=workdir / "agent.log", host_id=host_id)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("agent not started")
        return self.proc.pid

    def start(self) -> AgentProcess:
        argv = self.argv
        if argv[-1] == "--config":
            argv = [*argv, str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the agent so far, from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def signal(self, sig: int) -> None:
        if self.running():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        if self.proc is None:
            raise RuntimeError("agent not started")
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0, sig: int = SIGTERM) -> int:
        """``sig`` (SIGTERM) by PID and wait; SIGKILL after ``timeout``. Exit status."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("agent not started")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_events(self) -> list[dict[str, object]]:
        """The agent's JSON log lines so far, parsed (other lines skipped)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        out.append(event)
        return out

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.log_events() if e.get("event") == name]

    def wait_log(self, event: str, timeout: float = 15.0, count: int = 1) -> dict[str, object]:
        """The ``count``-th log line with this event name, waiting up to ``timeout``.

        Fails at once, with the log, if the agent exits first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event)
            if len(found) >= count:
                return found[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.proc.returncode} before {event}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} in the agent log:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.raw().splitlines()[-lines:])
        except OSError:
            return "(no agent log)"

    def raw(self) -> str:
        return self.log_path.read_text(errors="replace")


# --- the one subscriber ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message as it reached our subscriber, decoded when it is ours.

    ``body`` is None for a clear (empty payload) or for anything that is not a
    vcpu-agent topic and body (then ``error`` says why).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    where: ParsedTopic | None
    body: Payload | None
    wall: float  # time.time() on arrival: comparable with Marker.t_wall
    mono: float
    error: str | None = None


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
    """A real paho subscriber (its own thread) recording and decoding what arrives.

    Plain (MQTT 5, a clean session, Retain As Published so the retain flag reads
    as the publisher set it) or ``persistent`` (MQTT 3.1.1, clean_session off,
    QoS 1, a stable client id, reconnecting by itself: a broker with persistence
    queues what it misses while away, across a broker restart). Anything under
    ``prefix`` that is not a vcpu-agent topic or body is kept in ``errors``.
    """

    def __init__(
        self,
        *,
        port: int,
        prefix: str,
        topic: str | None = None,
        persistent: bool = False,
        client_id: str | None = None,
        auth: tuple[str, str] | None = None,
        on_arrival: Callable[[Arrival], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self.topic = topic or f"{prefix}/#"
        self.arrivals: list[Arrival] = []
        self.errors: list[str] = []
        self.connects = 0
        self._on_arrival = on_arrival
        self._persistent = persistent
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"feed-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311 if persistent else MQTTProtocolVersion.MQTTv5,
            clean_session=False if persistent else None,
        )
        self.client.reconnect_delay_set(1, 1)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("MQTT subscribe not acknowledged within 10 s")

    def _on_connect(self, c: paho.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        if self._persistent:
            c.subscribe(self.topic, qos=1)
        else:
            c.subscribe(self.topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        with self._cond:
            self.connects += 1
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        wall, mono = time.time(), time.monotonic()
        payload = bytes(msg.payload)
        where: ParsedTopic | None = None
        body: Payload | None = None
        error = None
        try:
            where = parse_topic(self.prefix, msg.topic)
            body = decode(payload) if payload else None
        except (TopicError, PayloadError) as err:
            error = f"{msg.topic}: {err}"
        arrival = Arrival(
            msg.topic, payload, msg.qos, bool(msg.retain), where, body, wall, mono, error
        )
        with self._cond:
            self.arrivals.append(arrival)
            if error is not None:
                self.errors.append(error)
            self._cond.notify_all()
        if self._on_arrival is not None and error is None:
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

    def wait(self, condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        """Until ``condition()`` holds (checked on every arrival and connect)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    recent = "\n".join(
                        f"  {a.topic} {a.payload[:160]!r}" for a in self.arrivals[-20:]
                    )
                    raise AssertionError(
                        f"timed out waiting for {what or 'a condition'}; "
                        f"{len(self.arrivals)} messages, the last:\n{recent}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_all(
        self,
        predicate: Callable[[Arrival], bool],
        *,
        timeout: float = 15.0,
        count: int = 1,
        what: str = "a message",
    ) -> list[Arrival]:
        """The first ``count`` arrivals (past or future) matching ``predicate``."""
        found: list[Arrival] = []

        def enough() -> bool:
            found[:] = [a for a in self.arrivals if predicate(a)]
            return len(found) >= count

        self.wait(enough, timeout, what)
        return found[:count]

    def wait_for(
        self,
        predicate: Callable[[Arrival], bool],
        *,
        timeout: float = 15.0,
        count: int = 1,
        what: str = "a message",
    ) -> Arrival:
        """The ``count``-th arrival (past or future) matching ``predicate``."""
        return self.wait_all(predicate, timeout=timeout, count=count, what=what)[-1]

    def wait_online(self, host_id: str, timeout: float = 30.0) -> Arrival:
        def online(a: Arrival) -> bool:
            return (
                isinstance(a.body, Status)
                and a.body.status == "online"
                and (a.body.host == host_id)
            )

        return self.wait_for(online, timeout=timeout, what=f"status online from {host_id}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:  # a broker that died under us leaves it open
            sock.close()


def retained(port: int, prefix: str, topic_filter: str) -> dict[str, bytes]:
    """What a brand-new subscriber gets as retained messages on ``topic_filter``.

    No settling sleep: the broker sends retained messages right after SUBACK, on
    this connection, before anything published later; so after subscribing we
    publish a marker and wait for it. The marker's topic is outside every agent's
    tree, so no other subscriber of the prefix ever sees it.
    """
    feed = Feed(port=port, prefix=prefix, topic=topic_filter)
    try:
        marker = f"vcpu-agent-rig/marker-{uuid.uuid4().hex[:8]}"
        feed.client.subscribe(marker, qos=1)
        feed.wait(lambda: feed.connects > 0, 5, "connect")
        feed.client.publish(marker, b"marker", qos=1)
        feed.wait_for(lambda a: a.topic == marker, timeout=10, what="the marker")
        return {a.topic: a.payload for a in feed.snapshot() if a.retain and a.topic != marker}
    finally:
        feed.close()


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
