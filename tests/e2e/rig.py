"""The ``Rig`` the e2e fixtures hand to tests (a module of its own so tests can name it)."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from lab.domains import GuestPool
from lab.kvm import VirtType
from lab.rig import AgentProcess, Feed


@dataclass(frozen=True, slots=True)
class Rig:
    """What a test needs to drive guests and read what the agent published."""

    agent: AgentProcess
    feed: Feed
    pool: GuestPool
    conn: libvirt.virConnect
    virt_type: VirtType
    interval: float
    port: int

    @property
    def prefix(self) -> str:
        return self.feed.prefix

    @property
    def host_id(self) -> str:
        return self.agent.host_id

    @property
    def expected_source(self) -> str:
        """Where halted-ness comes from: KVM's halt-wait stat, or CPU time under TCG."""
        return "kvm" if self.virt_type == "kvm" else "cputime"
