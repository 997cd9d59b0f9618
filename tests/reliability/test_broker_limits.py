"""Broker limits against a real mosquitto: Maximum Packet Size and Receive Maximum.

A ``Publisher`` with a memory outbox is driven directly: a backlog is queued while
it is not connected, then it connects to a broker configured with the limit, and a
persistent subscriber checks what arrived (and in which order), the broker's log
counts connections.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from agent.payloads import Gap, decode
from lab.cutter import CuttingRelay
from lab.mosquitto import Mosquitto
from lab.rig import Feed
from tests.reliability.publisher_rig import event, make_publisher, running, until

LIMIT = 300  # bytes; the big entries below are ~400, the small ones ~100


def _connects(broker: Mosquitto, client_id: str) -> int:
    """How many times the broker accepted a connection from ``client_id``."""
    return broker.log_path.read_text().count(f" as {client_id} ")


def _seqs(sub: Feed, suffix: str) -> list[int]:
    return [
        json.loads(m.payload)["seq"] for m in sub.snapshot() if m.topic.endswith(f"/0/{suffix}")
    ]


@pytest.mark.mqtt
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_entries_over_the_packet_limit_are_dropped_counted_in_a_gap_and_never_block_the_rest(
    protocol: str,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
) -> None:
    broker = make_broker(f"max_packet_size {LIMIT}")
    sub = make_subscriber(broker.port, f"{prefix}/#")
    pub, outbox = make_publisher(broker.port, prefix, protocol=protocol)
    big = {4, 9, 15}  # seqs too large for the broker, one of them a retained state
    for seq in range(1, 21):
        pub.outbox.put(event(prefix, 0, seq, size=400 if seq in big else 100), None)
    pub.outbox.put(event(prefix, 0, 15, size=400, retain=True), None)  # supersedes nothing

    async def scenario() -> None:
        with capture_logs() as logs:
            async with running(pub):
                await until(lambda: len(outbox) == 0 and outbox.gap_reported == 4, timeout=20)
                await until(lambda: 17 in _seqs(sub, "transition"))
        unsendable = [e for e in logs if e["event"] == "mqtt.unsendable"]
        assert 1 <= len(unsendable) <= 4, unsendable  # a line per fault, not per attempt
        if protocol == "5":  # the limit was announced in CONNACK
            assert unsendable[0]["limit"] == LIMIT
            assert unsendable[0]["size"] > LIMIT

    asyncio.run(scenario())
    # All that fit, in order. (3.1.1: the broker's reset may discard PUBACKs it
    # sent just before, so a few entries arrive twice; subscribers drop them by seq.)
    firsts = list(dict.fromkeys(_seqs(sub, "transition")))
    assert firsts == [s for s in range(1, 21) if s not in big]
    gaps = [decode(m.payload) for m in sub.snapshot() if m.topic.endswith("/gap")]
    assert all(isinstance(g, Gap) for g in gaps)
    assert sum(g.dropped for g in gaps if isinstance(g, Gap)) == 4  # 3 transitions + 1 state
    assert max(g.dropped_total for g in gaps if isinstance(g, Gap)) == 4
    assert outbox.dropped == 4
    assert outbox.gap_reported == 4
    # MQTT 5: one connection. 3.1.1: the broker closes on each big packet; finding
    # it costs two connections per big entry, then no more flapping.
    assert _connects(broker, pub.client_id) <= (1 if protocol == "5" else 1 + 2 * 4)


@pytest.mark.mqtt
@pytest.mark.parametrize(("cuts", "dropped"), [(2, 0), (None, 1)])
def test_a_small_entry_whose_connection_drops_is_not_taken_for_one_the_broker_refuses(
    cuts: int | None,
    dropped: int,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
) -> None:
    # A connection that drops right after the one entry in flight names that entry
    # as one the broker refuses (the test above). A failing cluster node drops
    # connections too (CI: a nats node): an entry no larger than one the broker
    # already took survives such drops; only the third in a row drops it.
    broker = make_broker()
    sub = make_subscriber(broker.port, f"{prefix}/#")
    small = event(prefix, 0, 2, size=100)
    small = type(small)(small.topic, small.payload.replace(b"xxxxxxxx", b"cut-here", 1), 1, False)
    with CuttingRelay(broker.port, marker=b"cut-here", times=cuts) as relay:
        pub, outbox = make_publisher(relay.port, prefix, protocol="3.1.1")
        pub.outbox.put(event(prefix, 0, 1, size=400), None)

        async def scenario() -> None:
            async with running(pub):
                await until(lambda: len(outbox) == 0)  # the broker took 400 bytes
                pub.publish(small, None)
                pub.publish(event(prefix, 0, 3, size=100), None)
                await until(lambda: len(outbox) == 0, timeout=20)
                await until(lambda: 3 in _seqs(sub, "transition"))

        asyncio.run(scenario())
        assert relay.cuts == (cuts if cuts is not None else 1 + 3)
    arrived = list(dict.fromkeys(_seqs(sub, "transition")))
    assert arrived == ([1, 3] if dropped else [1, 2, 3])
    assert outbox.dropped == dropped


@pytest.mark.mqtt
@pytest.mark.parametrize(("protocol", "qos"), [("5", 1), ("5", 2), ("3.1.1", 1)])
def test_a_backlog_to_a_broker_with_receive_maximum_one_is_delivered_whole_and_in_order(
    protocol: str,
    qos: int,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
) -> None:
    # mosquitto's max_inflight_messages is also the Receive Maximum its CONNACK
    # announces (MQTT 5). Over it, QoS 2 PUBRECs carry "quota exceeded", which
    # paho drops: half the backlog vanished while counted delivered.
    broker = make_broker("max_inflight_messages 1")
    sub = make_subscriber(broker.port, f"{prefix}/#")
    pub, outbox = make_publisher(broker.port, prefix, protocol=protocol)
    n = 200
    for seq in range(1, n + 1):
        m = event(prefix, 0, seq)
        pub.outbox.put(type(m)(m.topic, m.payload, qos, False), None)

    async def scenario() -> None:
        async with running(pub):
            await until(lambda: len(outbox) == 0, timeout=30)
            await until(lambda: len(_seqs(sub, "transition")) >= n, timeout=10)

    asyncio.run(scenario())
    assert _seqs(sub, "transition") == list(range(1, n + 1))
    assert _connects(broker, pub.client_id) == 1
