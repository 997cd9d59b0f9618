"""The agent on a real 3-node nats-server cluster (JetStream, MQTT 3.1.1).

The agent runs in-process on libvirt's test driver with ``mqtt.servers`` naming
all three nodes; a persistent subscriber sits on another node. Killing the
agent's node with SIGKILL mid-stream must lose nothing, duplicate nothing
un-marked, and leave the latest retained state (and a fresh ``online``) on
every node, the restarted one included.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import libvirt

from agent.config import Config
from agent.delivery import SeqKey, Told
from agent.payloads import Lifecycle, Transition
from agent.topics import Topics, parse_topic
from lab.nats import ACK_WAIT_S, NatsCluster
from lab.rig import Arrival, Feed
from tests.cluster.conftest import cluster_config, retained
from tests.reliability.fault_harness import compare
from tests.testdriver import RunningAgent, start_domain, with_cleanup


def _feed(cluster: NatsCluster, node: int, prefix: str) -> Feed:
    """A durable subscriber (MQTT 3.1.1, persistent session, QoS 1) on one node."""
    return Feed(port=cluster.mqtt_ports[node], prefix=prefix, persistent=True)


def test_a_dotted_domain_on_an_fqdn_host_reaches_a_subscriber_on_another_node(
    cluster: NatsCluster,
    prefix: str,
    run_agent: Callable[[Config], RunningAgent],
    virt: libvirt.virConnect,
) -> None:
    # nats-server closes the connection on a '.' in a topic: with '.' left as it
    # was, nothing of this host or domain would ever arrive.
    host, domain = "node1.example.com", f"web-{uuid.uuid4().hex[:6]}.example.com"
    topics = Topics(prefix=prefix, host=host)
    sub = _feed(cluster, 2, prefix)
    try:
        agent = run_agent(cluster_config(cluster, prefix, host_id=host))
        sub.wait_online(host)
        dom = start_domain(virt, domain)
        try:
            # A message the node sent during a JetStream hiccup but saw no PUBACK
            # for comes again after mqtt.ack_wait (lab/nats.py): wait past it.
            state = sub.wait_for(
                lambda a: a.topic == topics.vcpu_state(domain, 0), timeout=15 + ACK_WAIT_S
            )
            dom.suspend()
            lifecycle = sub.wait_for(
                lambda a: (
                    a.topic == topics.lifecycle(domain)
                    and isinstance(a.body, Lifecycle)
                    and a.body.event == "suspended"
                )
            )
        finally:
            with_cleanup(dom)
        assert agent.service.publisher.endpoint == ("127.0.0.1", cluster.mqtt_ports[0])
        for arrival in (state, lifecycle):
            assert arrival.where is not None
            assert (arrival.where.host, arrival.where.domain) == (host, domain)
        assert not sub.errors
        assert agent.stop() == 0
    finally:
        sub.close()


class Churn:
    """Lifecycle events and vCPU unplug/replug on one test-driver domain, on a
    thread, until stopped: every step is a transition or lifecycle event."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.dom = dom
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for step in (
                self.dom.suspend,
                self.dom.resume,
                lambda: self.dom.setVcpusFlags(1, libvirt.VIR_DOMAIN_AFFECT_LIVE),
                lambda: self.dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE),
            ):
                step()
                self.steps += 1
                # Longer than the agent's interval (0.1 s): a sample sees each step.
                if self._stop.wait(0.15):
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _transitions_per_vcpu(arrivals: list[Arrival]) -> dict[SeqKey, list[Transition]]:
    """Each vCPU's transitions by first arrival of each seq (duplicates dropped by seq)."""
    chains: dict[SeqKey, list[Transition]] = defaultdict(list)
    seen: set[tuple[SeqKey, int]] = set()
    for a in arrivals:
        body = a.body
        if not isinstance(body, Transition):
            continue
        key: SeqKey = (body.uuid, body.vcpu)
        if (key, body.seq) not in seen:
            seen.add((key, body.seq))
            chains[key].append(body)
    return chains


