"""A fleet in a box: H simulated hosts on mosquitto and on a 3-node nats-server cluster.

    .venv/bin/python -m bench.fleet [--vcpus 8] [--window 6] [--ladder 100,200,400,600,800]
                                    [--real-agents 2] [--phase 1.59] [--keep]

Each simulated host is what an agent is from the broker's side, built from the
agent's own code: a ``Publisher`` (birth ``online``, last will ``offline``, one
ordered outbox, failover over ``servers``, mirror re-assert) over an
``agent.mqtt_client.Connection``, fed by a ``Renderer`` with the agent's
transitions (QoS 1) and retained vCPU states (payload schema and topics as
published, host ids with dots). Hosts run in this process on one asyncio loop;
subscribers run in ``--subscribers`` processes, one per shard: shard k's hosts
publish under ``<prefix>/s<k>`` and its subscriber takes ``<prefix>/s<k>/#`` at
QoS 1 (sharding by topic prefix: no shared subscriptions on nats-server 2.9).

Churn, per vCPU (each transition also re-publishes the vCPU's retained state):
idle 0.01/s; busy = the rate of the recorded KVM toggler guest
(tests/data/records-kvm.json through the agent's classify/advance/render, as
``bench.core`` runs it); worst 1/s (a change on every sample at the default 1 s).

For each broker the busy ladder adds hosts until p99 > 250 ms or the generator
is saturated; idle and worst then run at the largest H that held. On the
cluster, one node is SIGKILLed under that load: events lost, and the time until
every host is connected (and has sent ``online``) again. Loopback only; a few
minutes in all. CPU is from /proc/<pid>/stat (10 ms ticks), RSS from status.

In the same run, ``--real-agents N`` TCG toggler guests (64 MiB, 1 vCPU; vCPU 0
alternates busy/halted and marks each phase start on COM1, ``lab.truth``) are
watched by ONE real ``vcpu-agent run`` (a real agent watches its whole host:
interval 0.25 s, host ``real.fleet.example.com``) on the broker under test
(mosquitto; on the cluster ``servers`` = every node, node 1 first, MQTT 3.1.1).
It publishes under shard 0's prefix, so shard 0's subscriber receives it beside
the simulated hosts. Per measured window: its latency from the guest's marker to
that subscriber (p50/p99, and from its decision, ``at``, as for the simulated
hosts), changes/missed/false transitions (``lab.rig.judge``), and its own CPU.
At the SIGKILL it is connected to node 1: its chain must stay exact (every seq
it logged arrives; first arrivals go +1 with ``from`` = previous ``to``) and its
``online`` must arrive again. SIGINT/SIGTERM unwind: guests destroyed, agent,
subscribers and brokers stopped by PID, a libvirtd we started stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import libvirt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import logs
from agent.config import parse
from agent.delivery import MemoryOutbox
from agent.model import Source, VcpuState, VcpuView
from agent.payloads import PayloadError, Status, Transition, decode, parse_rfc3339
from agent.publisher import Publisher
from agent.render import Renderer
from agent.topics import TopicError, Topics, encode_level, parse_topic
from agent.transitions import VcpuStateSet, VcpuTransition
from bench import core
from lab.domains import Guest, GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.nats import ACK_WAIT_S, NatsCluster
from lab.rig import AgentProcess, Arrival, Match, Seen, judge, revive

TICK_S = 0.1
P99_LIMIT_S = 0.250
SATURATED = 0.9  # a process using this share of one core is out of CPU
CLK_TCK = os.sysconf("SC_CLK_TCK")
REAL_HOST = "real.fleet.example.com"
REAL_INTERVAL_S = 0.25
BOOT_TIMEOUT_S = 120.0


def busy_rate() -> float:
    """Transitions per vCPU per second of the recorded toggler (0.25 s samples)."""
    domains, vcpus, samples = 10, 4, 80
    _, transitions = core.run(domains, vcpus, samples, toggling=True)
    return transitions / (domains * vcpus * samples * 0.25)


# -- /proc ----------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# -- subscribers (child processes) ------------------------------------------------------


def subscriber_main(port: int, topic: str, pipe: Pipe, real_level: str) -> None:
    """One shard's subscriber: QoS 1, 3.1.1; answers commands on ``pipe``.

    Messages of the real agent (``/<real_level>/`` in the topic) are kept raw with
    their arrival times, for the referee in the main process, and left out of the
    simulated hosts' counts.
    """
    lat: list[float] = []
    seqs: dict[tuple[str, str, int], set[int]] = {}
    counts = {"events": 0, "retained": 0, "connects": 0}
    real: list[tuple[str, bytes, bool, float, float]] = []
    # A persistent session, as a subscriber that must not lose events runs: when a
    # surviving node drops its clients after another node died (seen: ~4 s later,
    # docs/scale.md), QoS 1 events published meanwhile wait in the session. With a
    # clean session they were lost to the subscriber and counted as lost.
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"fleet-sub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=False,
    )

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        if real_level in msg.topic:
            real.append((msg.topic, bytes(msg.payload), bool(msg.retain), now, time.monotonic()))
            return
        if msg.retain:
            counts["retained"] += 1
            return
        if not msg.topic.endswith("/transition"):
            return
        body = decode(bytes(msg.payload))
        assert isinstance(body, Transition)
        counts["events"] += 1
        lat.append(now - parse_rfc3339(body.at))
        seqs.setdefault((body.host, body.uuid, body.vcpu), set()).add(body.seq)

    def on_connect(c: paho.Client, *_a: object) -> None:
        counts["connects"] += 1
        c.subscribe(topic, qos=1)

    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    while True:
        cmd = pipe.recv()
        if cmd == "mark":
            lat.clear()
            counts["events"] = 0
            pipe.send(cpu_s(os.getpid()))
        elif cmd == "read":
            pipe.send((list(lat), counts["events"], cpu_s(os.getpid())))
        elif cmd == "seqs":
            pipe.send(({k: sorted(v) for k, v in seqs.items()}, counts["connects"]))
        elif cmd == "real":
            pipe.send(list(real))
        elif cmd == "stop":
            client.disconnect()
            client.loop_stop()
            return


# -- simulated hosts (this process) -------------------------------------------------------


@dataclass
class SimHost:
    index: int
    publisher: Publisher
    renderer: Renderer
    uuid: str
    vcpus: list[VcpuState]
    since: list[float]
    task: asyncio.Task[None] | None = None

    def decide(self, vcpu: int, now: float) -> None:
        before = self.vcpus[vcpu]
        after = VcpuState.HALTED if before is VcpuState.RUNNING else VcpuState.RUNNING
        change = VcpuTransition(
            domain="web.example.com",
            uuid=self.uuid,
            vcpu=vcpu,
            before=VcpuView(before, Source.KVM, 0.5),
            after=VcpuView(after, Source.KVM, 0.9 if after is VcpuState.HALTED else 0.1),
            at=now,
            changed_at=now,
            previous_duration=now - self.since[vcpu],
            resync=False,
        )
        self.vcpus[vcpu], self.since[vcpu] = after, now
        for out in self.renderer.change(change):
            self.publisher.publish(out.message, out.told)
        self.state(vcpu, now)

    def state(self, vcpu: int, now: float) -> None:
        change = VcpuStateSet(
            domain="web.example.com",
            uuid=self.uuid,
            vcpu=vcpu,
            view=VcpuView(self.vcpus[vcpu], Source.KVM, 0.5),
            since=self.since[vcpu],
            at=now,
        )
        for out in self.renderer.change(change):
            self.publisher.publish(out.message, out.told)


@dataclass
class Fleet:
    servers: list[str]
    prefix: str
    shards: int
    vcpus: int
    hosts: list[SimHost] = field(default_factory=list)
    rate: float = 0.0
    decided: int = 0  # transitions decided (the generator's own count)
    lag: float = 0.0  # the latest tick's lateness: the generator's loop is behind

    def add(self, count: int) -> None:
        for _ in range(count):
            i = len(self.hosts)
            # Spread hosts over the nodes: each starts at a different server.
            order = self.servers[i % len(self.servers) :] + self.servers[: i % len(self.servers)]
            cfg = parse(
                {
                    "mqtt": {
                        "servers": order,
                        "protocol": "3.1.1",
                        "topic_prefix": f"{self.prefix}/s{i % self.shards}",
                        "keepalive": 30,
                        "reconnect_min": 0.2,
                        "reconnect_max": 2.0,
                    }
                }
            )
            topics = Topics(prefix=cfg.mqtt.topic_prefix, host=f"h{i:05d}.fleet.example.com")
            outbox = MemoryOutbox(100_000)
            renderer = Renderer(topics, qos=1, epoch=outbox.epoch, chain=outbox.chain())
            publisher = Publisher(
                cfg=cfg.mqtt,
                topics=topics,
                outbox=outbox,
                started_at=time.time(),
                client_id=f"fleet-{self.prefix}-{i}",
            )
            host = SimHost(
                i,
                publisher,
                renderer,
                str(uuid.UUID(int=i)),
                [VcpuState.RUNNING] * self.vcpus,
                [time.time()] * self.vcpus,
            )
            now = time.time()
            for v in range(self.vcpus):
                host.state(v, now)
            host.task = asyncio.get_running_loop().create_task(publisher.run())
            self.hosts.append(host)

    async def churn(self) -> None:
        """Every tick, each vCPU changes with probability rate * tick."""
        rnd = random.Random(1)
        next_at = time.monotonic()
        while True:
            now = time.time()
            p = self.rate * TICK_S
            for host in self.hosts:
                for v in range(self.vcpus):
                    if rnd.random() < p:
                        host.decide(v, now)
                        self.decided += 1
            next_at += TICK_S
            self.lag = max(0.0, time.monotonic() - next_at)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def connected(self) -> int:
        return sum(h.publisher.connected.is_set() for h in self.hosts)

    def backlog(self) -> int:
        return sum(len(h.publisher.outbox) for h in self.hosts)

    def produced(self) -> dict[tuple[str, str, int], int]:
        out = {}
        for h in self.hosts:
            for (u, v), told in h.publisher.outbox.chain().items():
                if v is not None and told.seq:
                    out[(h.publisher.topics.host, u, v)] = told.seq
        return out


# -- the real agent on real guests ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RealStats:
    """The real agent over one or more measured windows, judged by its guests."""

    changes: int  # phase changes the guests marked (closed phases only)
    missed: int
    false: int
    p50_ms: float  # guest marker -> subscriber arrival
    p99_ms: float
    dec_p50_ms: float  # agent decision (payload ``at``) -> arrival, as for simulated hosts
    dec_p99_ms: float
    agent_cpu: float  # share of one core


@dataclass(frozen=True, slots=True)
class Chain:
    """The real agent's transitions of its guests: logged (decided) against arrived."""

    decided: int  # ``vcpu.transition`` lines in its log
    lost: int  # decided, never arrived
    broken: int  # first arrivals not at previous seq + 1, or whose from != previous to
    duplicates: int  # further arrivals of a seq (allowed: marked by seq)

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.broken == 0

    def describe(self) -> str:
        word = "exact" if self.exact else "BROKEN"
        return (
            f"chain {word} ({self.decided} decided, {self.lost} lost, "
            f"{self.broken} out of order, {self.duplicates} dup)"
        )


