"""A durable subscriber (``agent.client.Subscriber`` with a ledger) on a real
3-node nats-server cluster loses its node to SIGKILL mid-stream.

The agent runs in-process on libvirt's test driver, connected to another node;
the subscriber lists all three nodes in ``mqtt.servers`` and starts on the one
that is killed. It must move on to a surviving node, keep its chain tracker and
ledger, and report exactly what the agent decided: every seq of every vCPU and
of the domain's lifecycle, no gap, no broken chain, no transition handled twice.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import libvirt

from agent.chain import ChainBroken, EpochChanged, Event, SeqGap
from agent.client import Subscriber
from agent.config import Config
from agent.delivery import SeqKey
from agent.ledger import Ledger
from agent.payloads import Lifecycle, Transition
from lab.nats import ACK_WAIT_S, NatsCluster
from tests.cluster.conftest import cluster_config
from tests.cluster.test_cluster import Churn
from tests.testdriver import RunningAgent, start_domain, with_cleanup


class Consumer:
    """The subscriber's one consumer, on a thread: every event kept, every
    transition committed to the ledger as it is handled."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.events: list[Event] = []
        self.handled: Counter[tuple[SeqKey, int]] = Counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self.sub.get(0.1)
            if event is None:
                continue
            with self.lock:
                self.events.append(event)
                if isinstance(event, Transition):
                    self.handled[((event.uuid, event.vcpu), event.seq)] += 1
            if isinstance(event, Transition):
                self.sub.commit(event)

    def seqs(self, uuid_: str) -> dict[SeqKey, list[int]]:
        """Per vCPU (and the domain's lifecycle, vCPU None): seqs in arrival order."""
        out: dict[SeqKey, list[int]] = defaultdict(list)
        with self.lock:
            for e in self.events:
                if isinstance(e, Transition | Lifecycle) and e.uuid == uuid_:
                    out[(e.uuid, e.vcpu if isinstance(e, Transition) else None)].append(e.seq)
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_durable_subscriber_whose_node_is_killed_fails_over_and_misses_nothing(
    cluster: NatsCluster,
    prefix: str,
    run_agent: Callable[[Config], RunningAgent],
    virt: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    # Kill a node that does not lead the retained-message stream: that election
    # is the agent-side test's subject and stalls every node's publishes ~4 s.
    rmsgs = cluster.leader_of("$MQTT_rmsgs")
    doomed, agents_node = [i for i in range(3) if i != rmsgs][:2]
    survivor = 3 - doomed - agents_node
    sub_order = [doomed, agents_node, survivor]
    sub_cfg = cluster_config(cluster, prefix, order=sub_order).mqtt
    sub = Subscriber(
        sub_cfg,
        client_id=f"cl-durable-{uuid.uuid4().hex[:8]}",
        ledger=Ledger(tmp_path / "ledger.db"),
    )
    sub.connect(timeout=15)
    consumer = Consumer(sub)
    agent = run_agent(cluster_config(cluster, prefix, order=[agents_node, survivor, doomed]))
    dom = start_domain(virt, f"fo-{uuid.uuid4().hex[:6]}")
    mine = dom.UUIDString()
    churn = Churn(dom)
    try:
        assert sub.where == f"127.0.0.1:{cluster.mqtt_ports[doomed]}"
        deadline = time.monotonic() + 10
        while sum(len(s) for s in consumer.seqs(mine).values()) < 8:
            assert time.monotonic() < deadline, "nothing arrived before the kill"
            time.sleep(0.05)
        steps_before = churn.steps
        cluster.kill(doomed)
        time.sleep(3.0)  # transitions keep happening while the subscriber moves on
        assert churn.steps > steps_before
    finally:
        churn.stop()
    try:
        service = agent.service
        deadline = time.monotonic() + 15
        while len(service.outbox) or not service.publisher.connected.is_set():
            assert time.monotonic() < deadline, "the agent's outbox did not drain"
            time.sleep(0.05)
        produced = {k: t.seq for k, t in service.outbox.chain().items() if k[0] == mine and t.seq}
        assert sum(produced.values()) > 10
        # Everything the agent decided arrives, through another node: a message
        # the dead node had sent but not seen PUBACKed comes again after the
        # cluster's mqtt.ack_wait (lab/nats.py), behind newer ones.
        deadline = time.monotonic() + 15 + ACK_WAIT_S
        while True:
            got = consumer.seqs(mine)
            missing = {k: n for k, n in produced.items() if set(range(1, n + 1)) - set(got[k])}
            if not missing:
                break
            assert time.monotonic() < deadline, ("missing", missing, sub.counters)
            time.sleep(0.1)
        assert sub.where != f"127.0.0.1:{cluster.mqtt_ports[doomed]}"
        with consumer.lock:
            events = list(consumer.events)
        # The chain it reports: no broken chain, no new epoch; every seq once.
        # nats-server redelivers an unacknowledged message after newer ones
        # (above): the library reports that as a gap, then delivers the message
        # late. So every gap it reported was filled, and no other transition is
        # out of order (lifecycle events have no gap tracking: complete, once).
        assert not [e for e in events if isinstance(e, ChainBroken | EpochChanged)]
        gaps = [e for e in events if isinstance(e, SeqGap)]
        filled = {((g.uuid, g.vcpu), s) for g in gaps for s in range(g.first, g.last + 1)}
        assert sub.counters["late"] == len(filled) == sub.counters["missing"], sub.counters
        for key, seqs in consumer.seqs(mine).items():
            assert sorted(seqs) == list(range(1, produced[key] + 1)), (key, seqs)
            in_order = [s for s in seqs if (key, s) not in filled]
            assert key[1] is None or in_order == sorted(in_order), (key, seqs, gaps)
        chains: dict[int, list[Transition]] = defaultdict(list)
        for e in sorted((e for e in events if isinstance(e, Transition)), key=lambda e: e.seq):
            if e.uuid == mine:
                chains[e.vcpu].append(e)
        for chain in chains.values():
            for before, after in itertools.pairwise(chain):
                assert after.from_state == before.to_state, (before, after)
        # No transition handled twice; the ledger holds each once.
        assert max(consumer.handled.values()) == 1
        assert sub.ledger is not None
        for t in (e for e in events if isinstance(e, Transition)):
            assert sub.ledger.status(t) == "done"
        # The restarted node rejoins; the subscriber stays on its new node and
        # keeps receiving. (A rejoining node can stall the cluster's QoS 1
        # publishes for several seconds: seen up to ~10 s, hence 20.)
        cluster.restart(doomed)
        paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        (dom.resume if paused else dom.suspend)()
        deadline = time.monotonic() + 20
        while (last := consumer.seqs(mine).get((mine, None), [0])[-1]) <= produced[(mine, None)]:
            assert time.monotonic() < deadline, "nothing arrived after the restart"
            time.sleep(0.05)
        assert last == produced[(mine, None)] + 1
        assert agent.stop() == 0
    finally:
        with_cleanup(dom)
        consumer.stop()
        sub.close()
