"""End-to-end fixtures: real libvirtd, real guests, the real agent, a real broker.

- ``e2e_daemon`` (session): borrows a libvirtd that answers, or starts virtlogd +
  libvirtd by PID and stops exactly those at the end; fixes /dev/kvm first.
- ``virt_type`` (module, parametrized): TCG always, KVM when usable (skipped with
  the probe's reason otherwise). The terminal summary says which ran.
- ``rig`` (module): one ``vcpu-agent run`` subprocess per module and virt type,
  with a temp config against qemu:///system and the session's mosquitto, plus a
  ``Feed`` subscribed to its prefix and a ``GuestPool``. At teardown the agent is
  stopped with SIGTERM by PID and must exit 0.

The agent watches every domain on the host; tests only look at their own guests.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from lab.domains import GuestPool
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed, revive
from tests.e2e.rig import Rig

VIRT_TYPES = [
    pytest.param("qemu", id="tcg"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]
_VIRT_RAN: dict[str, int] = {}
_VIRT_SKIPPED: dict[str, str] = {}


@pytest.fixture(scope="session")
def e2e_daemon(libvirtd: Libvirtd) -> Libvirtd:
    """The session's one libvirtd (tests/conftest.py): a second lab registration
    in this process would make restart tests refuse, seeing "another user"."""
    return libvirtd


@pytest.fixture(scope="session")
def e2e_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-images")


@pytest.fixture(scope="module", params=VIRT_TYPES)
def virt_type(request: pytest.FixtureRequest, e2e_daemon: Libvirtd) -> VirtType:
    """Each truth test runs under TCG, and under KVM when /dev/kvm is usable."""
    vt: VirtType = request.param
    if vt == "kvm" and not e2e_daemon.kvm.usable:
        _VIRT_SKIPPED["KVM"] = e2e_daemon.kvm.reason
        pytest.skip(f"KVM unusable: {e2e_daemon.kvm.reason}")
    name = "KVM" if vt == "kvm" else "TCG"
    _VIRT_RAN[name] = _VIRT_RAN.get(name, 0) + 1
    return vt


@pytest.fixture(scope="module")
def rig(
    request: pytest.FixtureRequest,
    e2e_daemon: Libvirtd,
    broker: Mosquitto,
    virt_type: VirtType,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    interval: float = getattr(request.module, "INTERVAL", 0.25)
    token = secrets.token_hex(4)
    conn = libvirt.open(e2e_daemon.uri)
    feed = Feed(port=broker.port, prefix=f"e2e-{token}")
    agent = AgentProcess.lab(
        workdir=tmp_path_factory.mktemp(f"agent-{virt_type}"),
        broker_port=broker.port,
        prefix=feed.prefix,
        host_id=f"e2e-{token}",
        interval=interval,
    )
    pool = GuestPool(conn)  # its own world-traversable dir: QEMU runs as libvirt-qemu
    agent.start()
    try:
        feed.wait_online(agent.host_id)
        yield Rig(agent, feed, pool, conn, virt_type, interval, broker.port)
    finally:
        try:
            revive(pool, conn, e2e_daemon.uri)
            pool.close()
        finally:
            rc = agent.stop()
            feed.close()
            conn.close()
    assert rc == 0, f"vcpu-agent exited with {rc}:\n{agent.log_tail()}"
    assert not feed.errors, feed.errors


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _VIRT_RAN and not _VIRT_SKIPPED:
        return
    ran = ", ".join(f"{name} ({n} module(s))" for name, n in sorted(_VIRT_RAN.items()))
    terminalreporter.write_line(f"e2e virt modes run: {ran or 'none'}")
    for name, reason in _VIRT_SKIPPED.items():
        terminalreporter.write_line(f"e2e virt mode skipped: {name}: {reason}")
