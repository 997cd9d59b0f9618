"""Fixtures for fault tests: brokers of each test's own, persistent subscribers,
and agent processes started and killed by PID (the helpers are in harness.py)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.fault_harness import ROOT, AgentProcess


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start ``python -m agent ...`` (or another module) with its output in a file."""
    procs: list[AgentProcess] = []

    def start(argv: list[str], name: str = "agent") -> AgentProcess:
        log_path = tmp_path / f"{name}-{len(procs)}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        agent = AgentProcess(proc, log_path)
        procs.append(agent)
        return agent

    yield start
    for agent in procs:
        if agent.proc.poll() is None:
            os.kill(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait()
