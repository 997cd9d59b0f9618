"""What the fault tests share with ``bench/faults.py``: a persistent subscriber,
agent config files, agent processes, and the produced-vs-delivered comparison.

``Delivery`` compares what an agent produced (its seq counters: per vCPU for
transitions, per domain for lifecycle events, each 1..N) with what a subscriber
received: missing seqs, out-of-order first arrivals, duplicates.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.delivery import SeqKey
from agent.payloads import Lifecycle, Payload, Transition, decode

ROOT = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "agent"]
# The domain every test:///default instance starts with (libvirt's test driver).
TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


@dataclass(frozen=True)
class Got:
    topic: str
    payload: bytes
    at: float  # time.time() when received

    def body(self) -> Payload:
        return decode(self.payload)


class PersistentSubscriber:
    """A real paho subscriber with a persistent session (MQTT 3.1.1, clean_session
    off, QoS 1): a broker with persistence queues what it misses while away, and it
    reconnects by itself after a broker restart."""

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        client_id: str | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.messages: list[Got] = []
        self.cond = threading.Condition()
        self.connects = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(1, 1)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.topic = topic
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        self.wait(lambda: self.connects > 0, 5)

    def _on_connect(self, c: paho.Client, _u: object, _f: object, _rc: object, _p: object) -> None:
        c.subscribe(self.topic, qos=1)
        with self.cond:
            self.connects += 1
            self.cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(Got(msg.topic, bytes(msg.payload), time.time()))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out; {len(self.messages)} messages: "
                        + "\n".join(f"{m.topic} {m.payload[:120]!r}" for m in self.messages[-20:])
                    )
                self.cond.wait(min(left, 0.2))

    def snapshot(self) -> list[Got]:
        with self.cond:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:  # a broker that died under us leaves it open
            sock.close()


def agent_config(
    path: Path,
    *,
    port: int,
    prefix: str,
    uri: str = "test:///default",
    spool: Path | str = "",
    max_events: int = 100000,
    mqtt: dict[str, object] | None = None,
) -> Path:
    """A config file with short timings for tests."""
    m: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "keepalive": 5,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "client_id": f"agent-{uuid.uuid4().hex[:8]}",
    }
    m.update(mqtt or {})
    lines = [
        "[agent]",
        'host_id = "rel-host"',
        "[libvirt]",
        f"uri = {json.dumps(uri)}",
        "reconnect_min = 0.1",
        "reconnect_max = 0.5",
        "[sampling]",
        "interval = 0.2",
        "event_followup = 0.05",
        "[mqtt]",
        *(f"{k} = {json.dumps(v)}" for k, v in m.items()),
        "[spool]",
        f"path = {json.dumps(str(spool))}",
        f"max_events = {max_events}",
        "[log]",
        'format = "json"',
        'level = "info"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class AgentProcess:
    """A real agent process (the CLI, or the driver harness), by PID."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<raw>", "line": line})
        return out

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.logs() if e.get("event") == name]

    def wait_log(self, name: str, timeout: float = 15.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.raw()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} in agent log: {self.raw()[-3000:]}")
            time.sleep(0.05)

    def raw(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@dataclass(frozen=True)
class Delivery:
    produced: int
    delivered: int  # distinct events received
    duplicates: int  # extra copies received (same key and seq again)
    missing: dict[SeqKey, list[int]]
    out_of_order: dict[SeqKey, list[int]]

    def record(self, fault: str, note: str = "") -> None:
        record_figure(fault, self.produced, self.delivered, self.duplicates, note)


def received_events(messages: Iterable[Got]) -> dict[SeqKey, list[int]]:
    """Seqs per key, in arrival order, of every transition and lifecycle message."""
    seen: dict[SeqKey, list[int]] = defaultdict(list)
    for m in messages:
        if not m.topic.endswith(("/transition", "/lifecycle")):
            continue
        body = decode(m.payload)
        if isinstance(body, Transition):
            seen[(body.uuid, body.vcpu)].append(body.seq)
        elif isinstance(body, Lifecycle):
            seen[(body.uuid, None)].append(body.seq)
    return seen


def compare(produced: Mapping[SeqKey, int], messages: Iterable[Got]) -> Delivery:
    seen = received_events(messages)
    missing: dict[SeqKey, list[int]] = {}
    disorder: dict[SeqKey, list[int]] = {}
    delivered = duplicates = 0
    for key, top in produced.items():
        got = seen.get(key, [])
        firsts = list(dict.fromkeys(got))  # first arrival of each seq, in order
        lost = sorted(set(range(1, top + 1)) - set(firsts))
        if lost:
            missing[key] = lost
        if firsts != sorted(firsts):
            disorder[key] = firsts
        delivered += len(firsts)
        duplicates += len(got) - len(firsts)
    return Delivery(
        produced=sum(produced.values()),
        delivered=delivered,
        duplicates=duplicates,
        missing=missing,
        out_of_order=disorder,
    )


def spool_seqs(path: Path) -> dict[SeqKey, int]:
    """The last seqs a (possibly killed) agent left in its spool's chain."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT uuid, vcpu, seq FROM chain").fetchall()
    return {(u, None if v == -1 else v): n for u, v, n in rows}


def spool_entries(path: Path) -> int:
    """Everything still queued: events and retained states."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    return count


def spool_backlog(path: Path) -> int:
    """Events (transitions, lifecycle) still queued; retained states not counted."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM entries WHERE retain = 0").fetchone()[0]
    return count


def record_figure(fault: str, produced: int, delivered: int, duplicates: int, note: str) -> None:
    """Append one row of the fault table to $VCPU_FAULT_FIGURES (bench/faults.py)."""
    target = os.environ.get("VCPU_FAULT_FIGURES")
    if target:
        row = {"fault": fault, "produced": produced, "delivered": delivered}
        row |= {"duplicates": duplicates, "note": note}
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
