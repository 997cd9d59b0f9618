"""The client library against a real mosquitto, fed by the fake agent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.chain import BadMessage, Event, SeqGap, VcpuCleared
from agent.client import ClientError, Selection, Subscriber
from agent.config import MqttSection
from agent.ledger import Ledger
from agent.payloads import Transition, VcpuStatePayload
from lab.mosquitto import Mosquitto
from tests.subscribers.conftest import Wire, mqtt_section
from tests.subscribers.messages import FakeAgent, new_uuid

pytestmark = pytest.mark.mqtt
MakeCfg = Callable[..., MqttSection]


def collect(
    sub: Subscriber, until: Callable[[list[Event]], bool], timeout: float = 10.0
) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {events}"
        event = sub.get(left)
        if event is not None:
            events.append(event)
    return events


def n_transitions(n: int) -> Callable[[list[Event]], bool]:
    return lambda events: sum(isinstance(e, Transition) for e in events) >= n


def cid() -> str:
    return f"test-sub-{uuid.uuid4().hex[:8]}"


def test_a_new_subscriber_knows_every_vcpu_from_the_retained_tree_before_any_transition(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    for n in range(3):
        wire.send(*agent.vcpu_state("web 1", u, n), retain=True)
    with Subscriber(mqtt_cfg(), client_id=cid(), qos=0) as sub:
        assert sub.wait_synced(5)
        known = []
        while (event := sub.get(0)) is not None:
            known.append(event)
        assert sorted(e.vcpu for e in known if isinstance(e, VcpuStatePayload)) == [0, 1, 2]
        topic, t = agent.transition("web 1", u, 1)
        wire.send(topic, t)
        events = collect(sub, n_transitions(1))
        assert [e for e in events if isinstance(e, Transition)] == [t]
        assert sub.counters["gaps"] == 0


def test_a_transition_published_twice_is_delivered_once_and_a_lost_one_is_reported(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    with Subscriber(mqtt_cfg(), client_id=cid()) as sub:
        sent = [agent.transition("web", u, 0) for _ in range(4)]
        for topic, t in [sent[0], sent[0], sent[1], sent[1], sent[3]]:  # seq 3 lost
            wire.send(topic, t)
        events = collect(sub, n_transitions(3))
        assert [e.seq for e in events if isinstance(e, Transition)] == [1, 2, 4]
        gaps = [e for e in events if isinstance(e, SeqGap)]
        assert [(g.first, g.last) for g in gaps] == [(3, 3)]
        assert sub.counters["duplicates"] == 2


def test_a_cleared_retained_state_says_the_vcpu_is_gone(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    topic, state = agent.vcpu_state("web", u, 0)
    wire.send(topic, state, retain=True)
    with Subscriber(mqtt_cfg(), client_id=cid()) as sub:
        collect(sub, lambda ev: any(isinstance(e, VcpuStatePayload) for e in ev))
        wire.send(topic, b"", retain=True)
        events = collect(sub, lambda ev: any(isinstance(e, VcpuCleared) for e in ev))
        assert events[-1] == VcpuCleared(host="node1", domain="web", vcpu=0)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_durable_subscriber_gets_what_was_published_while_it_was_away(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str, tmp_path: Path, protocol: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    client_id = cid()
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    cfg = mqtt_cfg(protocol=protocol)
    with Subscriber(cfg, client_id=client_id, ledger=Ledger(tmp_path / "l.db")) as sub:
        first = agent.transition("web", u, 0)
        wire.send(*first)
        (t1,) = [e for e in collect(sub, n_transitions(1)) if isinstance(e, Transition)]
        sub.commit(t1)
    away = [agent.transition("web", u, 0) for _ in range(3)]
    for topic, t in away:
        wire.send(topic, t)
    with Subscriber(cfg, client_id=client_id, ledger=Ledger(tmp_path / "l.db")) as sub:
        events = collect(sub, n_transitions(3))
        got = [e for e in events if isinstance(e, Transition)]
        assert [t.seq for t in got] == [2, 3, 4]
        assert not [e for e in events if isinstance(e, SeqGap)]
        for t in got:
            sub.commit(t)


def test_an_uncommitted_transition_is_redelivered_and_a_committed_one_never(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    client_id = cid()
    ledger = tmp_path / "l.db"
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    with Subscriber(mqtt_cfg(), client_id=client_id, ledger=Ledger(ledger)) as sub:
        for _ in range(2):
            wire.send(*agent.transition("web", u, 0))
        t1, _t2 = [e for e in collect(sub, n_transitions(2)) if isinstance(e, Transition)]
        sub.commit(t1)  # t2 is being handled when we "crash": never committed
    with Subscriber(mqtt_cfg(), client_id=client_id, ledger=Ledger(ledger)) as sub:
        events = collect(sub, n_transitions(1))
        (again,) = [e for e in events if isinstance(e, Transition)]
        assert again.seq == 2
        sub.commit(again)
        time.sleep(0.3)  # let a (wrong) redelivery of seq 1 arrive, if it were coming
        extra = collect(sub, lambda _e: True, timeout=5) if sub.get(0.2) else []
        assert not [e for e in extra if isinstance(e, Transition)]
    assert Ledger(ledger).counts() == {"done": 2}


def test_a_durable_subscriber_drops_a_late_copy_from_a_superseded_epoch_it_handled(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    with Subscriber(mqtt_cfg(), client_id=cid(), ledger=Ledger(tmp_path / "l.db")) as sub:
        old = agent.transition("web", u, 0)
        wire.send(*old)
        agent.new_epoch("e2")
        wire.send(*agent.transition("web", u, 0))
        for t in [e for e in collect(sub, n_transitions(2)) if isinstance(e, Transition)]:
            sub.commit(t)
        wire.send(*old)  # stale to the chain tracker, handled says the ledger
        wire.send(*agent.transition("web", u, 0))
        got = [e for e in collect(sub, n_transitions(1)) if isinstance(e, Transition)]
        assert [(t.epoch, t.seq) for t in got] == [("e2", 2)]
        assert sub.counters["duplicates"] == 1


def test_bad_input_from_the_bus_is_counted_and_never_stops_the_subscriber(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    topic, good = agent.transition("web", u, 0)
    body = json.loads(good.encode())
    with Subscriber(mqtt_cfg(), client_id=cid()) as sub:
        wire.send(topic, b"{not json")
        wire.send(topic, json.dumps({**body, "schema": 99}).encode())
        wire.send(f"{prefix}/node1/web/vcpu/x/transition", good.encode())
        wire.send(f"{prefix}/node1/%zz/state", b"{}")
        wire.send(topic, b"[" * (10 * 1024 * 1024))  # a 10 MB body
        wire.send(topic, json.dumps({**body, "vcpu": 5}).encode())  # not this topic's
        wire.send(topic, good)
        with capture_logs() as logged:
            events = collect(sub, n_transitions(1), timeout=20)
        assert [e for e in events if isinstance(e, Transition)] == [good]
        # a lasting fault: one line for the burst, not one per message
        assert [e["event"] for e in logged] == ["client.bad_message"]
        reasons = sorted(e.reason for e in events if isinstance(e, BadMessage))
        assert reasons == ["json", "mismatch", "schema", "too-large", "topic", "topic"]
        assert sub.bad["topic"] == 2


def test_the_asyncio_iterator_delivers_the_same_events(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    sent = [agent.transition("web", u, 0) for _ in range(3)]

    async def main() -> list[Transition]:
        got: list[Transition] = []
        with Subscriber(mqtt_cfg(), client_id=cid()) as sub:
            loop = asyncio.get_running_loop()

            def send_all() -> None:
                for m in sent:
                    wire.send(*m)

            loop.call_later(0.2, send_all)
            async with asyncio.timeout(10):
                async for event in sub.aevents():
                    if isinstance(event, Transition):
                        got.append(event)
                        if len(got) == 3:
                            break
        return got

    assert asyncio.run(main()) == [t for _, t in sent]


def test_a_selection_subscribes_to_one_vcpu_of_one_domain_only(
    wire: Wire, mqtt_cfg: MakeCfg, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u, v = new_uuid(), new_uuid()
    selection = Selection(hosts=("node1",), domains=("my vm/1",), vcpus=(1,))
    with Subscriber(mqtt_cfg(), client_id=cid(), selection=selection) as sub:
        wire.send(*agent.transition("other", v, 1))
        wire.send(*agent.transition("my vm/1", u, 0))
        topic, wanted = agent.transition("my vm/1", u, 1)
        wire.send(topic, wanted)
        events = collect(sub, n_transitions(1))
        assert [e for e in events if isinstance(e, Transition)] == [wanted]
        assert sub.get(0.3) is None


def test_an_agents_client_id_is_refused(mqtt_cfg: MakeCfg) -> None:
    with pytest.raises(ValueError, match="agent"):
        Subscriber(mqtt_cfg(), client_id="vcpu-agent-node1")


def test_an_unreachable_broker_is_a_client_error(prefix: str) -> None:
    dead = Mosquitto()  # never started: nothing listens on its port
    try:
        with pytest.raises(ClientError):
            Subscriber(mqtt_section(dead, prefix), client_id=cid()).connect(timeout=1.5)
    finally:
        dead.close()
