"""Whole-domain conditions (react --when): pure episodes, then react with a real broker."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import pytest

from agent.chain import Event
from agent.conditions import Condition, DomainWatch
from agent.payloads import parse_rfc3339
from lab.mosquitto import Mosquitto
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import AT, FakeAgent, new_uuid
from tests.subscribers.test_react import React, hook_lines, wait_hook_line
from tests.subscribers.test_watch import config_file

T0 = parse_rfc3339(AT)
U = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def running_domain(agent: FakeAgent, vcpus: int) -> list[Event]:
    events: list[Event] = [agent.domain_state("web", U, vcpus)[1]]
    events += [agent.vcpu_state("web", U, n)[1] for n in range(vcpus)]
    return events


def feed(watch: DomainWatch, events: list[Event]) -> None:
    for event in events:
        watch.apply(event)


def test_all_halted_fires_once_when_every_current_vcpu_has_been_halted_long_enough() -> None:
    agent = FakeAgent()
    watch = DomainWatch((Condition.parse("all-halted=60"),))
    feed(watch, running_domain(agent, 2))
    watch.apply(agent.transition("web", U, 0, "halted")[1])
    assert watch.next_due(T0) is None  # vCPU 1 still runs
    watch.apply(agent.transition("web", U, 1, "halted")[1])
    assert watch.due(T0 + 59) == []
    assert watch.next_due(T0 + 59) == pytest.approx(1.0)
    (firing,) = watch.due(T0 + 60)
    assert (firing.condition, firing.domain, firing.vcpus) == ("all-halted", "web", (0, 1))
    assert firing.key == ("e1", 1, 1)  # completed by vCPU 1's transition seq 1
    assert watch.due(T0 + 600) == []  # once per episode


def test_a_new_episode_after_a_vcpu_ran_again_fires_again() -> None:
    agent = FakeAgent()
    watch = DomainWatch((Condition.parse("all-halted=0"),))
    feed(watch, running_domain(agent, 1))
    watch.apply(agent.transition("web", U, 0, "halted")[1])
    assert len(watch.due(T0)) == 1
    watch.apply(agent.transition("web", U, 0, "running")[1])
    assert watch.due(T0) == []
    watch.apply(agent.transition("web", U, 0, "halted")[1])
    (again,) = watch.due(T0)
    assert again.key == ("e1", 0, 3)


def test_an_episode_has_the_same_identity_when_rebuilt_from_the_retained_tree() -> None:
    agent = FakeAgent()
    live = DomainWatch((Condition.parse("all-halted=0"),))
    feed(live, running_domain(agent, 2))
    for n in (0, 1):
        live.apply(agent.transition("web", U, n, "halted")[1])
    (first,) = live.due(T0)
    restarted = DomainWatch((Condition.parse("all-halted=0"),))
    feed(restarted, running_domain(agent, 2))  # the retained states after those transitions
    (again,) = restarted.due(T0)
    assert again.key == first.key


def test_a_paused_domain_is_not_all_halted_and_any_unknown_names_the_vcpu() -> None:
    agent = FakeAgent()
    watch = DomainWatch((Condition.parse("all-halted=0"), Condition.parse("any-unknown=5")))
    _, domain = agent.domain_state("web", U, 2)
    feed(watch, [*running_domain(agent, 2), dataclasses.replace(domain, state="paused")])
    for n in (0, 1):
        watch.apply(agent.transition("web", U, n, "halted")[1])
    assert watch.due(T0) == []
    watch.apply(agent.transition("web", U, 1, "unknown")[1])
    assert watch.due(T0 + 4) == []
    (unknown,) = watch.due(T0 + 5)
    assert (unknown.condition, unknown.vcpus) == ("any-unknown", (1,))


def test_when_takes_a_known_condition_and_seconds() -> None:
    assert Condition.parse("any-unknown=2.5") == Condition("any-unknown", 2.5)
    for bad in ("all-halted", "all-halted=-1", "sometimes=3", "all-halted=nan"):
        with pytest.raises(ValueError, match="--when"):
            Condition.parse(bad)


@pytest.mark.mqtt
def test_react_when_all_halted_runs_once_per_episode_even_across_a_restart(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.domain_state("web", u, 2), retain=True)
    for n in range(2):
        wire.send(*agent.vcpu_state("web", u, n), retain=True)
    config = config_file(tmp_path, bus.port, prefix)
    client_id = f"vcpu-react-test-{uuid.uuid4().hex[:8]}"
    hook = (
        "import json, os, sys\n"
        "body = json.load(sys.stdin)\n"
        "with open(os.environ['HOOK_LOG'], 'a') as f:\n"
        "    f.write(f\"{os.environ['VCPU_CONDITION']} {os.environ['VCPU_DOMAIN']} "
        "{os.environ['VCPU_VCPUS']} {os.environ['VCPU_RERUN']} {body['kind']}\\n\")\n"
    )
    args = ("--when", "all-halted=0.5")
    react = React(config, tmp_path, client_id, *args, hook=hook)
    try:
        for n in range(2):
            topic, t = agent.transition("web", u, n, "halted")
            wire.send(topic, t)
            wire.send(*agent.vcpu_state("web", u, n), retain=True)
        wait_hook_line(react.hook_log, "all-halted web 0,1 0 condition")
        react.wait_log("react.condition_done")
        assert react.stop() == 0
        react = React(config, tmp_path, client_id, *args, hook=hook)
        time.sleep(1.5)  # the retained tree shows the same episode: it must not fire again
        assert react.stop() == 0
        assert hook_lines(react.hook_log) == ["all-halted web 0,1 0 condition"]
    finally:
        if react.proc.poll() is None:
            react.kill()
