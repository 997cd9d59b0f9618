"""The real entry point, as systemd runs it: a subprocess with NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.payloads import DomainStatePayload, VcpuStatePayload, decode
from lab.mosquitto import Mosquitto
from tests.conftest import Subscriber

pytestmark = pytest.mark.mqtt
AGENT = [sys.executable, "-m", "agent"]


def write_config(tmp_path: Path, broker: Mosquitto, prefix: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[agent]\nhost_id = "clihost"\n'
        '[libvirt]\nuri = "test:///default"\n'
        "[sampling]\ninterval = 0.2\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntopic_prefix = "{prefix}"\n'
        'client_id = "cli-test"\n'
        f'[spool]\npath = "{tmp_path / "spool.sqlite3"}"\n'
        '[log]\nformat = "json"\nlevel = "info"\n'
    )
    return path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)
    yield sock
    sock.close()


def notifications_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while True:
        data = sock.recv(4096).decode()
        seen.append(data)
        if wanted in data.splitlines():
            return seen


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with (tmp_path / "agent.log").open("wb") as log:
            proc = subprocess.Popen(
                [*AGENT, "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_notifies_ready_after_the_first_sample_and_feeds_the_watchdog(
    tmp_path: Path,
    broker: Mosquitto,
    prefix: str,
    notify_socket: socket.socket,
    agent_process: Callable[..., subprocess.Popen[bytes]],
    subscribe: Callable[[str], Subscriber],
) -> None:
    sub = subscribe(f"{prefix}/#")
    proc = agent_process(
        write_config(tmp_path, broker, prefix), {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    )
    seen = notifications_until(notify_socket, "READY=1")
    # Every vCPU state is published by the time READY is sent.
    sub.wait_for(lambda m: m.topic.endswith("/vcpu/1/state"), timeout=5)
    assert any("WATCHDOG=1" in s for s in seen)  # the first completed sample pings
    notifications_until(notify_socket, "WATCHDOG=1")  # and the next ones too

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    notifications_until(notify_socket, "STOPPING=1")
    last = sub.wait_for(lambda m: m.topic == f"{prefix}/clihost/status", count=2)[-1]
    assert json.loads(last.payload)["status"] == "offline"
    assert last.retain
    lines = [json.loads(line) for line in (tmp_path / "agent.log").read_text().splitlines()]
    events = [line["event"] for line in lines]
    for expected in (
        "agent.starting",
        "libvirt.connected",
        "mqtt.connected",
        "agent.ready",
        "agent.stopping",
        "agent.stopped",
    ):
        assert expected in events


def test_the_last_will_says_offline_when_the_agent_is_killed(
    tmp_path: Path,
    broker: Mosquitto,
    prefix: str,
    agent_process: Callable[..., subprocess.Popen[bytes]],
    subscribe: Callable[[str], Subscriber],
) -> None:
    sub = subscribe(f"{prefix}/clihost/status")
    proc = agent_process(write_config(tmp_path, broker, prefix))
    [online] = sub.wait_for(lambda m: True)
    assert json.loads(online.payload)["status"] == "online"
    proc.kill()  # SIGKILL: no goodbye, the broker speaks the will
    proc.wait()
    [_, will] = sub.wait_for(lambda m: True, count=2)
    assert json.loads(will.payload)["status"] == "offline"
    assert will.retain


def test_snapshot_prints_the_seeds_state_names(capfd: pytest.CaptureFixture[str]) -> None:
    out = subprocess.run(
        [*AGENT, "snapshot", "--config", "/nonexistent-default.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 78  # an explicit config that does not exist
    cfg = Path(os.environ.get("TMPDIR", "/tmp")) / f"snap-{os.getpid()}.toml"
    cfg.write_text('[libvirt]\nuri = "test:///default"\n[log]\nformat = "json"\n')
    try:
        table = subprocess.run(
            [*AGENT, "snapshot", "--config", str(cfg), "--wait", "0.1"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "Domain:         test" in table.stdout
        assert "  State:        running" in table.stdout
        doc = json.loads(
            subprocess.run(
                [*AGENT, "snapshot", "--config", str(cfg), "--wait", "0.1", "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    finally:
        cfg.unlink()
    [dom] = [d for d in doc["domains"] if d["domain"] == "test"]
    assert isinstance(
        decode(json.dumps({k: v for k, v in dom.items() if k != "vcpus"})), DomainStatePayload
    )
    states = [decode(json.dumps(v)) for v in dom["vcpus"]]
    assert all(isinstance(s, VcpuStatePayload) for s in states)
    assert [(s.vcpu, s.state, s.label) for s in states] == [  # type: ignore[attr-defined]
        (0, "running", "running"),
        (1, "running", "running"),
    ]


def test_snapshot_exits_69_when_libvirt_cannot_be_reached(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[libvirt]\nuri = "qemu+unix:///system?socket={tmp_path}/none"\ncall_timeout = 5.0\n'
    )
    started = time.monotonic()
    out = subprocess.run(
        [*AGENT, "snapshot", "--config", str(cfg)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 69
    assert "cannot sample" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 30
