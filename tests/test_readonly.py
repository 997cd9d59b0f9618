"""The agent needs read-only libvirt access, and nothing more.

- statically: every libvirt method the agent calls is on a list of read-only APIs;
- for real: an unprivileged user (as the unit's DynamicUser) runs ``snapshot``
  against qemu:///system through the read-only socket, and a read-only
  connection refuses a write.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import tempfile
from pathlib import Path

import libvirt
import pytest

from lab.libvirtd import Libvirtd
from lab.rig import write_config

ROOT = Path(__file__).parent.parent
# The libvirt calls a read-only connection allows, and the agent may make.
READ_ONLY_API = {
    "openReadOnly",
    "open",  # open() only when libvirt.read_only = false
    "getAllDomainStats",
    "domainListGetStats",
    "lookupByUUIDString",
    "vcpus",
    "maxVcpus",
    "isAlive",
    "close",
    "setKeepAlive",
    "domainEventRegisterAny",
    "domainEventDeregisterAny",
    "registerCloseCallback",
    "unregisterCloseCallback",
    "UUIDString",
    "name",
    "virEventRegisterDefaultImpl",
    "virEventRunDefaultImpl",
    "registerErrorHandler",
    "get_error_code",
    "get_error_message",
}
LIBVIRT_OBJECTS = {"conn", "dom", "err"}  # how source.py names libvirt objects


def libvirt_calls() -> set[str]:
    """Methods called on libvirt objects, and libvirt module functions, in source.py."""
    calls = set()
    for node in ast.walk(ast.parse((ROOT / "agent" / "source.py").read_text())):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if node.value.id == "libvirt":
            if inspect.isfunction(getattr(libvirt, node.attr, None)):
                calls.add(node.attr)
        elif node.value.id in LIBVIRT_OBJECTS:
            calls.add(node.attr)
    return calls


def test_the_agent_calls_only_read_only_libvirt_apis() -> None:
    calls = libvirt_calls()
    assert "getAllDomainStats" in calls  # the scan sees the calls at all
    assert calls <= READ_ONLY_API, calls - READ_ONLY_API


@pytest.mark.libvirt
def test_a_read_only_connection_refuses_writes(libvirtd: Libvirtd) -> None:
    conn = libvirt.openReadOnly(libvirtd.uri)
    try:
        with pytest.raises(libvirt.libvirtError, match="read only access prevents"):
            conn.defineXML(
                "<domain type='qemu'><name>ro-probe</name><memory>65536</memory>"
                "<os><type>hvm</type></os></domain>"
            )
    finally:
        conn.close()


DEPLOYED = Path("/opt/vcpu-agent")  # scripts/setup.sh installs the agent there


def deployed_is_current() -> bool:
    """Whether /opt/vcpu-agent runs this checkout's agent (else: rerun setup.sh)."""
    site = next(DEPLOYED.glob("lib/python3*/site-packages/agent"), None)
    if site is None:
        return False
    return all(
        (site / src.name).exists() and (site / src.name).read_bytes() == src.read_bytes()
        for src in (ROOT / "agent").glob("*.py")
    )


@pytest.mark.libvirt
def test_an_unprivileged_user_can_snapshot_through_the_read_only_socket(
    libvirtd: Libvirtd,
) -> None:
    # The agent as deployed (the unit's ExecStart), run as nobody: libvirtd sees a
    # non-root peer on its read-only socket (the lab's libvirtd has no polkit to
    # ask, so it is configured as docs/install.md says for such hosts).
    assert deployed_is_current(), f"{DEPLOYED} is missing or stale: run scripts/setup.sh"
    with tempfile.TemporaryDirectory(prefix="vcpu-ro-") as home:
        Path(home).chmod(0o755)  # readable by nobody, unlike pytest's tmp_path
        doc = {"libvirt": {"uri": "qemu:///system"}, "log": {"format": "json"}}
        config = write_config(Path(home) / "config.toml", doc)
        config.chmod(0o644)
        out = run_as_nobody(config, home)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert isinstance(doc["domains"], list)
    logged = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert any(e["event"] == "libvirt.connected" and e["read_only"] for e in logged)


def run_as_nobody(config: Path, home: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            str(DEPLOYED / "bin" / "vcpu-agent"),
            "snapshot",
            "--config",
            str(config),
            "--json",
            "--wait",
            "0.2",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=home,
        env={"PATH": "/usr/bin:/bin", "HOME": home},
    )
