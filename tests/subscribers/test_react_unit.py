"""systemd/vcpu-react.service: hardened like the agent's, wired to react's exits
(`systemd-analyze` verify and exposure: tests/test_unit_file.py, for both units)."""

from __future__ import annotations

from pathlib import Path

from agent.config import EX_CONFIG
from agent.subcommands import EX_USAGE
from tests.test_unit_file import unit_options

ROOT = Path(__file__).parent.parent.parent
UNIT = ROOT / "systemd" / "vcpu-react.service"
AGENT_UNIT = ROOT / "systemd" / "vcpu-agent.service"
STRICTER = {"Service.ProtectProc": ["invisible"]}


def test_the_react_unit_has_every_hardening_option_of_the_agents() -> None:
    react, agent = unit_options(UNIT), unit_options(AGENT_UNIT)
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
    opts = unit_options(UNIT)
    argv = opts["Service.ExecStart"][0].split()
    assert argv[1:4] == ["react", "--config", "/etc/vcpu-agent/config.toml"]
    assert opts["Service.StateDirectory"] == ["vcpu-react"]  # the ledger's default home
    assert sorted(opts["Service.RestartPreventExitStatus"][0].split()) == sorted(
        [str(EX_USAGE), str(EX_CONFIG)]
    )