def test_killing_the_agents_node_mid_stream_keeps_the_chain_exact_on_every_node(
    cluster: NatsCluster,
    prefix: str,
    run_agent: Callable[[Config], RunningAgent],
    virt: libvirt.virConnect,
) -> None:
    topics = Topics(prefix=prefix, host="clhost")
    # The agent's first node leads the retained-message stream: killing it makes
    # the retained `online` sent through the next node fall into the stream's
    # leader election, where nats-server acknowledges it without storing it.
    doomed = cluster.leader_of("$MQTT_rmsgs")
    order = [doomed, *(i for i in range(3) if i != doomed)]
    sub = _feed(cluster, order[2], prefix)
    agent = run_agent(cluster_config(cluster, prefix, order=order))
    dom = start_domain(virt, f"churn-{uuid.uuid4().hex[:6]}")
    churn = Churn(dom)
    try:
        sub.wait_online("clhost")
        first = agent.service.publisher.endpoint
        assert first == ("127.0.0.1", cluster.mqtt_ports[doomed])
        time.sleep(2.0)  # mid-stream: events are being published through that node
        steps_before = churn.steps
        killed_at = time.time()
        cluster.kill(doomed)
        time.sleep(3.0)  # ...and keep happening while the agent moves on
        assert churn.steps > steps_before
    finally:
        churn.stop()
    try:
        service = agent.service
        deadline = time.monotonic() + 20
        while len(service.outbox) or not service.publisher.connected.is_set():
            assert time.monotonic() < deadline, "the outbox did not drain on another node"
            time.sleep(0.05)
        assert service.publisher.endpoint != first
        produced = {k: t.seq for k, t in service.outbox.chain().items() if t.seq}
        mine = dom.UUIDString()
        assert sum(n for (u, _), n in produced.items() if u == mine) > 10

        # Nothing lost, first arrivals in order; duplicates only as repeated seqs.
        sub.wait(lambda: not compare(produced, sub.snapshot()).missing, 20, "every event")
        delivery = compare(produced, sub.snapshot())
        assert not delivery.out_of_order
        # The chain: per vCPU seq +1 and from = previous to.
        for key, chain in _transitions_per_vcpu(sub.snapshot()).items():
            assert [t.seq for t in chain] == list(range(chain[0].seq, chain[0].seq + len(chain)))
            for before, after in itertools.pairwise(chain):
                assert after.from_state == before.to_state, (key, before, after)

        # Retained state on every surviving node is the latest, and `online` was
        # re-asserted through the new node (the old connection fired no will).
        told = {k: t for k, t in service.outbox.chain().items() if k[0] == mine}
        for index in order[1:]:
            port = cluster.mqtt_ports[index]
            _assert_latest(port, prefix, topics, mine, told, online_after=killed_at)
        # A restarted node catches up: it serves the same latest state.
        cluster.restart(doomed)
        port = cluster.mqtt_ports[doomed]
        _assert_latest(port, prefix, topics, mine, told, online_after=killed_at)
        assert agent.stop() == 0
    finally:
        with_cleanup(dom)
        sub.close()


def _assert_latest(
    port: int,
    prefix: str,
    topics: Topics,
    uuid_: str,
    told: dict[SeqKey, Told],
    *,
    online_after: float,
    timeout: float = 20.0,
) -> None:
    """The node on ``port`` serves, as retained, a fresh ``online`` (published after
    ``online_after``) and exactly the vCPU states the agent last told. Read with a
    new subscription each try: nats-server sends retained messages after SUBACK
    through JetStream, with no end marker, so "not yet" is retried, not failed."""
    expected = {k: (t.state, t.seq) for k, t in told.items() if k[1] is not None}
    after = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(online_after))
    deadline = time.monotonic() + timeout
    while True:
        tree = retained(port, f"{prefix}/#")
        status = json.loads(tree.get(topics.status, b"{}"))
        states = {}
        for topic, payload in tree.items():
            where = parse_topic(prefix, topic)
            if where.kind == "vcpu_state":
                body = json.loads(payload)
                if body["uuid"] == uuid_:
                    states[(uuid_, body["vcpu"])] = (body["state"], body["seq"])
        fresh_online = status.get("status") == "online" and status.get("at", "") > after
        if fresh_online and states == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError((port, status, states, expected))
