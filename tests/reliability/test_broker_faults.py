"""Broker outages, agent kills and SIGTERM against a real mosquitto and the real agent.

The agent runs as a real process (``driven_agent``: the CLI's ``main`` plus a thread
suspending/resuming and unplugging/replugging the test driver's ``test`` domain, or
the plain ``python -m agent run`` CLI). Every test owns its broker and stops and
restarts it by PID. What was produced is read from the agent's own seq counters
in its spool; what was delivered, from a real subscriber.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.payloads import Gap, Status, VcpuStatePayload, decode, parse_rfc3339
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed, wait_until
from tests.reliability.fault_harness import (
    AGENT,
    TEST_DOMAIN_UUID,
    agent_config,
    compare,
    record_figure,
    spool_backlog,
    spool_entries,
    spool_seqs,
)

DRIVEN = [sys.executable, "-m", "tests.reliability.driven_agent"]

# A test-driver node with the same ``test`` domain (same UUID) as test:///default, for
# the restarted CLI agent: its retained vCPU state carries the persisted seq.
NODE_XML = f"""<node>
  <domain type='test'>
    <name>test</name>
    <uuid>{TEST_DOMAIN_UUID}</uuid>
    <memory>8388608</memory>
    <vcpu>2</vcpu>
    <os><type>hvm</type></os>
  </domain>
