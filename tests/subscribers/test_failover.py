"""``mqtt.servers`` in the client library: rotation between two real mosquittos.

The cluster case (one broker, its session kept on the surviving nodes) is
``tests/cluster/test_subscriber_failover.py``; here each endpoint is its own
broker, so what is proven is the rotation, the re-subscription on the new
connection and the chain tracker carried across it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from agent.chain import SeqGap
from agent.client import ClientError, Subscriber
from agent.config import MqttSection, parse
from agent.payloads import Transition
from lab.mosquitto import Mosquitto, free_port
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import FakeAgent, new_uuid
from tests.subscribers.test_client import cid, collect, n_transitions

pytestmark = pytest.mark.mqtt


def servers_section(ports: list[int], prefix: str, *, reconnect_min: float) -> MqttSection:
    return parse(
        {
            "mqtt": {
                "servers": [f"127.0.0.1:{p}" for p in ports],
                "topic_prefix": prefix,
                "reconnect_min": reconnect_min,
                "reconnect_max": reconnect_min,
            }
        }
    ).mqtt


@pytest.fixture
def second() -> Iterator[Mosquitto]:
    with Mosquitto() as mosquitto:
        yield mosquitto


def test_a_dead_first_endpoint_is_skipped_at_once_without_the_backoff(
    bus: Mosquitto, prefix: str
) -> None:
    # reconnect_min 30: any pause before the second endpoint would time out.
    cfg = servers_section([free_port(), bus.port], prefix, reconnect_min=30.0)
    began = time.monotonic()
    sub = Subscriber(cfg, client_id=cid()).connect(timeout=5)
    try:
        assert time.monotonic() - began < 5
        assert sub.where == f"127.0.0.1:{bus.port}"
    finally:
        sub.close()


def test_a_round_of_dead_endpoints_is_a_client_error_naming_them_all(prefix: str) -> None:
    ports = [free_port(), free_port()]
    cfg = servers_section(ports, prefix, reconnect_min=0.1)
    with pytest.raises(ClientError, match=f"127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}"):
        Subscriber(cfg, client_id=cid()).connect(timeout=1.0)


def test_a_lost_broker_is_replaced_by_the_next_and_the_chain_carries_over(
    bus: Mosquitto, second: Mosquitto, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    first = Mosquitto()
    first.start()
    sub = Subscriber(
        servers_section([first.port, second.port], prefix, reconnect_min=0.1),
        client_id=cid(),
    ).connect(timeout=5)
    try:
        wire = Wire(first.port)
        wire.send(*agent.transition("web", u, 0))
        got = collect(sub, n_transitions(1))
        wire.close()
        first.stop()
        # Subscribed again on the second broker: what it carries arrives, and
        # seq 2 continues the chain seq 1 started on the first.
        wire = Wire(second.port)
        sent = [agent.transition("web", u, 0) for _ in range(2)]
        deadline = time.monotonic() + 10
        while sub.where != f"127.0.0.1:{second.port}" or not sub.wait_synced(0.1):
            assert time.monotonic() < deadline, "no failover to the second broker"
        for m in sent:
            wire.send(*m)
        got += collect(sub, n_transitions(2))
        wire.close()
        assert [e.seq for e in got if isinstance(e, Transition)] == [1, 2, 3]
        assert not [e for e in got if isinstance(e, SeqGap)]
    finally:
        sub.close()
        first.close()


def test_one_endpoint_keeps_the_single_broker_behaviour(bus: Mosquitto, prefix: str) -> None:
    cfg = servers_section([bus.port], prefix, reconnect_min=1.0)
    sub = Subscriber(cfg, client_id=f"test-one-{uuid.uuid4().hex[:6]}")
    try:
        assert sub._client.on_pre_connect is None  # paho's own reconnect, as before
        sub.connect(timeout=5)
        assert sub.where == f"127.0.0.1:{bus.port}"
    finally:
        sub.close()
