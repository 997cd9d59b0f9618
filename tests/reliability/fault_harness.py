"""What the fault tests share with ``bench/faults.py``: their agent config (the
rig's writer with short timings) and the produced-vs-delivered comparison. The
subscriber and the agent process are the rig's (``lab/rig.py``).

``Delivery`` compares what an agent produced (its seq counters: per vCPU for
transitions, per domain for lifecycle events, each 1..N) with what a subscriber
received: missing seqs, out-of-order first arrivals, duplicates.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.delivery import SeqKey
from agent.payloads import Lifecycle, Transition, decode
from lab.rig import Arrival, config_document, write_config

AGENT = [sys.executable, "-m", "agent"]
# The domain every test:///default instance starts with (libvirt's test driver).
TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def agent_config(
    path: Path,
    *,
    port: int,
    prefix: str,
    uri: str = "test:///default",
    spool: Path | str = "",
    max_events: int = 100000,
    mqtt: dict[str, object] | None = None,
) -> Path:
    """The fault tests' agent config (the rig's writer, with their timings)."""
    return write_config(
        path,
        config_document(
            port=port,
            prefix=prefix,
            host_id="rel-host",
            uri=uri,
            interval=0.2,
            spool_path=spool,
            sampling={"event_followup": 0.05},
            spool={"max_events": max_events},
            mqtt=mqtt or {},
        ),
    )


@dataclass(frozen=True)
class Delivery:
    produced: int
    delivered: int  # distinct events received
    duplicates: int  # extra copies received (same key and seq again)
    missing: dict[SeqKey, list[int]]
    out_of_order: dict[SeqKey, list[int]]

    def record(self, fault: str, note: str = "") -> None:
        record_figure(fault, self.produced, self.delivered, self.duplicates, note)


def received_events(messages: Iterable[Arrival]) -> dict[SeqKey, list[int]]:
    """Seqs per key, in arrival order, of every transition and lifecycle message."""
    seen: dict[SeqKey, list[int]] = defaultdict(list)
    for m in messages:
        if not m.topic.endswith(("/transition", "/lifecycle")):
            continue
        body = decode(m.payload)
        if isinstance(body, Transition):
            seen[(body.uuid, body.vcpu)].append(body.seq)
        elif isinstance(body, Lifecycle):
            seen[(body.uuid, None)].append(body.seq)
    return seen


def compare(produced: Mapping[SeqKey, int], messages: Iterable[Arrival]) -> Delivery:
    seen = received_events(messages)
    missing: dict[SeqKey, list[int]] = {}
    disorder: dict[SeqKey, list[int]] = {}
    delivered = duplicates = 0
    for key, top in produced.items():
        got = seen.get(key, [])
        firsts = list(dict.fromkeys(got))  # first arrival of each seq, in order
        lost = sorted(set(range(1, top + 1)) - set(firsts))
        if lost:
            missing[key] = lost
        if firsts != sorted(firsts):
            disorder[key] = firsts
        delivered += len(firsts)
        duplicates += len(got) - len(firsts)
    return Delivery(
        produced=sum(produced.values()),
        delivered=delivered,
        duplicates=duplicates,
        missing=missing,
        out_of_order=disorder,
    )


def spool_seqs(path: Path) -> dict[SeqKey, int]:
    """The last seqs a (possibly killed) agent left in its spool's chain."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT uuid, vcpu, seq FROM chain").fetchall()
    return {(u, None if v == -1 else v): n for u, v, n in rows}


def spool_entries(path: Path) -> int:
    """Everything still queued: events and retained states."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    return count


def spool_backlog(path: Path) -> int:
    """Events (transitions, lifecycle) still queued; retained states not counted."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT COUNT(*) FROM entries WHERE retain = 0").fetchone()[0]
    return count


def record_figure(fault: str, produced: int, delivered: int, duplicates: int, note: str) -> None:
    """Append one row of the fault table to $VCPU_FAULT_FIGURES (bench/faults.py)."""
    target = os.environ.get("VCPU_FAULT_FIGURES")
    if target:
        row = {"fault": fault, "produced": produced, "delivered": delivered}
        row |= {"duplicates": duplicates, "note": note}
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
