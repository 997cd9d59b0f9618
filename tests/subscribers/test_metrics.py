"""``vcpu-agent metrics``: scraped over HTTP while the fake agent publishes."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Bridge, parse_listen
from lab.mosquitto import Mosquitto, free_port
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import FakeAgent, new_uuid
from tests.subscribers.test_watch import EXE, config_file

ROOT = Path(__file__).parent.parent.parent
DASHBOARD = ROOT / "docs" / "grafana-vcpu-agent.json"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def metrics_port(bus: Mosquitto, prefix: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            str(EXE),
            "metrics",
            "--config",
            str(config_file(tmp_path, bus.port, prefix)),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port
    proc.terminate()
    proc.wait(10)


def scrape_until(port: int, done: Callable[[str], bool], timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            text = ""
        if text and done(text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"metrics never matched:\n{text}")


@pytest.mark.mqtt
def test_scraped_metrics_match_the_transitions_sent(
    wire: Wire, metrics_port: int, prefix: str
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.status(), retain=True)
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    scrape_until(metrics_port, lambda t: value(t, "vcpu_host_online", host="node1") == 1.0)
    for to in ("halted", "running", "halted"):
        wire.send(*agent.transition("web", u, 0, to))  # 1.5 s in each 'from'
    agent.transition("web", u, 0, "running")  # lost on the way
    wire.send(*agent.transition("web", u, 0, "halted"))
    wire.send(f"{prefix}/node1/web/vcpu/0/transition", b"{oops")

    def settled(t: str) -> bool:
        return value(t, "vcpu_bad_messages_total", reason="json") == 1.0

    text = scrape_until(metrics_port, settled)
    assert (
        value(
            text,
            "vcpu_transitions_total",
            host="node1",
            domain="web",
            **{"from": "running", "to": "halted"},
        )
        == 3.0
    )
    assert (
        value(
            text,
            "vcpu_transitions_total",
            host="node1",
            domain="web",
            **{"from": "halted", "to": "running"},
        )
        == 1.0
    )
    assert (
        value(
            text, "vcpu_state_seconds_total", host="node1", domain="web", vcpu="0", state="running"
        )
        == 4.5
    )
    assert value(text, "vcpu_state", host="node1", domain="web", vcpu="0", state="halted") == 1.0
    assert value(text, "vcpu_state", host="node1", domain="web", vcpu="0", state="running") == 0.0
    assert value(text, "vcpu_missing_transitions_total", host="node1", explained="false") == 1.0
    age = value(text, "vcpu_host_last_event_age_seconds", host="node1")
    assert age is not None
    assert 0 <= age < 15


def exported_names() -> set[str]:
    """What a scrape can show: gauges by name, counters as ``<name>_total``."""
    names = set()
    for family in Bridge().registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_every_dashboard_query_uses_only_metrics_the_bridge_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bvcpu_[a-z_]+\b", target["expr"]))
    assert used
    assert used <= names, used - names
    # and every counter family shows up somewhere on the dashboard
    assert {"vcpu_state", "vcpu_transitions_total", "vcpu_state_seconds_total"} <= used


def test_listen_takes_an_address_and_a_port() -> None:
    assert parse_listen("127.0.0.1:9847") == ("127.0.0.1", 9847)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="ADDRESS:PORT"):
        parse_listen("localhost")
