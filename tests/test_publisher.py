"""The delivery policy (``agent.publisher``) against a real mosquitto, with a memory
outbox: order across retained states and events, the mirror, the gap marker."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.payloads import Gap, decode
from lab.mosquitto import Mosquitto
from lab.rig import Feed
from tests.reliability.publisher_rig import event, make_publisher, running, until


@pytest.mark.mqtt
def test_the_mirror_is_reasserted_after_the_backlog_so_a_state_never_overtakes_its_transition(
    broker: Mosquitto, prefix: str
) -> None:
    sub = Feed(port=broker.port, prefix=prefix, persistent=True)
    try:
        pub, outbox = make_publisher(broker.port, prefix)

        async def scenario() -> None:
            # Decided while the broker was unreachable: per vCPU, transition n then
            # the retained state that carries seq n.
            for seq in range(1, 51):
                for vcpu in (0, 1):
                    pub.publish(event(prefix, vcpu, seq), None)
                    pub.publish(event(prefix, vcpu, seq, retain=True), None)
            await asyncio.sleep(0)
            async with running(pub):
                await until(lambda: len(outbox) == 0)
                # the re-asserted states, after the backlog
                await until(lambda: sum(m.topic.endswith("/state") for m in sub.snapshot()) >= 4)

        asyncio.run(scenario())
        for vcpu in (0, 1):
            seen = [
                (m.topic.rsplit("/", 1)[1], json.loads(m.payload)["seq"])
                for m in sub.snapshot()
                if f"/vcpu/{vcpu}/" in m.topic
            ]
            transitions = [s for kind, s in seen if kind == "transition"]
            assert transitions == list(range(1, 51))
            states = [(i, s) for i, (kind, s) in enumerate(seen) if kind == "state"]
            # the queued state (superseded down to the latest) and its re-assertion
            assert [s for _, s in states] == [50, 50]
            # neither arrives before the transition that led to it
            assert all(i > seen.index(("transition", s)) for i, s in states)
    finally:
        sub.close()


@pytest.mark.mqtt
def test_overflow_is_announced_by_one_gap_marker_before_the_events_that_survived(
    broker: Mosquitto, prefix: str
) -> None:
    sub = Feed(port=broker.port, prefix=prefix, persistent=True)
    try:
        pub, outbox = make_publisher(broker.port, prefix, capacity=5)

        async def scenario() -> None:
            for seq in range(1, 25):
                pub.publish(event(prefix, 0, seq), None)
            async with running(pub):
                await until(lambda: outbox.gap_reported == 19 and len(outbox) == 0)
                await until(lambda: len(sub.snapshot()) >= 7)  # online, gap, 5 events

        asyncio.run(scenario())
        got = [m for m in sub.snapshot() if not m.topic.endswith("/status")]
        gap = decode(got[0].payload)
        assert isinstance(gap, Gap)
        assert (gap.dropped, gap.dropped_total, gap.epoch) == (19, 19, outbox.epoch)
        assert [json.loads(m.payload)["seq"] for m in got[1:]] == [20, 21, 22, 23, 24]
    finally:
        sub.close()
