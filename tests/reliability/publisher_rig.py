"""Drive a real ``agent.publisher.Publisher`` (MemoryOutbox) on an asyncio loop of
the test's own, against a real mosquitto; observe with ``Feed``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

from agent.config import MqttSection
from agent.delivery import MemoryOutbox, Message
from agent.publisher import Publisher
from agent.topics import Topics

HOST = "rig"


def make_publisher(
    port: int, prefix: str, *, capacity: int = 10_000, **mqtt: object
) -> tuple[Publisher, MemoryOutbox]:
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "keepalive": 5,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
    }
    settings.update(mqtt)
    outbox = MemoryOutbox(capacity)
    pub = Publisher(
        cfg=MqttSection(**settings),  # type: ignore[arg-type]
        topics=Topics(prefix=prefix, host=HOST),
        outbox=outbox,
        started_at=time.time(),
        client_id=f"rig-{uuid.uuid4().hex[:8]}",
    )
    return pub, outbox


def event(prefix: str, vcpu: int, seq: int, *, size: int = 0, retain: bool = False) -> Message:
    """A message on a vCPU's transition (or, ``retain``, state) topic, carrying its
    seq; padded to at least ``size`` bytes of payload."""
    kind = "state" if retain else "transition"
    body = f'{{"seq":{seq},"pad":"'
    body += "x" * max(0, size - len(body) - 2) + '"}'
    return Message(f"{prefix}/{HOST}/dom/vcpu/{vcpu}/{kind}", body.encode(), 1, retain)


@contextlib.asynccontextmanager
async def running(pub: Publisher, *, connect: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """``pub.run()`` as a task; stopped (offline, acks, disconnect) on the way out."""
    task = asyncio.create_task(pub.run())
    try:
        if connect:
            async with asyncio.timeout(10):
                await pub.connected.wait()
        yield task
    finally:
        await pub.stop(2.0)
        async with asyncio.timeout(5):
            await task


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (without blocking the loop) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
