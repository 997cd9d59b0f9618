"""Shared fixtures: a real mosquitto and a real MQTT subscriber; the CI skip rule."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import Config
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from tests.reliability.fault_harness import PersistentSubscriber
from tests.testdriver import RunningAgent, start_agent


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI (``CI=true``) a skipped test fails the run: a skipped fault test hides
    a failure. Only a test marked ``kvm`` may skip, where /dev/kvm is unusable."""
    report = yield
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("kvm") is None
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (only KVM tests may skip): {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """THE libvirtd of this test session: borrowed if one answers, else started by
    PID (virtlogd too) and stopped at the end. One object for every test, so a
    test that restarts libvirtd is not refused for "other users" of it."""
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Mosquitto]]:
    """Brokers of this test's own (it may stop and restart them)."""
    brokers: list[Mosquitto] = []

    def make(extra_conf: str = "", *, persistent: bool = False) -> Mosquitto:
        workdir = Path(tempfile.mkdtemp(prefix="vcpu-rel-mosq-"))
        if persistent:
            # Later lines win: the session and its queued QoS 1 messages survive a
            # broker restart, as a production broker's would.
            extra_conf = (
                f"persistence true\npersistence_location {workdir}/\n"
                f"max_queued_messages 0\n{extra_conf}"
            )
        broker = Mosquitto(extra_conf=extra_conf, workdir=workdir)
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., PersistentSubscriber]]:
    subs: list[PersistentSubscriber] = []

    def make(port: int, topic: str, auth: tuple[str, str] | None = None) -> PersistentSubscriber:
        sub = PersistentSubscriber(port, topic, auth=auth)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's messages."""
    return f"test-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float


class Subscriber:
    """A real paho client on its own thread, recording everything it receives."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        # Retain As Published: see the retain flag as the publisher set it, even for
        # messages published while we are subscribed (MQTT 5, 3.8.3.1).
        self.client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise RuntimeError("subscribe not acknowledged")

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.monotonic())
            )
            self._lock.notify_all()

    def wait_for(
        self, predicate: Callable[[Received], bool], *, timeout: float = 15.0, count: int = 1
    ) -> list[Received]:
        """Wait until ``count`` received messages satisfy ``predicate``; return them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {m.topic} {m.payload[:200]!r}" for m in self.messages)
                    raise AssertionError(f"timed out waiting; received:\n{seen}")
                self._lock.wait(left)

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscribe(broker: Mosquitto) -> Iterator[Callable[[str], Subscriber]]:
    subs: list[Subscriber] = []

    def make(topic: str) -> Subscriber:
        sub = Subscriber(broker.port, topic)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


@pytest.fixture
def run_agent() -> Iterator[Callable[[Config], RunningAgent]]:
    """Start the agent in-process (test driver); every one is stopped afterwards."""
    started: list[RunningAgent] = []

    def start(cfg: Config) -> RunningAgent:
        agent = start_agent(cfg)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.thread.is_alive():
            agent.stop()
