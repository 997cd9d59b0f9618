"""The subscriber commands of ``vcpu-agent``: watch | react | metrics (argparse wiring).

``agent.cli`` registers them with ``add_parsers`` and hands the parsed arguments
and the loaded config (the agent's own file: its ``[mqtt]`` section is all they
read) to ``run``. Their own settings are flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.config import DEFAULT_PATH, Config

COMMANDS = ("watch", "react", "metrics")
EX_USAGE = 64
EX_UNAVAILABLE = 69  # the broker could not be reached


def _common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_PATH,
        help=f"an agent config file; its [mqtt] section is read (default {DEFAULT_PATH})",
    )
    cmd.add_argument("--host", action="append", default=[], help="only this host (repeatable)")
    cmd.add_argument("--domain", action="append", default=[], help="only this domain (repeatable)")
    cmd.add_argument(
        "--vcpu", action="append", type=int, default=[], help="only this vCPU (repeatable)"
    )
    cmd.add_argument(
        "--client-id", default="", help="MQTT client id (default: stable, from the config path)"
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watch = sub.add_parser(
        "watch",
        help="show the vCPUs of one host or the fleet, live",
        description="Show vCPU states from the retained tree, then every change.",
    )
    _common(watch)
    watch.add_argument("--once", action="store_true", help="print the current state and exit")
    watch.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    watch.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="--once: seconds to wait for the complete tree at most (default 10)",
    )


def run(args: argparse.Namespace, cfg: Config) -> int:
    # Imported here: check-config and run need neither paho's client side nor rich.
    from agent import logs  # noqa: PLC0415
    from agent.client import (  # noqa: PLC0415
        ClientError,
        Selection,
        Subscriber,
        default_client_id,
    )

    selection = Selection(
        hosts=tuple(args.host), domains=tuple(args.domain), vcpus=tuple(args.vcpu)
    )
    if args.command == "watch":
        # stdout carries the view or the JSON: logs go to stderr, warnings only.
        logs.configure(level="warning", fmt=cfg.log.format, stream=sys.stderr)
        client_id = args.client_id or default_client_id("watch", args.config, str(os.getpid()))
        sub = Subscriber(
            cfg.mqtt,
            client_id=client_id,
            selection=selection,
            qos=0 if args.once else 1,
        )
        try:
            sub.connect(timeout=max(args.timeout, 1.0))
        except ClientError as err:
            print(f"vcpu-agent watch: {err}", file=sys.stderr)
            return EX_UNAVAILABLE
        from agent.watch import main  # noqa: PLC0415 - rich only for watch

        try:
            return main(sub, once_=args.once, as_json=args.json, timeout=args.timeout)
        except KeyboardInterrupt:
            return 0
        finally:
            sub.close()
    raise AssertionError(f"not a subscriber command: {args.command}")  # pragma: no cover
