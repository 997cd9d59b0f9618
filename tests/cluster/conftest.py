"""The 3-node nats-server cluster (JetStream, MQTT 3.1.1), once per test session.

Every test gets it with all three nodes running and answering (a test that
killed a node has it restarted before the next test starts), and drives the
agent in-process on libvirt's test driver (``tests.testdriver.start_agent``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator

import libvirt
import paho.mqtt.client as paho
import pytest

from agent.config import Config, parse
from agent.source import start_event_thread
from lab.nats import NatsCluster, mqtt_client
from tests.testdriver import RunningAgent, start_agent

_SESSION: list[NatsCluster] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed cluster test carries each node's log tail: whether the cluster
    was electing leaders or re-creating consumers is in the nodes' logs only."""
    report = yield
    if report.failed and _SESSION:
        for node in _SESSION[0].nodes:
            report.sections.append((f"nats-server {node.name} log", node.log_tail(40)))
    return report


@pytest.fixture(scope="session")
def nats_session() -> Iterator[NatsCluster]:
    with NatsCluster() as cluster:
        _SESSION.append(cluster)
        try:
            yield cluster
        finally:
            _SESSION.clear()


@pytest.fixture
def cluster(nats_session: NatsCluster) -> NatsCluster:
    """The session's cluster with every node up (restarted if a test killed one)."""
    down = [n.index for n in nats_session.nodes if n.pid is None]
    for index in down:
        nats_session.nodes[index].start()
    if down:
        nats_session.wait_ready()
    return nats_session


@pytest.fixture
def prefix() -> str:
    return f"cl-{uuid.uuid4().hex[:10]}"


def cluster_config(
    cluster: NatsCluster,
    prefix: str,
    *,
    host_id: str = "clhost",
    order: list[int] | None = None,
) -> Config:
    """An agent on every node of the cluster (``order``: node indices, the first
    is where it connects), MQTT 3.1.1 (all nats-server speaks)."""
    servers = [cluster.servers[i] for i in (order or range(len(cluster.nodes)))]
    return parse(
        {
            "agent": {"host_id": host_id},
            "libvirt": {"uri": "test:///default"},
            "sampling": {"interval": 0.1, "libvirt_interval": 0.1, "event_followup": 0.05},
            "mqtt": {
                "servers": servers,
                "protocol": "3.1.1",
                "topic_prefix": prefix,
                "client_id": f"agent-{uuid.uuid4().hex[:8]}",
                "keepalive": 5,
                "reconnect_min": 0.05,
                "reconnect_max": 0.3,
            },
            "spool": {"path": ""},
        }
    )


@pytest.fixture
def run_agent() -> Iterator[Callable[[Config], RunningAgent]]:
    start_event_thread()  # libvirt's event loop, before any connection of this process
    started: list[RunningAgent] = []

    def start(cfg: Config) -> RunningAgent:
        agent = start_agent(cfg)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.thread.is_alive():
            agent.stop()


@pytest.fixture
def virt() -> Iterator[libvirt.virConnect]:
    """A writable connection to the test driver the in-process agent watches."""
    start_event_thread()
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def retained(port: int, topic_filter: str, *, quiet: float = 0.5) -> dict[str, bytes]:
    """Every retained message a fresh subscriber on ``port`` gets for the filter:
    what that node serves as current (the tree, once nothing arrives for ``quiet`` s).

    QoS 0: with one of three nodes down, nats-server 2.9.10 refuses most new QoS 1
    subscriptions (SUBACK 0x80 after ~4 s: each needs a new R3 JetStream consumer)
    while a QoS 0 one is granted at once and gets the node's retained messages
    (docs/scale.md, "nats-server facts")."""
    got: dict[str, bytes] = {}
    last = [time.monotonic()]
    subscribed = threading.Event()
    lock = threading.Lock()
    client = mqtt_client()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with lock:
            if msg.retain:
                got[msg.topic] = bytes(msg.payload)
            last[0] = time.monotonic()

    def on_subscribe(*_a: object) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_connect = lambda c, *_a: c.subscribe(topic_filter, qos=0)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise AssertionError(f"no SUBACK from port {port}")
        while time.monotonic() - last[0] < quiet:
            time.sleep(0.05)
        with lock:
            return {t: p for t, p in got.items() if p}
    finally:
        client.disconnect()
        client.loop_stop()
