"""The ``vcpu-agent`` command: run | snapshot | check-config.

Every way it ends is an exit status of its own (README, "Run the agent"), with a
one-line message on stderr, never a traceback:

    0   done (run: stopped by SIGTERM or SIGINT)
    69  EX_UNAVAILABLE: snapshot could not reach libvirt
    70  EX_SOFTWARE: a bug; run logs it as ``agent.crashed`` with the details
    73  EX_CANTCREAT: run's spool is held by another agent, or cannot be opened or
        written (``spool.unusable``)
    74  EX_IOERR: stdout was closed before the output was written (``| head -c1``)
    78  EX_CONFIG: the config file is invalid, or is not a readable regular file
    130 interrupted (SIGINT, Ctrl-C) in check-config or snapshot
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__, logs, subcommands
from agent.config import DEFAULT_PATH, EX_CONFIG, Config, ConfigError, load
from agent.sdnotify import Notifier, watchdog_usec

EX_OK = 0
EX_UNAVAILABLE = 69  # libvirt could not be reached (snapshot)
EX_SOFTWARE = 70  # a bug: logged as agent.crashed
EX_CANTCREAT = 73  # the spool is held by another agent or cannot be opened/written
EX_IOERR = 74  # stdout closed before our output was written
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command

# The watchdog is fed after each completed libvirt bulk call only. The longest gap
# between two pings of a healthy agent is the longest time between bulk calls
# (sampling.libvirt_longest) plus one call that took its whole timeout; systemd
# recommends pinging at half the watchdog period (sd_watchdog_enabled(3)), so the
# watchdog must be at least twice that gap. A shorter one is extended at start.
WATCHDOG_MARGIN = 2.0

log = logs.get("agent.cli")


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
    subcommands.add_parsers(sub)  # watch | react | metrics: the subscriber side
    return parser


def _load(path: Path) -> Config:
    if path == DEFAULT_PATH and not path.exists():
        return Config()
    return load(path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`| head -c1`): stop quietly. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EX_IOERR
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    return status


def _main(argv: Sequence[str] | None) -> int:
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
    if args.command in subcommands.COMMANDS:
        return subcommands.run(args, cfg)

    if args.command == "snapshot":
        # stdout carries the table or JSON: logs go to stderr.
        logs.configure(level=cfg.log.level, fmt=cfg.log.format, stream=sys.stderr)
        return _snapshot(cfg, as_json=args.json, wait=args.wait)
    logs.configure(level=cfg.log.level, fmt=cfg.log.format)
    return _run(cfg)


def _run(cfg: Config) -> int:
    from agent.service import Service  # noqa: PLC0415 - keep check-config light
    from agent.spool import SpoolError  # noqa: PLC0415

    notifier = Notifier()
    extend_watchdog(cfg, notifier)
    try:
        service = Service(cfg, notifier=notifier)
    except SpoolError as err:
        # Another agent on this spool, or a spool that cannot be opened or written:
        # running anyway would change delivery guarantees behind subscribers' backs.
        log.error("spool.unusable", path=cfg.spool.path, reason=str(err))  # noqa: TRY400
        print(f"vcpu-agent: {err}", file=sys.stderr)
        return EX_CANTCREAT
    try:
        return asyncio.run(service.run())
    except Exception as err:
        # A bug, not a fault we know: the details go to the log (structured, one
        # event), the user gets one line and a status that says "software error".
        log.exception("agent.crashed", error=f"{type(err).__name__}: {err}")
        print(f"vcpu-agent: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return EX_SOFTWARE


def watchdog_needed_usec(cfg: Config) -> int:
    """The shortest watchdog timeout this config can keep fed (see WATCHDOG_MARGIN)."""
    gap = cfg.sampling.libvirt_longest + cfg.libvirt.call_timeout
    return math.ceil(WATCHDOG_MARGIN * gap * 1e6)


def extend_watchdog(cfg: Config, notifier: Notifier) -> None:
    """Lengthen systemd's watchdog when this config's samples may be further apart
    than it allows (`sampling.interval = 45` under `WatchdogSec=30`): the unit is
    not visible to check-config, so this is decided at start."""
    current = watchdog_usec()
    if current is None or not notifier.enabled:
        return
    needed = watchdog_needed_usec(cfg)
    if current >= needed:
        return
    notifier.set_watchdog(needed)
    log.warning(
        "watchdog.extended",
        watchdog_usec=current,
        extended_usec=needed,
        interval=cfg.sampling.interval,
        call_timeout=cfg.libvirt.call_timeout,
    )


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
    except Exception as err:
        # A bug: one line for the user; the details with log.level = "debug".
        log.debug("snapshot.crashed", exc_info=True)
        print(f"vcpu-agent: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        return EX_SOFTWARE
    if as_json:
        print_json(payloads, cfg.host_id, sys.stdout)
    else:
        print_table(payloads, sys.stdout)
    return EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
