"""The subscriber side against a real ``vcpu-agent run`` (libvirt's test driver, memory
spool, a real mosquitto): watch agrees with snapshot, live messages fit the schemas."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from agent.chain import BadMessage, Synced
from agent.client import Subscriber
from agent.config import load
from agent.payloads import Payload, VcpuStatePayload
from lab.mosquitto import Mosquitto
from lab.rig import config_document, write_config
from tests.subscribers.test_watch import EXE

SCHEMA_DIR = Path(__file__).parent.parent.parent / "docs" / "schema"
pytestmark = pytest.mark.mqtt


@pytest.fixture
def agent_config(bus: Mosquitto, prefix: str, tmp_path: Path) -> Iterator[Path]:
    path = write_config(
        tmp_path / "config.toml",
        config_document(
            port=bus.port, prefix=prefix, host_id="testhost", uri="test:///default", interval=0.2
        ),
    )
    agent = subprocess.Popen(
        [str(EXE), "run", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Up when its first sample is on the bus (a retained vCPU state): before that, the
    # retained tree is (rightly) empty and watch --once reports it so.
    with Subscriber(load(path).mqtt, client_id="test-wait-ready") as sub:
        deadline = time.monotonic() + 20
        while not isinstance(sub.get(1), VcpuStatePayload):
            assert time.monotonic() < deadline, "the agent published no vCPU state"
    yield path
    agent.terminate()
    agent.wait(15)


def test_watch_once_reports_what_snapshot_reports_for_a_test_driver_agent(
    agent_config: Path,
) -> None:
    watch = subprocess.run(
        [str(EXE), "watch", "--config", str(agent_config), "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    snapshot = subprocess.run(
        [str(EXE), "snapshot", "--config", str(agent_config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert watch.returncode == 0, watch.stderr
    seen = {
        (r["domain"], r["vcpu"], r["state"]) for r in map(json.loads, watch.stdout.splitlines())
    }
    doc = json.loads(snapshot.stdout)
    sampled = {(v["domain"], v["vcpu"], v["state"]) for d in doc["domains"] for v in d["vcpus"]}
    assert seen == sampled
    assert seen  # the test driver's domain "test" and its vCPUs


def test_every_live_message_of_a_real_agent_fits_its_json_schema(agent_config: Path) -> None:
    cfg = load(agent_config)
    validators = {
        p.stem: Draft202012Validator(json.loads(p.read_text())) for p in SCHEMA_DIR.glob("*.json")
    }
    kinds: set[str] = set()
    with Subscriber(cfg.mqtt, client_id="test-schema-live") as sub:
        deadline = time.monotonic() + 20
        while {"status", "domain_state", "vcpu_state"} - kinds:
            assert time.monotonic() < deadline, kinds
            event = sub.get(1)
            assert not isinstance(event, BadMessage), event
            if isinstance(event, Payload):
                body = json.loads(event.encode())
                errors = [e.message for e in validators[event.KIND].iter_errors(body)]
                assert not errors, (event.KIND, errors)
                kinds.add(event.KIND)
            elif event is not None:
                assert isinstance(event, Synced), event
