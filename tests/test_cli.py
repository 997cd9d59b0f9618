"""The real entry point, as systemd runs it: a subprocess with NOTIFY_SOCKET."""

from __future__ import annotations

import fcntl
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

from agent.cli import EX_CANTCREAT, EX_INTERRUPTED, EX_IOERR
from agent.config import EX_CONFIG
from agent.payloads import DomainStatePayload, VcpuStatePayload, decode
from lab.mosquitto import Mosquitto
from lab.rig import Feed, config_document
from lab.rig import write_config as rig_write_config

pytestmark = pytest.mark.mqtt
AGENT = [sys.executable, "-m", "agent"]


def write_config(tmp_path: Path, broker: Mosquitto, prefix: str) -> Path:
    doc = config_document(
        port=broker.port,
        prefix=prefix,
        host_id="clihost",
        uri="test:///default",
        interval=0.2,
        spool_path=tmp_path / "spool.sqlite3",
        fast=False,
        mqtt={"client_id": "cli-test"},
    )
    return rig_write_config(tmp_path / "config.toml", doc)


def _test_driver_config(tmp_path: Path) -> Path:
    """The least config that samples: the test driver, JSON logs."""
    doc = {"libvirt": {"uri": "test:///default"}, "log": {"format": "json"}}
    return rig_write_config(tmp_path / "c.toml", doc)


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
    subscribe: Callable[[str], Feed],
) -> None:
    sub = subscribe(f"{prefix}/#")
    proc = agent_process(
        write_config(tmp_path, broker, prefix), {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    )
    seen = notifications_until(notify_socket, "READY=1")
    # Every vCPU state is published by the time READY is sent.
    sub.wait_all(lambda m: m.topic.endswith("/vcpu/1/state"), timeout=5)
    assert any("WATCHDOG=1" in s for s in seen)  # the first completed sample pings
    notifications_until(notify_socket, "WATCHDOG=1")  # and the next ones too

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    notifications_until(notify_socket, "STOPPING=1")
    last = sub.wait_all(lambda m: m.topic == f"{prefix}/clihost/status", count=2)[-1]
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
    subscribe: Callable[[str], Feed],
) -> None:
    sub = subscribe(f"{prefix}/clihost/status")
    proc = agent_process(write_config(tmp_path, broker, prefix))
    [online] = sub.wait_all(lambda m: True)
    assert json.loads(online.payload)["status"] == "online"
    proc.kill()  # SIGKILL: no goodbye, the broker speaks the will
    proc.wait()
    [_, will] = sub.wait_all(lambda m: True, count=2)
    assert json.loads(will.payload)["status"] == "offline"
    assert will.retain


