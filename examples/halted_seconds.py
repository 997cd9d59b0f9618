"""Report the seconds vCPUs spent halted, each transition once: durable.

    python examples/halted_seconds.py CONFIG.toml LEDGER.sqlite3

A durable subscriber (asyncio): the broker keeps transitions while it is down,
and the ledger remembers which ones were counted, so a restart neither loses nor
double-counts one. A transition is acknowledged only after its ledger commit.
A billing job would add each amount to its books in the same step.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent import logs
from agent.client import Subscriber, default_client_id
from agent.config import load
from agent.ledger import Ledger
from agent.payloads import Transition


async def main(config: Path, ledger: Path) -> None:
    logs.configure(level="warning", stream=sys.stderr)  # stdout is for the results
    cfg = load(config)
    sub = Subscriber(
        cfg.mqtt, client_id=default_client_id("halted-seconds", config), ledger=Ledger(ledger)
    )
    with sub:
        async for event in sub.aevents():
            if isinstance(event, Transition) and event.from_state == "halted":
                print(
                    f"{event.domain} vCPU {event.vcpu} seq {event.seq}: "
                    f"+{event.previous_duration_s:.1f} s halted",
                    flush=True,
                )
            if isinstance(event, Transition):
                sub.commit(event)  # recorded, then acknowledged to the broker


asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
