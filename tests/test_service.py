"""The agent end to end on the libvirt test driver and a real mosquitto.

The test driver (``test:///default``) is in-process: the agent runs in this
process on its own event loop thread, and the test drives domains through a
second, writable connection to the same driver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import libvirt
import pytest
from structlog.testing import capture_logs

from agent.config import Config
from agent.payloads import Lifecycle, Status, Transition, VcpuStatePayload, decode
from agent.service import Service
from agent.ticker import Pace
from agent.topics import Topics, parse_topic
from lab.mosquitto import Mosquitto
from lab.rig import Arrival, Feed, retained, wait_until
from tests.testdriver import RunningAgent, agent_config, start_domain, with_cleanup

pytestmark = pytest.mark.mqtt


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open("test:///default")
    yield c
    c.close()


@pytest.fixture
def domain(conn: libvirt.virConnect) -> Iterator[libvirt.virDomain]:
    """A fresh running test-driver domain with 2 of 4 vCPUs online."""
    dom = start_domain(conn, f"vm-{uuid.uuid4().hex[:8]}")
    yield dom
    with_cleanup(dom)


def payload_of(m: Arrival) -> object:
    return decode(m.payload) if m.payload else None


def is_state(prefix: str, domain: str, vcpu: int, state: str) -> Callable[[Arrival], bool]:
    topic = Topics(prefix=prefix, host="testhost").vcpu_state(domain, vcpu)

    def check(m: Arrival) -> bool:
        p = payload_of(m)
        return m.topic == topic and isinstance(p, VcpuStatePayload) and p.state == state

    return check


def test_the_agent_announces_itself_online_retained(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
) -> None:
    sub = subscribe(f"{prefix}/#")
    agent = run_agent(agent_config(broker, prefix))
    [online] = sub.wait_all(lambda m: m.topic == f"{prefix}/testhost/status")
    status = decode(online.payload)
    assert isinstance(status, Status)
    assert status.status == "online"
    assert agent.stop() == 0
    offline = sub.wait_all(lambda m: m.topic == f"{prefix}/testhost/status", count=2)[-1]
    assert json.loads(offline.payload)["status"] == "offline"
    # A subscriber arriving later sees the retained offline.
    late = subscribe(f"{prefix}/testhost/status")
    [kept] = late.wait_all(lambda m: True)
    assert kept.retain
    assert json.loads(kept.payload)["status"] == "offline"


def test_a_domain_proc_does_not_serve_is_sampled_every_libvirt_interval_not_every_tick(
    broker: Mosquitto,
    run_agent: Callable[[Config], RunningAgent],
    prefix: str,
    domain: libvirt.virDomain,
) -> None:
    # A test-driver domain has no QEMU thread to read from /proc, like a KVM
    # guest: it waits for the bulk call, every libvirt_interval (0.5 s), not for
    # every tick (0.05 s). Three bulk calls take at least ~1.4 s; at every tick
    # they would take 0.15 s.
    agent = run_agent(agent_config(broker, prefix, interval=0.05, libvirt_interval=0.5))
    wait_until(lambda: agent.service.samples >= 1, 15, "the first bulk call")
    first, began = agent.service.samples, time.monotonic()
    wait_until(lambda: agent.service.samples >= first + 3, 15, "three more bulk calls")
    assert time.monotonic() - began >= 1.0


def test_an_error_on_the_ticker_thread_stops_the_agent_with_it(
    broker: Mosquitto, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ticker runs the regular samples on a thread of its own: if it died
    # quietly, the agent would sample no more while looking alive.
    def broken(service: Service) -> Pace:
        raise RuntimeError("the ticker broke")

    monkeypatch.setattr(Service, "_pace", broken)
    service = Service(agent_config(broker, prefix))

    async def run() -> int:
        async with asyncio.timeout(30):
            return await service.run(handle_signals=False)

    with pytest.raises(RuntimeError, match="the ticker broke"):
        asyncio.run(run())


def test_a_re_sample_libvirt_does_not_answer_is_a_stall_like_a_bulk_call(
    broker: Mosquitto,
    prefix: str,
    domain: libvirt.virDomain,
    run_agent: Callable[[Config], RunningAgent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A frozen QEMU's monitor blocks whichever call reaches it first, a re-sample
    # as often as the bulk call (CI saw it): either is a stall, not a failure. The
    # stand-in hangs the re-sample's call (domainListGetStats) as that monitor would.
    release = threading.Event()

    def hung_monitor_stand_in(*_args: object) -> list[object]:
        release.wait(30)
        return []

    monkeypatch.setattr(libvirt.virConnect, "domainListGetStats", hung_monitor_stand_in)
    cfg = agent_config(broker, prefix)
    cfg = dataclasses.replace(cfg, libvirt=dataclasses.replace(cfg.libvirt, call_timeout=0.2))
    try:
        with capture_logs() as logs:
            agent = run_agent(cfg)
            wait_until(lambda: agent.service.samples >= 1, 15, "the first bulk call")
            resample = agent.service._sample_some({domain.UUIDString()})
            asyncio.run_coroutine_threadsafe(resample, agent.loop).result(10)
            assert agent.stop() == 0
    finally:
        release.set()
    events = [line["event"] for line in logs]
    assert "sample.stalled" in events
    assert "sample.failed" not in events


def test_a_running_domain_publishes_retained_state_for_every_vcpu(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    domain: libvirt.virDomain,
) -> None:
    sub = subscribe(f"{prefix}/#")
    run_agent(agent_config(broker, prefix))
    name = domain.name()
    running0 = sub.wait_all(is_state(prefix, name, 0, "running"))[0]
    sub.wait_all(is_state(prefix, name, 1, "running"))
    sub.wait_all(is_state(prefix, name, 2, "offline"))
    sub.wait_all(is_state(prefix, name, 3, "offline"))
    assert running0.retain
    assert running0.qos == 1
    body = decode(running0.payload)
    assert isinstance(body, VcpuStatePayload)
    assert (body.uuid, body.source, body.label) == (domain.UUIDString(), "vcpustate", "running")


def test_suspend_and_resume_publish_lifecycle_events_and_na_at_once(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    domain: libvirt.virDomain,
) -> None:
    sub = subscribe(f"{prefix}/#")
    # A 60 s interval: anything seen within the wait below came from the event.
    run_agent(agent_config(broker, prefix, interval=60.0))
    name = domain.name()
    sub.wait_all(is_state(prefix, name, 0, "running"))

    domain.suspend()
    topics = Topics(prefix=prefix, host="testhost")
    [suspended] = sub.wait_all(lambda m: m.topic == topics.lifecycle(name), timeout=10)
    event = decode(suspended.payload)
    assert isinstance(event, Lifecycle)
    assert (event.event, event.detail, event.seq) == ("suspended", "paused", 1)
    assert (suspended.qos, suspended.retain) == (1, False)
    sub.wait_all(is_state(prefix, name, 0, "n/a"), timeout=10)
    [t] = sub.wait_all(lambda m: m.topic == topics.vcpu_transition(name, 0), timeout=10)
    transition = decode(t.payload)
    assert isinstance(transition, Transition)
    assert (transition.from_state, transition.to_state, transition.seq) == ("running", "n/a", 1)
    assert (t.qos, t.retain) == (1, False)

    domain.resume()
    resumed = sub.wait_all(lambda m: m.topic == topics.lifecycle(name), count=2, timeout=10)[1]
    assert json.loads(resumed.payload)["event"] == "resumed"
    sub.wait_all(is_state(prefix, name, 0, "running"), count=2, timeout=10)
    back = sub.wait_all(lambda m: m.topic == topics.vcpu_transition(name, 0), count=2)[1]
    assert (json.loads(back.payload)["from"], json.loads(back.payload)["to"]) == ("n/a", "running")
    assert json.loads(back.payload)["seq"] == 2


def test_unplugging_and_plugging_vcpus_are_offline_transitions(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    domain: libvirt.virDomain,
) -> None:
    sub = subscribe(f"{prefix}/#")
    run_agent(agent_config(broker, prefix))
    name = domain.name()
    topics = Topics(prefix=prefix, host="testhost")
    sub.wait_all(is_state(prefix, name, 1, "running"))
    domain.setVcpusFlags(1, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    [down] = sub.wait_all(lambda m: m.topic == topics.vcpu_transition(name, 1))
    assert (json.loads(down.payload)["from"], json.loads(down.payload)["to"]) == (
        "running",
        "offline",
    )
    domain.setVcpusFlags(3, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    ups = sub.wait_all(
        lambda m: m.topic in (topics.vcpu_transition(name, 1), topics.vcpu_transition(name, 2)),
        count=3,
    )
    assert sorted(
        (parse_topic(prefix, m.topic).vcpu, json.loads(m.payload)["to"]) for m in ups[1:]
    ) == [(1, "running"), (2, "running")]
    assert not [m for m in sub.arrivals if m.topic == topics.vcpu_transition(name, 0)]


def test_destroying_a_domain_clears_its_retained_topics(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    domain: libvirt.virDomain,
) -> None:
    sub = subscribe(f"{prefix}/#")
    run_agent(agent_config(broker, prefix, interval=60.0))
    name = domain.name()
    topics = Topics(prefix=prefix, host="testhost")
    sub.wait_all(is_state(prefix, name, 3, "offline"))
    domain.destroy()  # transient: the domain is gone
    cleared = {topics.vcpu_state(name, n) for n in range(4)} | {topics.domain_state(name)}
    sub.wait_all(lambda m: m.topic in cleared and m.payload == b"", count=len(cleared), timeout=10)
    [stopped] = sub.wait_all(lambda m: m.topic == topics.lifecycle(name))
    assert (json.loads(stopped.payload)["event"], json.loads(stopped.payload)["detail"]) == (
        "stopped",
        "destroyed",
    )
    # A new subscriber finds nothing retained (the rig waits on a marker, not a sleep).
    assert (
        retained(broker.port, prefix, topics.domain_state(name).removesuffix("/state") + "/#") == {}
    )


# libvirt itself refuses '/' in names; topics.py's tests cover it anyway.
@pytest.mark.parametrize("name", ["a+b#c d", "ünïcødé ドメイン", "$SYS", "100%", "x" * 300])
def test_hostile_domain_names_become_topics_that_decode_back(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    conn: libvirt.virConnect,
    name: str,
) -> None:
    sub = subscribe(f"{prefix}/#")
    dom = start_domain(conn, name)
    try:
        run_agent(agent_config(broker, prefix))
        [m] = sub.wait_all(
            lambda m: (
                m.topic.endswith("/vcpu/0/state")
                and json.loads(m.payload)["uuid"] == dom.UUIDString()
            )
        )
        parsed = parse_topic(prefix, m.topic)
        assert (parsed.host, parsed.domain, parsed.vcpu) == ("testhost", name, 0)
        assert json.loads(m.payload)["domain"] == name
    finally:
        with_cleanup(dom)


def test_a_domain_whose_name_fits_no_topic_is_skipped_and_the_others_are_watched(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    conn: libvirt.virConnect,
    domain: libvirt.virDomain,
) -> None:
    sub = subscribe(f"{prefix}/#")
    huge = start_domain(conn, "n" * 70_000)  # its topics would pass MQTT's 65,535 bytes
    try:
        with capture_logs() as logs:
            agent = run_agent(agent_config(broker, prefix))
            sub.wait_all(is_state(prefix, domain.name(), 0, "running"))
            huge.suspend()  # a lifecycle event of the skipped domain: skipped too
            huge.resume()
            domain.suspend()
            sub.wait_all(is_state(prefix, domain.name(), 0, "n/a"), timeout=10)
            assert agent.thread.is_alive()
            assert agent.stop() == 0
    finally:
        with_cleanup(huge)
    skipped = [line for line in logs if line["event"] == "domain.skipped"]
    assert [line["uuid"] for line in skipped] == [huge.UUIDString()]  # logged once
    assert skipped[0]["name_bytes"] == 70_000
    assert not [a for a in sub.snapshot() if a.body is not None and "n" * 1000 in a.topic]


def test_mqtt_3_1_1_is_selectable(
    broker: Mosquitto,
    prefix: str,
    subscribe: Callable[[str], Feed],
    run_agent: Callable[[Config], RunningAgent],
    domain: libvirt.virDomain,
) -> None:
    client_id = f"agent-311-{prefix}"
    cfg = agent_config(broker, prefix)
    mqtt = dataclasses.replace(cfg.mqtt, protocol="3.1.1", client_id=client_id)
    sub = subscribe(f"{prefix}/#")
    run_agent(dataclasses.replace(cfg, mqtt=mqtt))
    [online] = sub.wait_all(lambda m: m.topic == f"{prefix}/testhost/status")
    assert json.loads(online.payload)["status"] == "online"
    state = sub.wait_all(is_state(prefix, domain.name(), 0, "running"))[0]
    assert (state.qos, state.retain) == (1, True)
    # The broker's own word on what was negotiated: mosquitto logs "p2" for
    # MQTT 3.1.1 and "p5" for MQTT 5 on every connect.
    connects = [
        line for line in broker.log_path.read_text().splitlines() if f" as {client_id} (" in line
    ]
    assert connects
    assert all(f" as {client_id} (p2," in line for line in connects), connects
