"""Durable subscribers across a broker restart, and what a shared subscription does."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.chain import SeqGap
from agent.client import Subscriber
from agent.ledger import Ledger
from agent.payloads import Transition
from lab.mosquitto import Mosquitto
from tests.subscribers.conftest import Wire, mqtt_section
from tests.subscribers.messages import FakeAgent, new_uuid
from tests.subscribers.test_client import collect, n_transitions

pytestmark = pytest.mark.mqtt


def test_a_durable_subscriber_resumes_its_session_after_a_broker_restart(
    tmp_path: Path, prefix: str
) -> None:
    store = tmp_path / "mosquitto"
    store.mkdir()
    broker = Mosquitto(
        extra_conf=f"persistence true\npersistence_location {store}/\nautosave_interval 1",
        workdir=store,
    )
    broker.start()
    try:
        agent = FakeAgent(prefix=prefix)
        u = new_uuid()
        cfg = mqtt_section(broker, prefix)
        wire = Wire(broker.port)
        wire.send(*agent.vcpu_state("web", u, 0), retain=True)
        client_id = f"test-durable-{uuid.uuid4().hex[:8]}"
        with Subscriber(cfg, client_id=client_id, ledger=Ledger(tmp_path / "l.db")) as sub:
            sent = [agent.transition("web", u, 0) for _ in range(6)]
            for m in sent[:3]:
                wire.send(*m)
            got = [e for e in collect(sub, n_transitions(3)) if isinstance(e, Transition)]
            for t in got[:2]:
                sub.commit(t)  # seq 3 is in hand, not committed, when the broker goes
            sub.flush()
            wire.close()
            broker.stop()  # SIGTERM: mosquitto saves sessions and queues
            broker.start()
            wire = Wire(broker.port)
            for m in sent[3:]:
                wire.send(*m)
            events = collect(sub, n_transitions(3), timeout=20)
            after = [e for e in events if isinstance(e, Transition)]
            assert [t.seq for t in after] == [4, 5, 6]
            assert not [e for e in events if isinstance(e, SeqGap)]
            sub.commit(got[2])
            for t in after:
                sub.commit(t)
        wire.close()
        assert Ledger(tmp_path / "l.db").counts() == {"done": 6}
    finally:
        broker.stop()


def test_a_shared_subscription_splits_one_vcpus_chain_across_workers(
    bus: Mosquitto, wire: Wire, prefix: str
) -> None:
    """What docs/subscribers.md warns of: with $share, no worker sees a whole chain."""
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    cfg = mqtt_section(bus, prefix)
    workers = [
        Subscriber(cfg, client_id=f"test-share-{n}-{uuid.uuid4().hex[:6]}", share_group="g")
        for n in range(2)
    ]
    for w in workers:
        w.connect()
    try:
        for _ in range(10):
            wire.send(*agent.transition("web", u, 0))
        seqs: list[list[int]] = []
        for w in workers:
            events = []
            while (event := w.get(0.5)) is not None:
                events.append(event)
            seqs.append([e.seq for e in events if isinstance(e, Transition)])
        assert sorted(seqs[0] + seqs[1]) == list(range(1, 11))  # each message once ...
        assert seqs[0]
        assert seqs[1]
        assert workers[0].counters["gaps"] + workers[1].counters["gaps"] > 0
    finally:
        for w in workers:
            w.close()
