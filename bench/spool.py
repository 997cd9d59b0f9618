"""Publish throughput at QoS 1 to a local mosquitto: memory outbox vs SQLite spool.

    .venv/bin/python -m bench.spool [--events 50000]

Each run produces ``--events`` transition-sized events in batches (``batch``
events per loop iteration, as one sample's transitions arrive), through the
real ``Publisher`` (``agent.publisher``) to a real mosquitto on loopback, and waits until the broker
has acknowledged every one. Events/s = events / (last PUBACK - first put).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Literal

from agent.config import MqttSection
from agent.delivery import MemoryOutbox, Message, Outbox
from agent.publisher import Publisher
from agent.spool import SqliteSpool
from agent.topics import Topics
from lab.mosquitto import Mosquitto

PAYLOAD = (
    b'{"schema":2,"kind":"transition","host":"bench","domain":"guest-01","uuid":'
    b'"6695eb01-f6a4-8304-79aa-97f2502e193f","vcpu":3,"from":"running","to":"halted",'
    b'"source":"kvm","ratio":0.9912,"at":"2026-01-01T00:00:00.000Z","changed_at":'
    b'"2026-01-01T00:00:00.000Z","previous_duration_s":3.001,"seq":12345,"epoch":"0123456789ab","resync":false}'
)


async def _run(port: int, outbox: Outbox, events: int, batch: int) -> float:
    """Live: produce while connected. ``batch == 0``: replay a backlog spooled
    while the broker was unreachable (the case after an outage)."""
    topic = "bench/bench/guest-01/vcpu/3/transition"
    if batch == 0:
        for _ in range(events):
            outbox.put(Message(topic, PAYLOAD, 1, False))
        outbox.flush()
    cfg = MqttSection(host="127.0.0.1", port=port, reconnect_min=0.05, reconnect_max=0.5)
    pub = Publisher(
        cfg=cfg,
        topics=Topics(prefix="bench", host="bench"),
        outbox=outbox,
        started_at=time.time(),
        client_id=f"bench-{id(outbox)}",
    )
    task = asyncio.create_task(pub.run())
    start = time.perf_counter()
    await asyncio.wait_for(pub.connected.wait(), 10)
    produced = events if batch == 0 else 0
    while produced < events:
        for _ in range(min(batch, events - produced)):
            pub.publish(Message(topic, PAYLOAD, 1, False), None)
            produced += 1
        await asyncio.sleep(0)
    while len(outbox):
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    await pub.stop(1.0)
    await task
    return events / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--broker-inflight",
        type=int,
        default=20,
        help="mosquitto's max_inflight_messages, the Receive Maximum it announces and the "
        "agent honours (20: mosquitto's default)",
    )
    args = parser.parse_args()
    n = args.events
    conf = f"max_inflight_messages {args.broker_inflight}\n"
    with Mosquitto(extra_conf=conf) as broker, tempfile.TemporaryDirectory() as tmp:
        print(f"{n} events at QoS 1 to mosquitto on 127.0.0.1:{broker.port}")
        print(f"{'outbox':<28} {'batch':>6} {'events/s':>10} {'commits':>8}")
        for batch in (1, 10, 100, 0):
            rate = asyncio.run(_run(broker.port, MemoryOutbox(n + 1), n, batch))
            print(f"{'memory':<28} {batch or 'replay':>6} {rate:>10,.0f} {'-':>8}")
            sync: Literal["normal", "full"]
            for sync in ("normal", "full"):
                path = Path(tmp) / f"spool-{sync}-{batch}.sqlite3"
                spool = SqliteSpool(path, n + 1, synchronous=sync)
                rate = asyncio.run(_run(broker.port, spool, n, batch))
                print(
                    f"{'sqlite synchronous=' + sync:<28} {batch or 'replay':>6} {rate:>10,.0f} "
                    f"{spool.commits:>8}"
                )
                spool.close()


if __name__ == "__main__":
    main()
