"""The issue's restart scenario, end to end on a real guest.

The broker is down; a vCPU changes and its transition waits in the spool; the
agent is SIGKILLed; the guest changes again while no agent runs; a new agent
starts on the same spool; the broker returns. A subscriber with a persistent
session must then hold one consistent story that equals the guest's truth: the
spooled transition, the change that happened while the agent was down (once,
marked ``resync``, from the state it was last told), then the live changes.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.payloads import Transition
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed, wait_until

pytestmark = pytest.mark.libvirt
INTERVAL = 0.25
STATE = {"busy": "running", "halted": "halted"}


def transitions_logged(agent: AgentProcess, domain: str) -> list[dict[str, object]]:
    return [
        e
        for e in agent.log_events()
        if e.get("event") == "vcpu.transition" and e.get("domain") == domain and e.get("vcpu") == 0
    ]


def test_a_change_while_the_agent_is_down_reaches_subscribers_once_as_a_resync_in_order(
    tmp_path: Path,
    prefix: str,
    pool: GuestPool,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
) -> None:
    broker = make_broker(persistent=True)
    sub = make_subscriber(broker.port, f"{prefix}/#")  # its session outlives the broker
    broker.stop()

    # Phases of 5 s: the second agent must start and decide within one phase.
    image = build_toggler_image(busy_s=5.0, halted_s=5.0, cache_dir=tmp_path)
    guest = pool.start(GuestSpec(image=image, virt_type="qemu"))
    host_id = f"restart-{secrets.token_hex(3)}"

    def agent() -> AgentProcess:
        # Both agents share one workdir, so one config and one spool file.
        return AgentProcess.lab(
            workdir=tmp_path / "agent",
            broker_port=broker.port,
            prefix=prefix,
            host_id=host_id,
            interval=INTERVAL,
            libvirt_keys={"reconnect_min": 0.2, "reconnect_max": 1.0},
        )

    first = agent()
    first.start()
    try:
        wait_until(lambda: bool(transitions_logged(first, guest.name)), 40, "a spooled transition")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.stop()
    killed_at = time.time()
    before_restart = transitions_logged(first, guest.name)
    spooled = before_restart[-1]

    def change_while_down() -> int | None:
        # The guest's next change into another state than the spooled one: the
        # spooled change's own marker may arrive after the kill (a loaded host; CI
        # once started the second agent on it, before the change it was to resync).
        for i, m in enumerate(guest.truth.markers()):
            if m.t_wall > killed_at and STATE[m.phase] != spooled["after"]:
                return i
        return None

    wait_until(lambda: change_while_down() is not None, 20, "a change while no agent runs")
    down_at = change_while_down()
    assert down_at is not None

    second = agent()
    second.start()
    try:

        def second_transitions() -> list[dict[str, object]]:
            # One log file for both agents: the second's lines come after the first's.
            return transitions_logged(second, guest.name)[len(before_restart) :]

        wait_until(lambda: bool(second_transitions()), 20, "the resync transition")
        broker.start()
        live_marker = len(guest.truth.markers()) + 1
        guest.truth.wait_for(live_marker, timeout_s=20)  # and one live change
        wait_until(lambda: len(second_transitions()) >= 2, 20, "the live transition")
        last_seq = int(str(second_transitions()[-1]["seq"]))

        def received() -> list[Transition]:
            out = []
            for m in sub.snapshot():
                if m.topic.endswith(f"/{guest.name}/vcpu/0/transition"):
                    body = m.body
                    assert isinstance(body, Transition)
                    out.append(body)
            return out

        sub.wait(lambda: any(t.seq == last_seq for t in received()), timeout=30)
    finally:
        assert second.stop() == 0

    # Duplicates (QoS 1 redelivery) are dropped by seq; the story is then exact.
    story: dict[int, Transition] = {}
    for t in received():
        story.setdefault(t.seq, t)
    chain = [story[s] for s in sorted(story)]
    assert [t.seq for t in chain] == list(range(1, len(chain) + 1)), "no gap, no repeat"
    for before, after in itertools.pairwise(chain):
        assert after.from_state == before.to_state, (before, after)
    assert len({t.epoch for t in chain}) == 1
    # The spooled transition, then the change made while no agent ran (a resync,
    # from what subscribers were told), then live changes only.
    by_seq = {t.seq: t for t in chain}
    spooled_t = by_seq[int(str(spooled["seq"]))]
    assert not spooled_t.resync
    resync = by_seq[spooled_t.seq + 1]
    assert resync.resync
    markers = guest.truth.markers()
    assert resync.to_state == STATE[markers[down_at].phase]
    assert [t.resync for t in chain if t.seq > resync.seq] == [False] * (len(chain) - resync.seq)
    assert chain[-1].to_state == STATE[markers[live_marker - 1].phase]
