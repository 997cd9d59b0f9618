"""``vcpu-agent snapshot``: sample twice, classify, print (table or JSON)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TextIO

from agent.config import Config
from agent.payloads import DomainStatePayload, Payload, VcpuStatePayload, decode, rfc3339
from agent.render import Renderer
from agent.source import LibvirtSource
from agent.topics import Topics
from agent.transitions import HostState, advance, current_state


async def take(cfg: Config, *, wait: float) -> list[Payload]:
    """Two samples ``wait`` seconds apart (ratios need an interval), as payloads."""
    source = LibvirtSource(
        uri=cfg.libvirt.uri,
        read_only=cfg.libvirt.read_only,
        call_timeout=cfg.libvirt.call_timeout,
        keepalive=(cfg.libvirt.keepalive_interval, cfg.libvirt.keepalive_count),
        on_event=lambda _event: None,
    )
    th = cfg.sampling.thresholds()
    host = HostState()
    try:
        await source.open()
        host, _ = advance(host, await source.sample(), th, complete=True)
        await asyncio.sleep(wait)
        host, _ = advance(host, await source.sample(), th, complete=True)
    finally:
        await source.close()
        source.shutdown()
    # Not a published stream: no chain and no epoch (every vCPU state has seq 0).
    renderer = Renderer(Topics(prefix=cfg.mqtt.topic_prefix, host=cfg.host_id), qos=0, epoch="")
    return [
        decode(out.message.payload)
        for change in current_state(host, time.time())
        for out in renderer.change(change)
    ]


def print_table(payloads: list[Payload], out: TextIO) -> None:
    """Like ``virsh vcpuinfo``, with the seed patch's state names."""
    if not payloads:
        print("no domains", file=out)
    for p in payloads:
        if isinstance(p, DomainStatePayload):
            print(f"\nDomain:         {p.domain}", file=out)
            print(f"UUID:           {p.uuid}", file=out)
            print(f"State:          {p.state}", file=out)
            print(f"vCPUs:          {p.vcpus_current} of {p.vcpus_maximum}", file=out)
        elif isinstance(p, VcpuStatePayload):
            ratio = "-" if p.ratio is None else f"{p.ratio * 100:.1f}%"
            print(f"  VCPU:         {p.vcpu}", file=out)
            print(f"  State:        {p.label}", file=out)
            print(f"  Source:       {p.source}", file=out)
            print(f"  Halted share: {ratio}", file=out)
            print(f"  Since:        {p.since}", file=out)


def print_json(payloads: list[Payload], host: str, out: TextIO) -> None:
    domains: list[dict[str, object]] = []
    for p in payloads:
        if isinstance(p, DomainStatePayload):
            domains.append({**p.to_dict(), "vcpus": []})
        elif isinstance(p, VcpuStatePayload) and domains:
            vcpus = domains[-1]["vcpus"]
            assert isinstance(vcpus, list)
            vcpus.append(p.to_dict())
    doc = {"host": host, "at": rfc3339(time.time()), "domains": domains}
    json.dump(doc, out, indent=2, ensure_ascii=False)
    out.write("\n")
