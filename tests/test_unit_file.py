"""The systemd unit: valid, hardened, and wired to the agent's exit codes."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EX_CANTCREAT
from agent.config import EX_CONFIG

UNIT = Path(__file__).parent.parent / "systemd" / "vcpu-agent.service"
REACT_UNIT = UNIT.with_name("vcpu-react.service")
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_options(unit: Path = UNIT) -> dict[str, list[str]]:
    """``Section.Key`` -> every value, in order (repeated keys accumulate)."""
    options: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.setdefault(f"{section}.{key}", []).append(value)
    return options


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's entry point (and react's
    hook at a program that exists)."""
    exe = Path(sys.executable).parent / "vcpu-agent"
    text = unit.read_text().replace("/opt/vcpu-agent/bin/vcpu-agent", str(exe))
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/etc/vcpu-agent/react-hook", "/bin/true"))
    return copy


@needs_systemd
@pytest.mark.parametrize("unit", [UNIT, REACT_UNIT], ids=lambda u: u.stem)
def test_systemd_analyze_verify_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", str(installed_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""


@needs_systemd
@pytest.mark.parametrize("unit", [UNIT, REACT_UNIT], ids=lambda u: u.stem)
def test_the_unit_exposure_score_is_low(unit: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(installed_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert score is not None, out.stdout + out.stderr
    assert float(score.group(1)) <= 2.0


def test_the_unit_is_a_watched_notify_service_that_does_not_retry_bad_config_or_spool() -> None:
    opts = unit_options()
    assert opts["Service.Type"] == ["notify"]
    assert opts["Service.Restart"] == ["on-failure"]
    assert opts["Service.RestartPreventExitStatus"] == [f"{EX_CANTCREAT} {EX_CONFIG}"]
    assert int(opts["Service.WatchdogSec"][0]) >= 20
    assert opts["Service.ExecStart"][0].split()[1:] == [
        "run",
        "--config",
        "/etc/vcpu-agent/config.toml",
    ]


def test_the_unit_runs_unprivileged_and_hardened() -> None:
    opts = unit_options()
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "StateDirectory": "vcpu-agent",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert opts[f"Service.{key}"] == [value], key
    assert "User" not in {k.split(".")[1] for k in opts}


def test_the_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