</node>
"""


def statuses(sub: Feed) -> list[tuple[float, Status]]:
    out = []
    for m in sub.snapshot():
        if m.topic.endswith("/status"):
            body = decode(m.payload)
            assert isinstance(body, Status)
            out.append((m.wall, body))
    return out


def wait_replugged(agent: AgentProcess, cycles: int, timeout: float = 30.0) -> None:
    """Until the agent has published the driver's last step of every cycle (vCPU 1
    plugged back: offline -> running), so the spool holds everything produced."""

    def replugs() -> int:
        return sum(
            e.get("vcpu") == 1 and (e.get("before"), e.get("after")) == ("offline", "running")
            for e in agent.events("vcpu.transition")
        )

    agent.wait_log("driver.done", timeout=timeout)
    wait_until(lambda: replugs() >= cycles, timeout, f"{cycles} replugs published")


def stop_agent(agent: AgentProcess, sig: int = signal.SIGTERM) -> tuple[int, float]:
    start = time.monotonic()
    agent.signal(sig)
    status = agent.wait(timeout=10)
    return status, time.monotonic() - start


def test_every_event_produced_during_a_broker_outage_is_delivered_in_order_afterwards(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
    spawn: Callable[..., AgentProcess],
) -> None:
    broker = make_broker(persistent=True)
    sub = make_subscriber(broker.port, f"{prefix}/#")
    spool = tmp / "spool.sqlite3"
    cfg = agent_config(tmp / "agent.toml", port=broker.port, prefix=prefix, spool=spool)
    agent = spawn([*DRIVEN, str(cfg), "6"])
    agent.wait_log("mqtt.connected")
    time.sleep(1.3)  # the driver is producing events now
    broker.stop()
    time.sleep(3.0)  # events keep coming while the broker is gone
    restarted_at = time.time()
    broker.start()
    agent.wait_log("driver.done", timeout=20)
    agent.wait_log("mqtt.connected", count=2)
    time.sleep(1.0)  # the last samples' events
    status, took = stop_agent(agent)
    assert (status, took < 5.0) == (0, True), agent.raw()[-2000:]

    produced = spool_seqs(spool)
    assert spool_backlog(spool) == 0
    sub.wait(lambda: compare(produced, sub.snapshot()).delivered == sum(produced.values()))
    result = compare(produced, sub.snapshot())
    assert len(produced) >= 3  # the domain's lifecycle and at least two vCPUs
    assert result.missing == {}
    assert result.out_of_order == {}
    assert result.produced == result.delivered
    result.record("broker stopped 3 s, restarted (persistent subscriber)")

    # After the reconnect: online again, and the retained vCPU states repaired.
    # (mosquitto may first deliver the last will it fired when it went down.)
    after = [s for at, s in statuses(sub) if at >= restarted_at]
    assert any(s.status == "online" and parse_rfc3339(s.at) >= restarted_at for s in after)
    assert after[-1].status == "offline"  # the clean stop
    states_after = {
        m.topic for m in sub.snapshot() if m.wall >= restarted_at and m.topic.endswith("/state")
    }
    assert {f"{prefix}/rel-host/test/vcpu/0/state", f"{prefix}/rel-host/test/state"} <= states_after
    # It retried while the broker was down: one line when the fault started, one
    # when it ended with the count (a lasting fault, never a line per attempt).
    assert len(agent.events("mqtt.connect_failed")) == 1
    (ended,) = agent.events("mqtt.connect_failed.ended")
    assert int(str(ended["count"])) >= 2


def test_an_agent_killed_during_an_outage_delivers_everything_after_a_restart(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
    spawn: Callable[..., AgentProcess],
) -> None:
    broker = make_broker()
    broker.stop()  # down before the agent ever connects
    spool = tmp / "spool.sqlite3"
    cfg = agent_config(tmp / "agent.toml", port=broker.port, prefix=prefix, spool=spool)
    first = spawn([*DRIVEN, str(cfg), "3"])
    wait_replugged(first, 3)
    stop_agent(first, signal.SIGKILL)

    produced = spool_seqs(spool)
    assert spool_backlog(spool) == sum(produced.values()) > 0  # nothing was sent

    broker.start()
    sub = make_subscriber(broker.port, f"{prefix}/#")
    node = tmp / "node.xml"
    node.write_text(NODE_XML)
    cfg2 = agent_config(
        tmp / "agent2.toml", port=broker.port, prefix=prefix, spool=spool, uri=f"test://{node}"
    )
    second = spawn([*AGENT, "run", "--config", str(cfg2)])  # the real CLI
    sub.wait(lambda: compare(produced, sub.snapshot()).delivered == sum(produced.values()))
    result = compare(produced, sub.snapshot())
    assert (result.missing, result.out_of_order) == ({}, {})
    result.record("agent SIGKILLed during an outage, restarted via the CLI")

    # Seqs survived the kill: the new process's retained state of vCPU 0 carries the
    # seq of the last transition the killed one produced (0 if they had restarted).
    def vcpu0_seq() -> int | None:
        for m in reversed(sub.snapshot()):
            if m.topic == f"{prefix}/rel-host/test/vcpu/0/state":
                body = decode(m.payload)
                assert isinstance(body, VcpuStatePayload)
                return body.seq
        return None

    sub.wait(lambda: vcpu0_seq() is not None)
    assert vcpu0_seq() == produced[(TEST_DOMAIN_UUID, 0)] > 0

    status, took = stop_agent(second)
    assert status == 0
    assert took < 5.0
    sub.wait(lambda: statuses(sub)[-1][1].status == "offline")
    assert spool_backlog(spool) == 0


def test_sigterm_during_an_outage_exits_at_once_and_keeps_every_event_spooled(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    spawn: Callable[..., AgentProcess],
) -> None:
    broker = make_broker()
    broker.stop()
    spool = tmp / "spool.sqlite3"
    cfg = agent_config(tmp / "agent.toml", port=broker.port, prefix=prefix, spool=spool)
    agent = spawn([*DRIVEN, str(cfg), "1"])
    wait_replugged(agent, 1)
    status, took = stop_agent(agent)
    assert status == 0
    assert took < 5.0
    produced = spool_seqs(spool)
    assert spool_backlog(spool) == sum(produced.values()) >= 4  # 2 lifecycle + transitions
    assert agent.events("mqtt.stopped")[-1]["unacknowledged"] == spool_entries(spool)


def test_a_full_spool_drops_the_oldest_events_and_publishes_one_gap_marker_with_the_count(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
    spawn: Callable[..., AgentProcess],
) -> None:
    broker = make_broker()
    broker.stop()
    spool = tmp / "spool.sqlite3"
    capacity = 5
    cfg = agent_config(
        tmp / "agent.toml", port=broker.port, prefix=prefix, spool=spool, max_events=capacity
    )
    first = spawn([*DRIVEN, str(cfg), "3"])
    wait_replugged(first, 3)
    assert stop_agent(first)[0] == 0
    produced = sum(spool_seqs(spool).values())
    assert produced > capacity
    # The bound counts every queued entry: events and the (coalesced) retained states.
    assert spool_entries(spool) == capacity
    with sqlite3.connect(spool) as db:
        dropped = int(db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])
    assert dropped > 0
    assert first.events("spool.overflow")

    broker.start()
    sub = make_subscriber(broker.port, f"{prefix}/#")
    node = tmp / "node.xml"
    node.write_text(NODE_XML)
    cfg2 = agent_config(
        tmp / "agent2.toml",
        port=broker.port,
        prefix=prefix,
        spool=spool,
        uri=f"test://{node}",
        max_events=capacity,
    )
    second = spawn([*AGENT, "run", "--config", str(cfg2)])
    sub.wait(lambda: any(m.topic == f"{prefix}/rel-host/gap" for m in sub.snapshot()))
    sub.wait(lambda: spool_backlog(spool) == 0)
    assert stop_agent(second)[0] == 0

    # The first gap announces the first run's drops, before any event. The new run
    # may overflow this 5-entry queue again with its own first states (before it
    # connects, or while the backlog drains): each later gap announces only the new
    # drops, so the gaps add up to the spool's total, every drop announced once.
    gaps = [decode(m.payload) for m in sub.snapshot() if m.topic == f"{prefix}/rel-host/gap"]
    assert all(isinstance(g, Gap) for g in gaps)
    first_gap = gaps[0]
    assert isinstance(first_gap, Gap)
    assert first_gap.dropped == first_gap.dropped_total >= dropped  # + drops before connecting
    with sqlite3.connect(spool) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    assert sum(g.dropped for g in gaps if isinstance(g, Gap)) == meta["dropped"]
    assert meta["gap_reported"] == meta["dropped"]
    events = [m for m in sub.snapshot() if m.topic.endswith(("/transition", "/lifecycle"))]
    first_gap_at = next(i for i, m in enumerate(sub.snapshot()) if m.topic.endswith("/gap"))
    assert first_gap_at < sub.snapshot().index(events[0])  # the gap first
    gap = first_gap
    record_figure(
        f"spool overflow during an outage (max_events={capacity})",
        produced,
        len(events),
        0,
        f"gap marker dropped={gap.dropped}",
    )
