"""A fleet in a box: H simulated hosts on mosquitto and on a 3-node nats-server cluster.

    .venv/bin/python -m bench.fleet [--vcpus 8] [--window 6] [--ladder 100,200,400,600,800]

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import random
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent import logs
from agent.config import parse
from agent.delivery import MemoryOutbox
from agent.model import Source, VcpuState, VcpuView
from agent.payloads import Transition, decode, parse_rfc3339
from agent.publisher import Publisher
from agent.render import Renderer
from agent.topics import Topics
from agent.transitions import VcpuStateSet, VcpuTransition
from bench import core
from lab.mosquitto import Mosquitto
from lab.nats import NatsCluster

TICK_S = 0.1
P99_LIMIT_S = 0.250
SATURATED = 0.9  # a process using this share of one core is out of CPU
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def subscriber_main(port: int, topic: str, pipe: Pipe) -> None:
    """One shard's subscriber: QoS 1, 3.1.1; answers commands on ``pipe``."""
    lat: list[float] = []
    seqs: dict[tuple[str, str, int], set[int]] = {}
    counts = {"events": 0, "retained": 0}
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"fleet-sub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
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

    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
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
            pipe.send({k: sorted(v) for k, v in seqs.items()})
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


async def measure(
    fleet: Fleet,
    subs: list[tuple[BaseProcess, Pipe]],
    broker_pids: list[int],
    *,
    broker: str,
    churn: str,
    window: float,
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
    decided0 = fleet.decided
    worst_lag = 0.0
    while time.monotonic() - t0 < window:
        await asyncio.sleep(0.1)
        worst_lag = max(worst_lag, fleet.lag)
    wall = time.monotonic() - t0
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
    if gen >= SATURATED or worst_lag > P99_LIMIT_S or decided < 0.8 * expected:
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
        fleet.connected() + len(subs),
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
    )


def start_subscribers(ports: list[int], prefix: str, shards: int) -> list[tuple[BaseProcess, Pipe]]:
    ctx = mp.get_context("spawn")
    subs: list[tuple[BaseProcess, Pipe]] = []
    for k in range(shards):
        mine, theirs = ctx.Pipe()
        port = ports[k % len(ports)]
        proc = ctx.Process(target=subscriber_main, args=(port, f"{prefix}/s{k}/#", theirs))
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


async def run_broker(
    name: str,
    *,
    servers: list[str],
    sub_ports: list[int],
    broker_pids: list[int],
    args: argparse.Namespace,
    rates: dict[str, float],
    cluster: NatsCluster | None,
) -> list[Row]:
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    subs = start_subscribers(sub_ports, prefix, args.subscribers)
    fleet = Fleet(servers, prefix, args.subscribers, args.vcpus)
    fleet.rate = rates["busy"]
    churn = asyncio.get_running_loop().create_task(fleet.churn())
    rows: list[Row] = []
    best = 0
    try:
        for h in args.ladder:
            fleet.add(h - len(fleet.hosts))
            row = await measure(
                fleet, subs, broker_pids, broker=name, churn="busy", window=args.window
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
                fleet, subs, broker_pids, broker=name, churn=level, window=args.window
            )
            fleet.hosts = active
            rows.append(row)
            print(_fmt(row), flush=True)
        fleet.rate = rates["busy"]
        if cluster is not None:
            fleet.hosts = fleet.hosts[: best or args.ladder[0]]
            rows.append(await kill_one(fleet, subs, cluster, broker_pids))
    finally:
        churn.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await churn
        for host in fleet.hosts:
            await host.publisher.stop(0.5)
            if host.task is not None:
                host.task.cancel()
        stop_subscribers(subs)
    return rows


async def kill_one(
    fleet: Fleet, subs: list[tuple[BaseProcess, Pipe]], cluster: NatsCluster, pids: list[int]
) -> Row:
    """SIGKILL node 0 at this load (the subscribers are on the others)."""
    await asyncio.sleep(2.0)
    killed = time.monotonic()
    cluster.kill(0)
    back = None
    while time.monotonic() - killed < 30:
        await asyncio.sleep(0.05)
        if back is None and fleet.connected() == len(fleet.hosts):
            back = time.monotonic() - killed
        if back is not None and time.monotonic() - killed > 5:
            break
    fleet.rate = 0.0  # stop producing; let everything drain
    deadline = time.monotonic() + 30
    while fleet.backlog() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(3.0)
    produced = fleet.produced()
    received: dict[tuple[str, str, int], set[int]] = {}
    for _, pipe in subs:
        pipe.send("seqs")
        for key, seqs in pipe.recv().items():
            received.setdefault(key, set()).update(seqs)
    lost = sum(len(set(range(1, top + 1)) - received.get(k, set())) for k, top in produced.items())
    total = sum(produced.values())
    verdict = f"SIGKILL n1: {lost} of {total} events lost; all hosts back in " + (
        f"{back:.2f} s" if back is not None else "> 30 s"
    )
    print(verdict, flush=True)
    cluster.restart(0)
    return Row("nats x3", "kill", len(fleet.hosts), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, verdict)


HEADER = (
    f"{'broker':<10} {'churn':<6} {'hosts':>6} {'conns':>6} {'retained':>9} {'decided/s':>9} "
    f"{'events/s':>9} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'brk CPU':>8} {'brk MiB':>8} {'gen CPU':>8} "
    f"{'sub CPU':>8}  verdict"
)


def _fmt(r: Row) -> str:
    if r.churn == "kill":
        return f"{r.broker:<10} {r.churn:<6} {r.hosts:>6}  {r.verdict}"
    return (
        f"{r.broker:<10} {r.churn:<6} {r.hosts:>6} {r.connections:>6} {r.retained:>9} "
        f"{r.decided_s:>9.0f} {r.events_s:>9.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
        f"{r.broker_cpu:>7.0%} {r.broker_rss:>8.0f} {r.gen_cpu:>7.0%} {r.sub_cpu:>7.0%}  "
        f"{r.verdict}"
    )


async def main_async(args: argparse.Namespace) -> None:
    rates = {"idle": 0.01, "busy": busy_rate(), "worst": 1.0}
    print(
        f"churn per vCPU: idle {rates['idle']}/s, busy {rates['busy']:.3f}/s "
        f"(recorded toggler), worst {rates['worst']}/s; {args.vcpus} vCPUs per host; "
        f"{args.subscribers} subscriber processes; window {args.window} s",
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
        )
    print("\nsummary (CPU = share of one core; brk = broker, all nodes summed)")
    print(HEADER)
    for row in rows:
        print(_fmt(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vcpus", type=int, default=8)
    parser.add_argument("--window", type=float, default=6.0)
    parser.add_argument("--subscribers", type=int, default=2)
    parser.add_argument(
        "--ladder",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 200, 400, 600, 800],
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C: the brokers this run started are stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))
    logs.configure(level="error", fmt="console")
    logging.getLogger("paho").setLevel(logging.CRITICAL)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
