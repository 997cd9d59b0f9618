"""``vcpu-agent watch`` as people run it: the installed command, a real mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.chain import Event, SeqGap, Synced
from agent.watch import View, event_dict
from lab.mosquitto import Mosquitto, free_port
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import FakeAgent, new_uuid

EXE = Path(sys.executable).parent / "vcpu-agent"


def config_file(tmp_path: Path, port: int, prefix: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "{prefix}"\n'
        '[log]\nformat = "json"\n'
    )
    return path


def watch(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), "watch", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def publish_tree(wire: Wire, agent: FakeAgent, domains: dict[str, int]) -> dict[str, str]:
    uuids = {}
    for name, vcpus in domains.items():
        uuids[name] = u = new_uuid()
        wire.send(*agent.domain_state(name, u, vcpus), retain=True)
        for n in range(vcpus):
            wire.send(*agent.vcpu_state(name, u, n), retain=True)
    return uuids


@pytest.mark.mqtt
def test_watch_once_json_prints_one_object_per_retained_vcpu_and_exits_0(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    publish_tree(wire, agent, {"web-01": 2, "my vm/1": 3})
    done = watch(config_file(tmp_path, bus.port, prefix), "--once", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["domain"], r["vcpu"], r["state"]) for r in rows] == [
        ("my vm/1", 0, "running"),
        ("my vm/1", 1, "running"),
        ("my vm/1", 2, "running"),
        ("web-01", 0, "running"),
        ("web-01", 1, "running"),
    ]
    assert all(r["kind"] == "vcpu_state" and r["host"] == "node1" for r in rows)


@pytest.mark.mqtt
def test_watch_once_waits_for_a_current_vcpu_whose_state_is_not_there_yet(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.domain_state("web", u, 2), retain=True)
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    late = threading.Timer(1.0, lambda: wire.send(*agent.vcpu_state("web", u, 1), retain=True))
    late.start()
    start = time.monotonic()
    done = watch(config_file(tmp_path, bus.port, prefix), "--once", "--json", "--timeout", "20")
    late.join()
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert time.monotonic() - start < 10  # returned on the event, not at the timeout


@pytest.mark.mqtt
def test_watch_once_gives_up_at_its_timeout_naming_the_missing_vcpus(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.domain_state("web", u, 2), retain=True)
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    done = watch(config_file(tmp_path, bus.port, prefix), "--once", "--json", "--timeout", "1")
    assert done.returncode == 75
    assert len(done.stdout.splitlines()) == 1
    assert "missing node1/web/vcpu/1" in done.stderr


def test_watch_says_so_when_the_broker_cannot_be_reached(prefix: str, tmp_path: Path) -> None:
    done = watch(config_file(tmp_path, free_port(), prefix), "--once", "--timeout", "1")
    assert done.returncode == 69
    assert "vcpu-agent watch:" in done.stderr


def test_the_view_keeps_the_newest_state_whatever_order_state_and_transition_arrive_in() -> None:
    agent = FakeAgent()
    u = new_uuid()
    _, s0 = agent.vcpu_state("web", u, 0)
    _, t1 = agent.transition("web", u, 0, "halted")
    _, s1 = agent.vcpu_state("web", u, 0)
    orders: list[list[Event]] = [[s0, t1, s1], [s0, s1, t1], [s1, s0, t1]]
    for order in orders:
        view = View()
        for event in order:
            view.apply(event)
        (row,) = view.rows()
        assert (row.state, row.seq) == ("halted", 1), order


def test_every_event_has_a_json_form_with_a_kind() -> None:
    gap = SeqGap(host="h", domain="d", uuid="u", vcpu=0, epoch="e", first=2, last=3, explained=True)
    assert event_dict(gap)["kind"] == "seq_gap"
    assert event_dict(Synced()) == {"kind": "synced"}


@pytest.mark.mqtt
def test_watch_once_with_filters_waits_only_for_the_vcpus_it_asked_for(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    publish_tree(wire, agent, {"web": 3, "db": 2})
    done = watch(
        config_file(tmp_path, bus.port, prefix),
        *("--once", "--json", "--domain", "web", "--vcpu", "2", "--timeout", "5"),
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["domain"], r["vcpu"]) for r in rows] == [("web", 2)]
