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
from typing import TYPE_CHECKING

from agent.config import DEFAULT_PATH, Config

if TYPE_CHECKING:
    from agent.client import Selection

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
    _add_react(sub)
    _add_metrics(sub)


def _add_react(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    react = sub.add_parser(
        "react",
        help="run a command once per vCPU transition",
        description="Run a command once per matching transition: the event in VCPU_* "
        "variables and as JSON on stdin; exactly once across redeliveries and restarts.",
    )
    _common(react)
    react.add_argument("--exec", required=True, metavar="CMD", help="the command (shell words)")
    react.add_argument(
        "--match",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="host=GLOB, domain=GLOB, vcpu=N[,N], from=S[,S], to=S[,S], resync=true|false "
        "(repeatable; all must hold)",
    )
    react.add_argument(
        "--when",
        action="append",
        default=[],
        metavar="COND=SECONDS",
        help="run on a whole-domain condition instead of each transition: "
        "all-halted=D (every current vCPU halted for D s), any-unknown=D (repeatable)",
    )
    react.add_argument("--timeout", type=float, default=60.0, help="seconds per run (60)")
    react.add_argument("--concurrency", type=int, default=4, help="runs at once at most (4)")
    react.add_argument("--retries", type=int, default=2, help="reruns of a failed run (2)")
    react.add_argument(
        "--retry-delay", type=float, default=1.0, help="seconds before the first retry (1)"
    )
    react.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="SQLite ledger (default: $STATE_DIRECTORY or /var/lib/vcpu-react, "
        "<client-id>.sqlite3)",
    )


def _add_metrics(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    metrics = sub.add_parser(
        "metrics",
        help="serve Prometheus metrics of what the agents publish",
        description="Serve /metrics: vCPU states, transitions, seconds per state, "
        "host online, last event age, gaps.",
    )
    _common(metrics)
    metrics.add_argument(
        "--listen", default="127.0.0.1:9847", metavar="ADDRESS:PORT", help="(127.0.0.1:9847)"
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
    logs.configure(level=cfg.log.level, fmt=cfg.log.format)
    if args.command == "react":
        return _react(args, cfg, selection)
    if args.command == "metrics":
        return _metrics(args, cfg, selection)
    raise AssertionError(f"not a subscriber command: {args.command}")  # pragma: no cover


def _react(args: argparse.Namespace, cfg: Config, selection: Selection) -> int:
    import asyncio  # noqa: PLC0415
    import shlex  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from agent.client import ClientError, Subscriber, default_client_id  # noqa: PLC0415
    from agent.conditions import Condition  # noqa: PLC0415
    from agent.ledger import Ledger  # noqa: PLC0415
    from agent.react import Match, MatchError, Policy, Reactor  # noqa: PLC0415

    try:
        match = Match.parse(args.match)
        command = tuple(shlex.split(args.exec))
        conditions = tuple(Condition.parse(w) for w in args.when)
    except (MatchError, ValueError) as err:
        print(f"vcpu-agent react: {err}", file=sys.stderr)
        return EX_USAGE
    if not command:
        print("vcpu-agent react: --exec is empty", file=sys.stderr)
        return EX_USAGE
    what = "\0".join([args.exec, *args.when])  # another rule set: another session
    client_id = args.client_id or default_client_id("react", args.config, what)
    ledger_path = args.ledger or state_directory() / f"{client_id}.sqlite3"
    ledger = Ledger(ledger_path)
    policy = Policy(
        command=command,
        timeout=args.timeout,
        concurrency=args.concurrency,
        retries=args.retries,
        retry_delay=args.retry_delay,
    )
    sub = Subscriber(cfg.mqtt, client_id=client_id, selection=selection, qos=1, ledger=ledger)
    try:
        sub.connect(timeout=max(10.0, cfg.mqtt.keepalive))
    except ClientError as err:
        print(f"vcpu-agent react: {err}", file=sys.stderr)
        return EX_UNAVAILABLE

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Reactor(sub, ledger, match, policy, conditions).run(stop)

    try:
        asyncio.run(main())
    finally:
        sub.close()
    return 0


def _metrics(args: argparse.Namespace, cfg: Config, selection: Selection) -> int:
    from prometheus_client import start_http_server  # noqa: PLC0415

    from agent import logs  # noqa: PLC0415
    from agent.client import ClientError, Subscriber, default_client_id  # noqa: PLC0415
    from agent.metrics import Bridge, parse_listen  # noqa: PLC0415

    try:
        address, port = parse_listen(args.listen)
    except ValueError as err:
        print(f"vcpu-agent metrics: {err}", file=sys.stderr)
        return EX_USAGE
    bridge = Bridge()
    client_id = args.client_id or default_client_id("metrics", args.config, args.listen)
    sub = Subscriber(cfg.mqtt, client_id=client_id, selection=selection, qos=1)
    try:
        sub.connect(timeout=max(10.0, cfg.mqtt.keepalive))
    except ClientError as err:
        print(f"vcpu-agent metrics: {err}", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        start_http_server(port, addr=address, registry=bridge.registry)
    except OSError as err:
        print(f"vcpu-agent metrics: cannot listen on {args.listen}: {err}", file=sys.stderr)
        sub.close()
        return EX_UNAVAILABLE
    logs.get("agent.metrics").info("metrics.listening", address=address, port=port)
    try:
        for event in sub:
            bridge.apply(event)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0


def state_directory() -> Path:
    """systemd's StateDirectory= (the first, if several), else /var/lib/vcpu-react."""
    given = os.environ.get("STATE_DIRECTORY", "")
    return Path(given.split(":")[0] if given else "/var/lib/vcpu-react")