def test_snapshot_prints_the_seeds_state_names(tmp_path: Path) -> None:
    out = subprocess.run(
        [*AGENT, "snapshot", "--config", "/nonexistent-default.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 78  # an explicit config that does not exist
    cfg = _test_driver_config(tmp_path)
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
    uri = f"qemu+unix:///system?socket={tmp_path}/none"
    cfg = rig_write_config(tmp_path / "c.toml", {"libvirt": {"uri": uri, "call_timeout": 5.0}})
    started = time.monotonic()
    out = subprocess.run(
        [*AGENT, "snapshot", "--config", str(cfg)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 69
    assert "cannot sample" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 30


# -- a spool another agent holds ----------------------------------------------------------


def test_a_spool_held_by_another_agent_stops_run_with_73_and_one_clear_line(
    tmp_path: Path, broker: Mosquitto, prefix: str
) -> None:
    config = write_config(tmp_path, broker, prefix)
    spool = tmp_path / "spool.sqlite3"
    with (tmp_path / "spool.sqlite3.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running agent holds it
        out = subprocess.run(
            [*AGENT, "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert out.returncode == EX_CANTCREAT == 73, out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith("vcpu-agent: "), line
    assert "in use by another vcpu-agent" in line, line
    [event] = [
        e for e in map(json.loads, out.stdout.splitlines()) if e["event"] == "spool.unusable"
    ]
    assert event["path"] == str(spool)
    assert "in use" in event["reason"]


# -- odd files as --config ----------------------------------------------------------------


def _odd_config(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # nobody writes: reading it would block for ever
    elif kind == "binary":
        path.write_bytes(Path(sys.executable).resolve().read_bytes()[:4096])
    elif kind == "huge":
        with path.open("wb") as f:
            f.truncate(1 << 40)  # sparse, 1 TiB
    elif kind == "unreadable":
        path.write_text("[mqtt]\n")
        path.chmod(0)
    elif kind == "device":
        return Path("/dev/null")
    elif kind == "read-error":
        # A regular file whose read fails for root too: offset 0 of a process's own
        # memory is never mapped, so read(2) gives EIO.
        return Path("/proc/self/mem")
    return path


ODD = {
    "directory": "is a directory, not a regular file",
    "fifo": "is a FIFO, not a regular file",
    "device": "is a device, not a regular file",
    "binary": "not UTF-8 text",
    "huge": "is larger than 1048576 bytes",
    "unreadable": "Permission denied",
    "read-error": "Input/output error",
}


@pytest.mark.parametrize("command", ["check-config", "snapshot", "run"])
@pytest.mark.parametrize("kind", sorted(ODD))
def test_an_odd_file_as_config_exits_78_with_the_reason_and_no_traceback(
    tmp_path: Path, command: str, kind: str
) -> None:
    config = _odd_config(kind, tmp_path)
    # root reads any file thanks to CAP_DAC_OVERRIDE: the unreadable case runs
    # without it (and CAP_DAC_READ_SEARCH), so the mode stops the read for real.
    drop = (
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        if kind == "unreadable" and os.geteuid() == 0
        else []
    )
    out = subprocess.run(
        [*drop, *AGENT, command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == EX_CONFIG, out.stderr
    assert out.stderr.splitlines()[0] == f"vcpu-agent: invalid config {config}:"
    assert ODD[kind] in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


# -- closed stdout, signals -----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["check-config"], ["snapshot", "--wait", "0.05"], ["snapshot", "--json"]]
)
def test_a_closed_stdout_ends_quietly_with_74(tmp_path: Path, argv: list[str]) -> None:
    """As `vcpu-agent snapshot --json | head -c1`, made deterministic: the reader
    has gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(
            [*AGENT, *argv, "--config", str(_test_driver_config(tmp_path))],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)
    assert out.returncode == EX_IOERR == 74, out.stderr
    assert "Traceback" not in out.stderr
    assert "BrokenPipeError" not in out.stderr


def test_snapshot_piped_into_head_prints_one_byte_and_no_traceback(tmp_path: Path) -> None:
    cfg = _test_driver_config(tmp_path)
    command = f"{sys.executable} -m agent snapshot --json --config {cfg} | head -c1"
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout == "{"
    assert out.returncode in (0, EX_IOERR)  # 0 when the JSON fit in the pipe in time
    assert "Traceback" not in out.stderr


def test_sigint_during_snapshot_exits_130_quietly(tmp_path: Path) -> None:
    cfg = _test_driver_config(tmp_path)
    proc = subprocess.Popen(
        [*AGENT, "snapshot", "--wait", "60", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)  # well inside the 60 s wait between the two samples
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EX_INTERRUPTED == 130, stderr
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_with_0_on_sigterm_and_sigint(
    tmp_path: Path,
    broker: Mosquitto,
    prefix: str,
    sig: signal.Signals,
    agent_process: Callable[..., subprocess.Popen[bytes]],
    notify_socket: socket.socket,
) -> None:
    proc = agent_process(
        write_config(tmp_path, broker, prefix), {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    )
    notifications_until(notify_socket, "READY=1")
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == 0
    assert "Traceback" not in (tmp_path / "agent.log").read_text()
