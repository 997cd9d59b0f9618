"""Fixtures for fault tests: agent processes started from an argv and killed by
PID (brokers and subscribers are the shared ones in tests/conftest.py)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.rig import AgentProcess


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start an agent process from an argv (the CLI, or a harness module) with its
    output in a file; any still running at the end is killed by PID."""
    procs: list[AgentProcess] = []

    def start(argv: list[str], name: str = "agent") -> AgentProcess:
        agent = AgentProcess(argv=argv, log_path=tmp_path / f"{name}-{len(procs)}.log")
        procs.append(agent.start())
        return agent

    yield start
    for agent in procs:
        agent.stop(timeout=0, sig=signal.SIGKILL)
