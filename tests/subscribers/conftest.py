"""Fixtures of the subscriber tests: a real mosquitto, and a fake agent publishing
through it (honest about being one: ``tests.subscribers.messages``)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import MqttSection, parse
from agent.payloads import Payload
from lab.mosquitto import Mosquitto


@pytest.fixture(scope="session")
def bus() -> Iterator[Mosquitto]:
    """The subscriber tests' own broker (they run without the suite's conftest too)."""
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def mqtt_section(broker: Mosquitto, prefix: str, *, protocol: str = "5") -> MqttSection:
    return parse(
        {
            "mqtt": {
                "host": "127.0.0.1",
                "port": broker.port,
                "topic_prefix": prefix,
                "protocol": protocol,
                "reconnect_min": 1.0,
                "reconnect_max": 1.0,
            }
        }
    ).mqtt


class Wire:
    """A plain paho publisher: what the fake agent (or a hostile client) sends."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._lock = threading.Lock()

    def send(self, topic: str, payload: bytes | Payload, *, retain: bool = False) -> None:
        data = payload.encode() if isinstance(payload, Payload) else payload
        with self._lock:
            info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), topic

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def wire(bus: Mosquitto) -> Iterator[Wire]:
    w = Wire(bus.port)
    yield w
    w.close()


@pytest.fixture
def mqtt_cfg(bus: Mosquitto, prefix: str) -> Callable[..., MqttSection]:
    def make(*, protocol: str = "5") -> MqttSection:
        return mqtt_section(bus, prefix, protocol=protocol)

    return make
