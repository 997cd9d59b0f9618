"""Print every vCPU's state, then each change, and say so when the chain is broken.

    python examples/events.py CONFIG.toml

Built on ``agent.client``: the retained tree first, duplicates dropped, gaps and
epoch changes reported. docs/subscribers.md walks through it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent import logs
from agent.chain import ChainBroken, EpochChanged, SeqGap, Synced
from agent.client import Subscriber, default_client_id
from agent.config import load
from agent.payloads import Transition, VcpuStatePayload

logs.configure(level="warning", stream=sys.stderr)  # stdout is for the events
config = Path(sys.argv[1])
cfg = load(config)
with Subscriber(cfg.mqtt, client_id=default_client_id("example", config)) as sub:
    for event in sub:
        match event:
            case VcpuStatePayload(host=host, domain=domain, vcpu=n, label=label):
                print(f"{host} {domain} vCPU {n} is {label}", flush=True)
            case Synced():
                print("-- the retained tree is in; changes follow --", flush=True)
            case Transition(host=host, domain=domain, vcpu=n, seq=seq):
                print(
                    f"{host} {domain} vCPU {n}: {event.from_state} -> {event.to_state} "
                    f"(seq {seq}{', found on resync' if event.resync else ''})",
                    flush=True,
                )
            case SeqGap(host=host, domain=domain, vcpu=n, first=first, last=last):
                why = "the agent's spool overflowed" if event.explained else "lost on the way"
                print(f"{host} {domain} vCPU {n}: seq {first}..{last} missing ({why})", flush=True)
            case ChainBroken(host=host, domain=domain, vcpu=n, expected=was, got=got):
                print(f"{host} {domain} vCPU {n}: chain broken ({was} != {got})", flush=True)
            case EpochChanged(host=host):
                print(f"{host}: agent restarted its numbering, chains start over", flush=True)
