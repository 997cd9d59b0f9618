"""The systemd watchdog can be fed by the config it runs with.

The agent pings only after a completed sample, so the gap between pings is up to
one ``sampling.interval`` plus one bulk call of up to ``libvirt.call_timeout``.
Under the shipped unit's ``WatchdogSec=30``, ``sampling.interval = 45`` would get
the agent killed every 30 s; at start it extends the watchdog instead, with
sd_notify's ``WATCHDOG_USEC=``. These run the real CLI under a real notify socket,
with the variables set as systemd sets them (``WATCHDOG_PID`` is the agent's pid).
"""

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

from agent.cli import WATCHDOG_MARGIN, watchdog_needed_usec
from agent.config import parse
from agent.service import READY_MQTT_WAIT
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess

pytestmark = pytest.mark.mqtt


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(20)
    yield sock
    sock.close()


def run_until_ready(
    tmp_path: Path,
    broker: Mosquitto,
    sock: socket.socket,
    *,
    interval: float,
    watchdog_usec: int,
    pid: str = "$$",
) -> tuple[list[str], list[dict[str, object]]]:
    """Start ``vcpu-agent run`` as systemd would, collect datagrams up to READY=1,
    stop it with SIGTERM; return the datagrams and the log events."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[agent]\nhost_id = "wd"\n[libvirt]\nuri = "test:///default"\n'
        f"[sampling]\ninterval = {interval}\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'topic_prefix = "wd-{tmp_path.name}"\n'
        '[spool]\npath = ""\n[log]\nformat = "json"\n'
    )
    log = tmp_path / "agent.log"
    # exec keeps the shell's pid, so WATCHDOG_PID=$$ is the agent's own, as under systemd.
    script = f'WATCHDOG_PID={pid} exec "$0" -m agent run --config "$1"'
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["sh", "-c", script, sys.executable, str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "NOTIFY_SOCKET": str(tmp_path / "notify"),
                "WATCHDOG_USEC": str(watchdog_usec),
            },
        )
    datagrams: list[str] = []
    try:
        while "READY=1" not in "\n".join(datagrams).splitlines():
            datagrams.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    return datagrams, [json.loads(line) for line in text.splitlines()]


def test_the_needed_watchdog_is_twice_the_longest_gap_between_pings() -> None:
    cfg = parse({"sampling": {"interval": 45}, "libvirt": {"call_timeout": 3.0}})
    assert WATCHDOG_MARGIN == 2.0
    assert watchdog_needed_usec(cfg) == 96_000_000
    # Defaults: the bulk call at least every 5 s (while /proc serves every domain)
    # plus a 3 s call timeout, twice: within WatchdogSec=30.
    assert watchdog_needed_usec(parse({})) == 16_000_000
    slow = parse({"sampling": {"libvirt_interval": 20}, "libvirt": {"call_timeout": 3.0}})
    assert watchdog_needed_usec(slow) == 46_000_000


def test_a_watchdog_shorter_than_the_sampling_interval_allows_is_extended_at_start(
    tmp_path: Path, broker: Mosquitto, notify_socket: socket.socket
) -> None:
    datagrams, events = run_until_ready(
        tmp_path, broker, notify_socket, interval=45, watchdog_usec=30_000_000
    )
    # The extension is the first thing said, long before the first 45 s gap.
    assert datagrams[0] == "WATCHDOG_USEC=96000000"
    [extended] = [e for e in events if e["event"] == "watchdog.extended"]
    assert extended["watchdog_usec"] == 30_000_000
    assert extended["extended_usec"] == 96_000_000
    assert extended["interval"] == 45.0
    assert extended["call_timeout"] == 3.0


def test_a_watchdog_long_enough_for_the_config_is_left_alone(
    tmp_path: Path, broker: Mosquitto, notify_socket: socket.socket
) -> None:
    datagrams, events = run_until_ready(
        tmp_path, broker, notify_socket, interval=0.2, watchdog_usec=30_000_000
    )
    assert not [d for d in datagrams if "WATCHDOG_USEC=" in d]
    assert not [e for e in events if e["event"] == "watchdog.extended"]
    assert any("WATCHDOG=1" in d for d in datagrams)


def test_a_watchdog_meant_for_another_process_is_not_touched(
    tmp_path: Path, broker: Mosquitto, notify_socket: socket.socket
) -> None:
    datagrams, events = run_until_ready(
        tmp_path, broker, notify_socket, interval=45, watchdog_usec=30_000_000, pid="1"
    )
    assert not [d for d in datagrams if "WATCHDOG_USEC=" in d]
    assert not [e for e in events if e["event"] == "watchdog.extended"]


def test_ready_follows_the_broker_when_it_answers_after_the_first_sample(
    tmp_path: Path, make_broker: Callable[..., Mosquitto], notify_socket: socket.socket
) -> None:
    # With a 45 s interval the next sample is 45 s away: READY must not wait for it.
    broker = make_broker()
    broker.stop()  # down at start: the first sample happens before any connection
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[agent]\nhost_id = "wd"\n[libvirt]\nuri = "test:///default"\n'
        "[sampling]\ninterval = 45\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        "reconnect_min = 0.1\nreconnect_max = 0.2\n"
        '[spool]\npath = ""\n[log]\nformat = "json"\n'
    )
    agent = AgentProcess(
        argv=[sys.executable, "-m", "agent", "run", "--config", str(cfg)],
        log_path=tmp_path / "agent.log",
    )
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    try:
        agent.start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        agent.wait_log("mqtt.connect_failed", timeout=10)
        broker.start()
        up = time.monotonic()
        datagrams: list[str] = []
        while "READY=1" not in "\n".join(datagrams).splitlines():
            datagrams.append(notify_socket.recv(4096).decode())
        assert time.monotonic() - up < READY_MQTT_WAIT  # not the 10 s fallback, nor 45 s
        assert agent.wait_log("agent.ready", timeout=5)["mqtt_connected"] is True
    finally:
        assert agent.stop() == 0
