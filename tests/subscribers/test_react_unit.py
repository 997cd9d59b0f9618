"""systemd/vcpu-react.service: valid, hardened like the agent's, wired to react's exits."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import EX_CONFIG
from agent.subcommands import EX_USAGE

ROOT = Path(__file__).parent.parent.parent
UNIT = ROOT / "systemd" / "vcpu-react.service"
AGENT_UNIT = ROOT / "systemd" / "vcpu-agent.service"
STRICTER = {"Service.ProtectProc": ["invisible"]}
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def options(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(f"{section}.{key}", []).append(value)
    return found


def installed_copy(tmp_path: Path) -> Path:
    exe = Path(sys.executable).parent / "vcpu-agent"
    copy = tmp_path / "vcpu-react.service"
    text = UNIT.read_text().replace("/opt/vcpu-agent/bin/vcpu-agent", str(exe))
    copy.write_text(text.replace("/etc/vcpu-agent/react-hook", "/bin/true"))
    return copy


@needs_systemd
def test_systemd_analyze_verify_accepts_the_react_unit(tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""


@needs_systemd
def test_the_react_unit_exposure_score_is_low(tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score is not None, out.stdout + out.stderr
    assert float(score.group(1)) <= 2.0


def test_the_react_unit_has_every_hardening_option_of_the_agents() -> None:
    react, agent = options(UNIT), options(AGENT_UNIT)
    hardening = [
        k
        for k in agent
        if k.startswith("Service.")
        and (k.split(".")[1].startswith(("Protect", "Restrict", "Private", "System")))
    ]
    assert hardening
    for key in hardening:
        # The agent relaxes some for libvirt and QEMU (each with its reason); react,
        # which reads no /proc of other users, may stay stricter.
        assert react.get(key) in (agent[key], STRICTER.get(key)), key
    assert react["Service.DynamicUser"] == ["yes"]
    assert react["Service.NoNewPrivileges"] == ["yes"]


def test_the_react_unit_runs_react_and_does_not_retry_a_bad_config_or_usage() -> None:
    opts = options(UNIT)
    argv = opts["Service.ExecStart"][0].split()
    assert argv[1:4] == ["react", "--config", "/etc/vcpu-agent/config.toml"]
    assert opts["Service.StateDirectory"] == ["vcpu-react"]  # the ledger's default home
    assert sorted(opts["Service.RestartPreventExitStatus"][0].split()) == sorted(
        [str(EX_USAGE), str(EX_CONFIG)]
    )
