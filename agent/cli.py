"""The ``vcpu-agent`` command: run | snapshot | check-config."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__, logs
from agent.config import DEFAULT_PATH, EX_CONFIG, Config, ConfigError, load

EX_OK = 0
EX_SOFTWARE = 70
EX_UNAVAILABLE = 69  # libvirt could not be reached (snapshot)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcpu-agent",
        description="Watch libvirt vCPUs and publish their state transitions to MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"vcpu-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_PATH,
            help=f"config file (default {DEFAULT_PATH}; built-in defaults if that is absent)",
        )
        return cmd

    add("run", "run the agent (the systemd service)")
    snap = add("snapshot", "sample every vCPU once and print its state")
    snap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    snap.add_argument(
        "--wait",
        type=float,
        default=None,
        help="seconds between the two samples a ratio needs (default: sampling.interval, "
        "at most 1)",
    )
    add("check-config", "validate the config file: exit 0, or 78 with every error")
    return parser


def _load(path: Path) -> Config:
    if path == DEFAULT_PATH and not path.exists():
        return Config()
    return load(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _load(args.config)
    except ConfigError as err:
        print(f"vcpu-agent: invalid config {err.source}:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        print(f"{args.config}: ok")
        return EX_OK

    if args.command == "snapshot":
        # stdout carries the table or JSON: logs go to stderr.
        logs.configure(level=cfg.log.level, fmt=cfg.log.format, stream=sys.stderr)
        return _snapshot(cfg, as_json=args.json, wait=args.wait)
    logs.configure(level=cfg.log.level, fmt=cfg.log.format)
    from agent.service import Service  # noqa: PLC0415 - keep check-config light

    return asyncio.run(Service(cfg).run())


def _snapshot(cfg: Config, *, as_json: bool, wait: float | None) -> int:
    from agent.snapshot import print_json, print_table, take  # noqa: PLC0415
    from agent.source import SourceError  # noqa: PLC0415

    if wait is None:
        wait = min(cfg.sampling.interval, 1.0)
    try:
        payloads = asyncio.run(take(cfg, wait=wait))
    except SourceError as err:
        print(f"vcpu-agent: cannot sample {cfg.libvirt.uri}: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    if as_json:
        print_json(payloads, cfg.host_id, sys.stdout)
    else:
        print_table(payloads, sys.stdout)
    return EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
