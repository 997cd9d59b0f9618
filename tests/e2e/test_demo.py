"""``python -m lab.demo`` as a newcomer runs it: it shows transitions, and Ctrl-C cleans up.

The demo is run as a subprocess for about 15 s; SIGINT (what Ctrl-C sends) must
make it exit 0 having stopped the agent and mosquitto it started (by PID), and
destroyed its guests (by name). The demo prints each thing it starts with its
PID or name, which is what this test checks against.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import libvirt
import pytest

from lab.libvirtd import Libvirtd

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parents[2]
RUN_S = 15.0
TRANSITION = re.compile(
    r"^demo: \d\d:\d\d:\d\d\.\d{3}\s+(?P<domain>vcpuagent-demo-\w+)\s+(?P<vcpu>\d+)\s+"
    r"(?P<src>\S+) -> (?P<dst>\S+)\s+(?P<source>\w+)"
)
STARTED_PID = re.compile(r"^demo: started (?P<what>mosquitto|vcpu-agent) pid (?P<pid>\d+)")
STARTED_GUEST = re.compile(r"^demo: started guest (?P<name>vcpuagent-demo-\w+)")


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped (daemons are not our children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def test_demo_shows_live_transitions_and_cleans_up_on_ctrl_c(e2e_daemon: Libvirtd) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.demo", "--virt", "tcg"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.rstrip("\n") for line in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(RUN_S)
        assert proc.poll() is None, "\n".join(lines)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()
    output = "\n".join(lines)
    assert status == 0, output
    assert lines[-1] == "demo: all cleaned up", output

    guests = [m["name"] for m in map(STARTED_GUEST.match, lines) if m]
    assert len(guests) == 2, output
    shown = [m for m in map(TRANSITION.match, lines) if m]
    flips = [m for m in shown if {m["src"], m["dst"]} == {"running", "halted"}]
    assert len(flips) >= 4, output
    assert {m["domain"] for m in flips} == set(guests), output
    assert {m["source"] for m in flips} == {"cputime"}, output

    pids = {m["what"]: int(m["pid"]) for m in map(STARTED_PID.match, lines) if m}
    assert set(pids) == {"mosquitto", "vcpu-agent"}, output
    assert f"demo: vcpu-agent pid {pids['vcpu-agent']} exited with 0" in lines, output
    assert all(_gone(pid) for pid in pids.values()), pids
    conn = libvirt.openReadOnly(e2e_daemon.uri)
    try:
        running = {dom.name() for dom in conn.listAllDomains()}
    finally:
        conn.close()
    assert not running & set(guests), running
