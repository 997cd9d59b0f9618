"""``vcpu-agent watch``: the fleet's vCPUs for people (rich) and for ``jq`` (JSON lines).

``--once`` reads the retained tree and exits: complete when the tree present at
subscription has arrived (``Synced``) *and* every known domain's current vCPUs
(``vcpus_current`` of its retained ``domain_state``) have a state. Both are
events, so it returns as soon as it knows, and gives up after ``--timeout``
seconds (exit 75, the missing vCPUs on stderr), never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.chain import (
    BadMessage,
    ChainBroken,
    DomainCleared,
    EpochChanged,
    Event,
    SeqGap,
    Synced,
    VcpuCleared,
)
from agent.client import Subscriber
from agent.payloads import (
    DomainStatePayload,
    Payload,
    Status,
    Transition,
    VcpuStatePayload,
    parse_rfc3339,
)

EX_OK = 0
EX_TEMPFAIL = 75  # --once: the tree was incomplete when the wait ran out

COLOURS = {
    "running": "green",
    "halted": "cyan",
    "blocked": "yellow",
    "offline": "bright_black",
    "unknown": "bold red",
    "n/a": "magenta",
}
_NAMES = {
    SeqGap: "seq_gap",
    ChainBroken: "chain_broken",
    EpochChanged: "epoch_changed",
    VcpuCleared: "vcpu_cleared",
    DomainCleared: "domain_cleared",
    BadMessage: "bad_message",
    Synced: "synced",
}


def event_dict(event: Event) -> dict[str, object]:
    """One event as the JSON object ``--json`` prints (payloads in their wire form)."""
    if isinstance(event, Payload):
        return event.to_dict()
    return {"kind": _NAMES[type(event)], **dataclasses.asdict(event)}


@dataclass
class View:
    """What is known of the fleet: the retained tree, kept current by events."""

    status: dict[str, Status] = field(default_factory=dict)
    domains: dict[tuple[str, str], DomainStatePayload] = field(default_factory=dict)
    vcpus: dict[tuple[str, str, int], VcpuStatePayload] = field(default_factory=dict)
    synced: bool = False
    only: frozenset[int] = frozenset()  # the vCPUs subscribed to (empty: all)

    def apply(self, event: Event) -> None:
        if isinstance(event, VcpuStatePayload):
            key = (event.host, event.domain, event.vcpu)
            known = self.vcpus.get(key)
            # Reconcile by seq within an epoch: an older state never replaces a newer.
            if known is None or known.epoch != event.epoch or known.seq <= event.seq:
                self.vcpus[key] = event
        elif isinstance(event, Transition):
            key = (event.host, event.domain, event.vcpu)
            known = self.vcpus.get(key)
            if known is not None and (known.epoch != event.epoch or known.seq < event.seq):
                self.vcpus[key] = dataclasses.replace(
                    known,
                    state=event.to_state,
                    source=event.source,
                    ratio=event.ratio,
                    since=event.changed_at,
                    seq=event.seq,
                    epoch=event.epoch,
                    at=event.at,
                )
        elif isinstance(event, DomainStatePayload):
            self.domains[(event.host, event.domain)] = event
        elif isinstance(event, Status):
            self.status[event.host] = event
        elif isinstance(event, VcpuCleared):
            self.vcpus.pop((event.host, event.domain, event.vcpu), None)
        elif isinstance(event, DomainCleared):
            self.domains.pop((event.host, event.domain), None)
        elif isinstance(event, Synced):
            self.synced = True

    def missing(self) -> list[tuple[str, str, int]]:
        """Current vCPUs of known domains whose state has not arrived."""
        return [
            (host, domain, n)
            for (host, domain), d in sorted(self.domains.items())
            for n in range(d.vcpus_current or 0)
            if (host, domain, n) not in self.vcpus and (not self.only or n in self.only)
        ]

    def complete(self) -> bool:
        return self.synced and not self.missing()

    def rows(self) -> Iterator[VcpuStatePayload]:
        for key in sorted(self.vcpus):
            yield self.vcpus[key]


def gather(sub: Subscriber, *, timeout: float) -> View:
    """The retained tree: until complete, or ``timeout`` seconds at most."""
    view = View(only=frozenset(sub.selection.vcpus))
    deadline = time.monotonic() + timeout
    while not view.complete():
        left = deadline - time.monotonic()
        event = sub.get(left) if left > 0 else None
        if event is None:
            break
        view.apply(event)
    return view


def once(sub: Subscriber, *, timeout: float, as_json: bool, out: TextIO, err: TextIO) -> int:
    view = gather(sub, timeout=timeout)
    if as_json:
        for state in view.rows():
            out.write(json.dumps(state.to_dict(), ensure_ascii=False) + "\n")
        out.flush()
    else:
        Console(file=out).print(table(view, time.time()))
    if view.complete():
        return EX_OK
    missing = view.missing()
    what = ", ".join(f"{h}/{d}/vcpu/{n}" for h, d, n in missing[:20]) or "the end of the tree"
    print(f"vcpu-agent watch: incomplete after {timeout:g} s, missing {what}", file=err)
    return EX_TEMPFAIL


def follow_json(sub: Subscriber, out: TextIO) -> int:
    for event in sub:
        out.write(json.dumps(event_dict(event), ensure_ascii=False) + "\n")
        out.flush()
    return EX_OK  # pragma: no cover - the iterator ends only with the process


def _age(since: str, now: float) -> str:
    try:
        seconds = max(0.0, now - parse_rfc3339(since))
    except ValueError:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def table(view: View, now: float) -> Table:
    grid = Table(title="vCPUs", expand=False)
    for column in ("host", "domain", "vCPU", "state", "for", "source", "seq"):
        grid.add_column(column)
    for s in view.rows():
        status = view.status.get(s.host)
        host = Text(s.host, style="" if status is None or status.status == "online" else "dim")
        grid.add_row(
            host,
            s.domain,
            str(s.vcpu),
            Text(s.label, style=COLOURS.get(s.state, "")),
            _age(s.since, now),
            s.source,
            str(s.seq),
        )
    offline = sorted(h for h, st in view.status.items() if st.status != "online")
    if offline:
        grid.caption = "offline: " + ", ".join(offline)
    return grid


def live(sub: Subscriber, console: Console | None = None) -> int:
    """A live table: the retained tree, then every change; Ctrl-C ends it."""
    view = View(only=frozenset(sub.selection.vcpus))
    with Live(table(view, time.time()), console=console, auto_refresh=False) as screen:
        last = 0.0
        while True:
            event = sub.get(1.0)
            if event is not None:
                view.apply(event)
            now = time.monotonic()
            if event is None or now - last >= 0.1:  # at most 10 redraws a second
                screen.update(table(view, time.time()), refresh=True)
                last = now


def main(sub: Subscriber, *, once_: bool, as_json: bool, timeout: float) -> int:
    if once_:
        return once(sub, timeout=timeout, as_json=as_json, out=sys.stdout, err=sys.stderr)
    if as_json:
        return follow_json(sub, sys.stdout)
    return live(sub)