def nearest_rank(values: list[float], p: float) -> float:
    """Nearest-rank percentile (as bench/latency.py): with few values, p99 = max."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


@contextlib.contextmanager
def real_guests(count: int, phase: float, workdir: Path) -> Iterator[list[Guest]]:
    """``count`` TCG toggler guests (64 MiB, 1 vCPU), booted once for the whole run
    under the lab's libvirtd; on exit they are destroyed and a libvirtd this run
    started is stopped (by PID; one that answered already is left alone)."""
    if count <= 0:
        yield []
        return
    with Libvirtd() as daemon:
        conn = libvirt.open(daemon.uri)
        pool = GuestPool(conn, prefix="vcpuagent-fleet")
        try:
            image = build_toggler_image(busy_s=phase, halted_s=phase, cache_dir=workdir)
            spec = GuestSpec(image=image, virt_type="qemu", vcpus=1, memory_mib=64)
            guests = [pool.start(spec) for _ in range(count)]
            for guest in guests:
                guest.truth.wait_for(1, BOOT_TIMEOUT_S)
            yield guests
        finally:
            conn = revive(pool, conn)
            pool.close()
            conn.close()


def qemu_cpu_s(guests: list[Guest]) -> float:
    """utime + stime of the guests' QEMU processes (libvirt's pid files)."""
    total = 0.0
    for guest in guests:
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(f"/run/libvirt/qemu/{guest.name}.pid").read_text())
            total += cpu_s(pid)
    return total


@dataclass
class RealAgent:
    """One real ``vcpu-agent run`` for every real guest, publishing under shard 0's
    prefix; shard 0's subscriber process keeps its messages (``pipe``)."""

    agent: AgentProcess
    guests: list[Guest]
    prefix: str
    pipe: Pipe
    started_wall: float = 0.0

    @classmethod
    def start(
        cls,
        guests: list[Guest],
        *,
        workdir: Path,
        prefix: str,
        port: int,
        mqtt: Mapping[str, object] | None,
        pipe: Pipe,
    ) -> RealAgent:
        agent = AgentProcess.lab(
            workdir=workdir,
            broker_port=port,
            prefix=prefix,
            host_id=REAL_HOST,
            interval=REAL_INTERVAL_S,
            mqtt=mqtt,
        )
        real = cls(agent, guests, prefix, pipe, time.time())
        agent.start()
        return real

    def arrivals(self) -> list[Arrival]:
        """Everything of the real agent that reached the subscriber so far, decoded."""
        self.pipe.send("real")
        out = []
        for topic, payload, retain, wall, mono in self.pipe.recv():
            error = None
            try:
                where = parse_topic(self.prefix, topic)
                body = decode(payload) if payload else None
            except (TopicError, PayloadError) as err:
                where, body, error = None, None, f"{topic}: {err}"
            out.append(Arrival(topic, payload, 1, retain, where, body, wall, mono, error))
        return out

    def seen(self, arrivals: list[Arrival]) -> dict[tuple[str, int], list[Seen]]:
        """Transitions of the real guests by (domain, vCPU), in arrival order."""
        names = {g.name for g in self.guests}
        out: dict[tuple[str, int], list[Seen]] = {}
        for a in arrivals:
            body = a.body
            if isinstance(body, Transition) and body.domain in names:
                seen = Seen(a, body, parse_rfc3339(body.at), parse_rfc3339(body.changed_at))
                out.setdefault((body.domain, body.vcpu), []).append(seen)
        return out

    def online_after(self, arrivals: list[Arrival], wall: float) -> float | None:
        """Arrival time of the first ``online`` published after ``wall``."""
        for a in arrivals:
            body = a.body
            if (
                isinstance(body, Status)
                and body.status == "online"
                and parse_rfc3339(body.at) >= wall - 0.001  # ``at`` has ms resolution
            ):
                return a.wall
        return None

    async def wait_online(self, after: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.agent.running():
                raise RuntimeError(f"vcpu-agent exited:\n{self.agent.log_tail()}")
            back = self.online_after(self.arrivals(), after)
            if back is not None:
                return back
            await asyncio.sleep(0.2)
        return None

    def port(self) -> int | None:
        """The broker port of the agent's latest connection (its log)."""
        connected = self.agent.events("mqtt.connected")
        port = connected[-1].get("port") if connected else None
        return port if isinstance(port, int) else None

    def reconnected_after(self, wall: float) -> float | None:
        """Seconds from ``wall`` to its first ``mqtt.connected`` after it (its log)."""
        for e in self.agent.events("mqtt.connected"):
            stamp = e.get("timestamp")
            if isinstance(stamp, str) and parse_rfc3339(stamp) >= wall:
                return parse_rfc3339(stamp) - wall
        return None

    def decided(self) -> dict[tuple[str, int], set[int]]:
        names = {g.name for g in self.guests}
        out: dict[tuple[str, int], set[int]] = {}
        for e in self.agent.events("vcpu.transition"):
            domain, vcpu, seq = e.get("domain"), e.get("vcpu"), e.get("seq")
            if domain in names and isinstance(vcpu, int) and isinstance(seq, int):
                out.setdefault((str(domain), vcpu), set()).add(seq)
        return out

    async def chain(self) -> Chain:
        """Read what it decided, give that 2 s to arrive, then check every chain."""
        decided = self.decided()
        await asyncio.sleep(2.0)
        seen = self.seen(self.arrivals())
        lost = broken = dups = 0
        for key, seqs in decided.items():
            got: set[int] = set()
            last_seq, last_to = 0, None
            for s in seen.get(key, []):
                t = s.transition
                if t.seq in got:
                    dups += 1
                    continue
                got.add(t.seq)
                if t.seq != last_seq + 1 or (last_to is not None and t.from_state != last_to):
                    broken += 1
                last_seq, last_to = t.seq, t.to_state
            lost += len(seqs - got)
        return Chain(sum(len(v) for v in decided.values()), lost, broken, dups)

    def stats(
        self, arrivals: list[Arrival], windows: list[tuple[float, float]], cpu: float
    ) -> RealStats:
        """Judge every guest's phase changes inside ``windows`` (wall clock)."""
        seen = self.seen(arrivals)
        matched: list[Match] = []
        changes = missed = false = 0
        for w0, w1 in windows:
            for guest in self.guests:
                markers = guest.truth.markers()
                before = [m for m in markers if m.t_wall < w0]
                inside = [m for m in markers if w0 <= m.t_wall < w1]
                after = [m for m in markers if m.t_wall >= w1]
                if not before or not after:
                    continue  # no opening phase, or the last one is still open
                verdict = judge(
                    [before[-1], *inside, after[0]],
                    seen.get((guest.name, 0), []),
                    end_wall=after[0].t_wall,
                )
                changes += verdict.changes
                matched += verdict.matched
                missed += len(verdict.missed)
                false += len(verdict.false)
        lat = [m.latency * 1e3 for m in matched]
        dec = [(m.seen.arrival.wall - m.seen.at) * 1e3 for m in matched]
        return RealStats(
            changes,
            missed,
            false,
            nearest_rank(lat, 50),
            nearest_rank(lat, 99),
            nearest_rank(dec, 50),
            nearest_rank(dec, 99),
            cpu,
        )


@dataclass
class Row:
    broker: str
    churn: str
    hosts: int
    connections: int
    retained: int
    decided_s: float  # events/s the generator decided
    events_s: float  # events/s the subscribers received
    p50_ms: float
    p99_ms: float
    broker_cpu: float  # share of one core
    broker_rss: float  # MiB
    gen_cpu: float
    sub_cpu: float
    verdict: str
    window: tuple[float, float] | None = None  # wall clock of the measured window
    agent_cpu: float = 0.0  # the real agent's share of one core in the window
    real: RealStats | None = None  # the real agent, judged once its phases closed


async def measure(
    fleet: Fleet,
    subs: list[tuple[BaseProcess, Pipe]],
    broker_pids: list[int],
    *,
    broker: str,
    churn: str,
    window: float,
    real: RealAgent | None,
) -> Row:
    deadline = time.monotonic() + 30
    while fleet.connected() < len(fleet.hosts) or fleet.backlog():
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # warm: churn has been running
    for _, pipe in subs:
        pipe.send("mark")
    sub_cpu0 = sum(pipe.recv() for _, pipe in subs)
    gen0, b0, t0 = cpu_s(os.getpid()), sum(cpu_s(p) for p in broker_pids), time.monotonic()
    wall0, agent0 = time.time(), real.agent.cpu_seconds() if real is not None else 0.0
    decided0 = fleet.decided
    worst_lag = 0.0
    while time.monotonic() - t0 < window:
        await asyncio.sleep(0.1)
        worst_lag = max(worst_lag, fleet.lag)
    wall = time.monotonic() - t0
    wall1, agent1 = time.time(), real.agent.cpu_seconds() if real is not None else 0.0
    decided = (fleet.decided - decided0) / wall
    expected = len(fleet.hosts) * fleet.vcpus * fleet.rate
    gen = (cpu_s(os.getpid()) - gen0) / wall
    bcpu = (sum(cpu_s(p) for p in broker_pids) - b0) / wall
    lat: list[float] = []
    events = 0
    sub_cpu1 = 0.0
    for _, pipe in subs:
        pipe.send("read")
        got, n, cpu = pipe.recv()
        lat += got
        events += n
        sub_cpu1 += cpu
    qs = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [0.0] * 99
    p50, p99 = qs[49], qs[98]
    sub = (sub_cpu1 - sub_cpu0) / wall / max(1, len(subs))
    verdict = "ok"
    # Fewer decisions than the rate asks: the loop could not keep up. Allow for the
    # draw's own noise (binomial, ~Poisson): at idle a window expects ~100 events.
    short = expected * wall * 0.8 - 3 * math.sqrt(expected * wall)
    if gen >= SATURATED or worst_lag > P99_LIMIT_S or decided * wall < short:
        # Its loop fell behind: the latency is the generator's, not the broker's.
        verdict = f"generator saturated (loop {worst_lag * 1e3:.0f} ms late)"
    elif sub >= SATURATED:
        verdict = "subscriber saturated"
    elif p99 > P99_LIMIT_S:
        verdict = "p99 > 250 ms"
    return Row(
        broker,
        churn,
        len(fleet.hosts),
        fleet.connected() + len(subs) + int(real is not None),
        len(fleet.hosts) * (fleet.vcpus + 1),
        decided,
        events / wall,
        p50 * 1e3,
        p99 * 1e3,
        bcpu,
        sum(rss_mib(p) for p in broker_pids),
        gen,
        sub,
        verdict,
        window=(wall0, wall1) if real is not None else None,
        agent_cpu=(agent1 - agent0) / wall,
    )


def start_subscribers(ports: list[int], prefix: str, shards: int) -> list[tuple[BaseProcess, Pipe]]:
    ctx = mp.get_context("spawn")
    subs: list[tuple[BaseProcess, Pipe]] = []
    for k in range(shards):
        mine, theirs = ctx.Pipe()
        port = ports[k % len(ports)]
        level = f"/{encode_level(REAL_HOST)}/"
        proc = ctx.Process(target=subscriber_main, args=(port, f"{prefix}/s{k}/#", theirs, level))
        proc.start()
        subs.append((proc, mine))
    time.sleep(1.5)  # spawned, connected, subscribed (a nats QoS 1 SUBACK takes ~1 s)
    return subs


def stop_subscribers(subs: list[tuple[BaseProcess, Pipe]]) -> None:
    for proc, pipe in subs:
        with contextlib.suppress(OSError):
            pipe.send("stop")
        proc.join(5)
        if proc.is_alive():
            proc.kill()


@dataclass(frozen=True, slots=True)
class RealSetup:
    """How this broker run starts its real agent (``guests`` empty: none)."""

    guests: list[Guest]
    workdir: Path
    port: int
    mqtt: Mapping[str, object] | None = None


def real_mqtt(**keys: object) -> dict[str, object]:
    """The real agent's ``[mqtt]`` overrides: its own client id (the default is
    ``vcpu-agent-<hostname>``, shared with any other agent on this machine)."""
    return {"client_id": f"fleet-real-{uuid.uuid4().hex[:8]}", **keys}


async def run_broker(
    name: str,
    *,
    servers: list[str],
    sub_ports: list[int],
    broker_pids: list[int],
    args: argparse.Namespace,
    rates: dict[str, float],
    cluster: NatsCluster | None,
    setup: RealSetup,
) -> list[Row]:
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    subs = start_subscribers(sub_ports, prefix, args.subscribers)
    fleet = Fleet(servers, prefix, args.subscribers, args.vcpus)
    fleet.rate = rates["busy"]
    churn = asyncio.get_running_loop().create_task(fleet.churn())
    rows: list[Row] = []
    best = 0
    real: RealAgent | None = None
    qemu0, began = qemu_cpu_s(setup.guests), time.monotonic()
    try:
        if setup.guests:
            real = RealAgent.start(
                setup.guests,
                workdir=setup.workdir,
                prefix=f"{prefix}/s0",  # shard 0's subscriber takes it
                port=setup.port,
                mqtt=setup.mqtt,
                pipe=subs[0][1],
            )
            if await real.wait_online(real.started_wall, 30) is None:
                raise RuntimeError(f"real agent not online in 30 s:\n{real.agent.log_tail()}")
        for h in args.ladder:
            fleet.add(h - len(fleet.hosts))
            row = await measure(
                fleet,
                subs,
                broker_pids,
                broker=name,
                churn="busy",
                window=args.window,
                real=real,
            )
            rows.append(row)
            print(_fmt(row), flush=True)
            if row.verdict != "ok":
                break
            best = h
        # idle and worst at the largest H that held (the fleet only grows: trim by rate)
        for level in ("idle", "worst"):
            fleet.rate = rates[level]
            active = fleet.hosts
            fleet.hosts = active[: best or args.ladder[0]]
            row = await measure(
                fleet, subs, broker_pids, broker=name, churn=level, window=args.window, real=real
            )
            fleet.hosts = active
            rows.append(row)
            print(_fmt(row), flush=True)
        fleet.rate = rates["busy"]
        if cluster is not None:
            fleet.hosts = fleet.hosts[: best or args.ladder[0]]
            rows.append(await kill_one(fleet, subs, cluster, broker_pids, real))
        if real is not None:
            qemu = (qemu_cpu_s(setup.guests) - qemu0) / (time.monotonic() - began)
            rows.append(await judge_real(name, rows, real, qemu, args.phase))
    finally:
        churn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await churn
        for host in fleet.hosts:
            await host.publisher.stop(0.5)
            if host.task is not None:
                host.task.cancel()
        if real is not None:
            rc = real.agent.stop()
            if rc != 0:
                print(f"real agent exited {rc}:\n{real.agent.log_tail()}", flush=True)
        stop_subscribers(subs)
    return rows


async def judge_real(
    broker: str, rows: list[Row], real: RealAgent, qemu_cpu: float, phase: float
) -> Row:
    """Fill in each window's real-agent figures, once every phase in them has
    closed; return the broker's summary row for the real agent (all windows)."""
    measured = [r for r in rows if r.window is not None]
    if not measured:
        raise RuntimeError("no measured window")
    last = max(r.window[1] for r in measured if r.window is not None)
    # The phase open at the last window's end must close (and its transition arrive).
    await asyncio.sleep(max(0.0, last + 2 * phase + 1.0 - time.time()))
    arrivals = real.arrivals()
    windows: list[tuple[float, float]] = []
    for row in measured:
        assert row.window is not None
        row.real = real.stats(arrivals, [row.window], row.agent_cpu)
        windows.append(row.window)
    seconds = sum(w1 - w0 for w0, w1 in windows)
    cpu = sum(r.agent_cpu * (r.window[1] - r.window[0]) for r in measured if r.window) / seconds
    chain = await real.chain()
    summary = Row(broker, "real", len(real.guests), 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, "")
    summary.real = real.stats(arrivals, windows, cpu)
    summary.verdict = (
        f"all windows; {chain.describe()}; {len(real.guests)} guests' QEMU {qemu_cpu:.0%} of a core"
    )
    print(_fmt(summary), flush=True)
    return summary


async def kill_one(
    fleet: Fleet,
    subs: list[tuple[BaseProcess, Pipe]],
    cluster: NatsCluster,
    pids: list[int],
    real: RealAgent | None,
) -> Row:
    """SIGKILL node 0 at this load (the subscribers are on the others; the real
    agent, which lists node 0 first, is normally on it)."""
    await asyncio.sleep(2.0)
    on = real.port() if real is not None else None
    node = f"n{cluster.mqtt_ports.index(on) + 1}" if on in cluster.mqtt_ports else f"port {on}"
    killed, killed_wall = time.monotonic(), time.time()
    cluster.kill(0)
    back = None
    while time.monotonic() - killed < 30:
        await asyncio.sleep(0.05)
        if back is None and fleet.connected() == len(fleet.hosts):
            back = time.monotonic() - killed
        if back is not None and time.monotonic() - killed > 5:
            break
    real_back = None
    if real is not None:
        left = max(1.0, 30 - (time.monotonic() - killed))
        online = await real.wait_online(killed_wall, left)
        real_back = None if online is None else online - killed_wall
    fleet.rate = 0.0  # stop producing; let everything drain
    deadline = time.monotonic() + 30
    while fleet.backlog() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    # A message the cluster sent but saw no PUBACK for (through the dead node, or
    # during a session move) comes again after mqtt.ack_wait: wait past it.
    await asyncio.sleep(ACK_WAIT_S + 3.0)
    produced = fleet.produced()
    received: dict[tuple[str, str, int], set[int]] = {}
    connects = []
    for _, pipe in subs:
        pipe.send("seqs")
        got, n = pipe.recv()
        connects.append(n)
        for key, seqs in got.items():
            received.setdefault(key, set()).update(seqs)
    by_shard = [0] * len(subs)
    for key, top in produced.items():
        index = int(key[0].split(".", 1)[0][1:])  # h00042.fleet.example.com
        by_shard[index % len(subs)] += len(set(range(1, top + 1)) - received.get(key, set()))
    lost, total = sum(by_shard), sum(produced.values())
    verdict = (
        f"SIGKILL n1: {lost} of {total} events lost (by shard {by_shard}; subscriber "
        f"connections {connects}); all hosts back in "
        + (f"{back:.2f} s" if back is not None else "> 30 s")
    )
    if real is not None:
        chain = await real.chain()
        again = real.reconnected_after(killed_wall)
        verdict += (
            f"; real agent (on {node}): {chain.describe()}, reconnected in "
            + (f"{again:.2f} s" if again is not None else "> 30 s")
            + ", its online at the subscriber "
            + (f"{real_back:.2f} s" if real_back is not None else "NOT within 30 s")
            + " after the kill"
        )
    print(verdict, flush=True)
    cluster.restart(0)
    return Row("nats x3", "kill", len(fleet.hosts), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, verdict)


SIM_HEAD = (
    f"{'broker':<10} {'churn':<6} {'hosts':>6} {'conns':>6} {'retained':>9} {'decided/s':>9} "
    f"{'events/s':>9} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'brk CPU':>8} {'brk MiB':>8} {'gen CPU':>8} "
    f"{'sub CPU':>8}"
)
REAL_HEAD = (
    f" {'rl p50':>7} {'rl p99':>7} {'rl d50':>7} {'rl d99':>7} {'chg/mis/fls':>11} {'agt CPU':>8}"
)
HEADER = f"{SIM_HEAD}{REAL_HEAD}  verdict"


def _fmt_real(s: RealStats | None) -> str:
    if s is None:
        return " " * len(REAL_HEAD)
    return (
        f" {s.p50_ms:>7.0f} {s.p99_ms:>7.0f} {s.dec_p50_ms:>7.1f} {s.dec_p99_ms:>7.1f} "
        f"{f'{s.changes}/{s.missed}/{s.false}':>11} {s.agent_cpu:>7.1%}"
    )


def _fmt(r: Row) -> str:
    if r.churn == "kill":
        return f"{r.broker:<10} {r.churn:<6} {r.hosts:>6}  {r.verdict}"
    if r.churn == "real":
        head = f"{r.broker:<10} {r.churn:<6} {r.hosts:>6}"
        return f"{head:<{len(SIM_HEAD)}}{_fmt_real(r.real)}  {r.verdict}"
    return (
        f"{r.broker:<10} {r.churn:<6} {r.hosts:>6} {r.connections:>6} {r.retained:>9} "
        f"{r.decided_s:>9.0f} {r.events_s:>9.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
        f"{r.broker_cpu:>7.0%} {r.broker_rss:>8.0f} {r.gen_cpu:>7.0%} {r.sub_cpu:>7.0%}"
        f"{_fmt_real(r.real)}  {r.verdict}"
    )


async def main_async(args: argparse.Namespace, guests: list[Guest], workdir: Path) -> None:
    rates = {"idle": 0.01, "busy": busy_rate(), "worst": 1.0}
    print(
        f"churn per vCPU: idle {rates['idle']}/s, busy {rates['busy']:.3f}/s "
        f"(recorded toggler), worst {rates['worst']}/s; {args.vcpus} vCPUs per host; "
        f"{args.subscribers} subscriber processes; window {args.window} s",
        flush=True,
    )
    if guests:
        print(
            f"real: {len(guests)} TCG toggler guests (64 MiB, 1 vCPU, busy = halted = "
            f"{args.phase} s), one vcpu-agent run (interval {REAL_INTERVAL_S} s, host "
            f"{REAL_HOST}) on shard 0; rl = real agent: p50/p99 ms marker -> subscriber, "
            f"d50/d99 ms decision -> subscriber, changes/missed/false, its CPU",
            flush=True,
        )
    print(HEADER, flush=True)
    rows: list[Row] = []
    with Mosquitto(extra_conf="max_queued_messages 0\nmax_inflight_messages 0") as mosq:
        assert mosq.proc is not None
        server = [f"127.0.0.1:{mosq.port}"]
        rows += await run_broker(
            "mosquitto",
            servers=server,
            sub_ports=[mosq.port],
            broker_pids=[mosq.proc.pid],
            args=args,
            rates=rates,
            cluster=None,
            setup=RealSetup(guests, workdir / "agent-mosquitto", mosq.port, real_mqtt()),
        )
    with NatsCluster() as cluster:
        pids = [p for p in cluster.pids() if p is not None]
        rows += await run_broker(
            "nats x3",
            servers=cluster.servers,
            sub_ports=cluster.mqtt_ports[1:],
            broker_pids=pids,
            args=args,
            rates=rates,
            cluster=cluster,
            # Every node, node 1 first: the real agent is on the node the kill takes.
            setup=RealSetup(
                guests,
                workdir / "agent-nats",
                cluster.mqtt_ports[0],
                real_mqtt(servers=cluster.servers, protocol="3.1.1"),
            ),
        )
    print("\nsummary (CPU = share of one core; brk = broker, all nodes summed)")
    print(HEADER)
    for row in rows:
        print(_fmt(row))


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM like Ctrl-C (and SIGINT even when a shell started us in the background
    # with it ignored): unwind, so every finally/with below cleans up. Once: a second
    # signal must not cut the cleanup short (guests left running).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, default=8)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument(
        "--ladder",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 200, 400, 600, 800],
    )
    parser.add_argument(
        "--real-agents",
        type=int,
        default=2,
        help="real TCG toggler guests watched by one real vcpu-agent run (0: none)",
    )
    parser.add_argument(
        "--phase",
        type=float,
        # As bench/latency.py: several samples per phase, the grid drifting over markers.
        default=round(max(1.5, 4 * REAL_INTERVAL_S) + 0.37 * REAL_INTERVAL_S, 2),
        help="the real guests' busy = halted phase, s",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (agent logs)")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    logs.configure(level="error", fmt="console")
    logging.getLogger("paho").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="vcpu-fleet-"))
    try:
        with real_guests(args.real_agents, args.phase, workdir) as guests:
            asyncio.run(main_async(args, guests, workdir))
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop}): guests, agent and brokers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
