"""Fixtures for fault tests: brokers of each test's own, persistent subscribers,
and agent processes started and killed by PID (the helpers are in harness.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.mosquitto import Mosquitto
from tests.reliability.fault_harness import ROOT, AgentProcess, PersistentSubscriber


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Mosquitto]]:
    """Brokers of this test's own (it may stop and restart them)."""
    brokers: list[Mosquitto] = []

    def make(extra_conf: str = "", *, persistent: bool = False) -> Mosquitto:
        workdir = Path(tempfile.mkdtemp(prefix="vcpu-rel-mosq-"))
        if persistent:
            # Later lines win: the session and its queued QoS 1 messages survive a
            # broker restart, as a production broker's would.
            extra_conf = (
                f"persistence true\npersistence_location {workdir}/\n"
                f"max_queued_messages 0\n{extra_conf}"
            )
        broker = Mosquitto(extra_conf=extra_conf, workdir=workdir)
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., PersistentSubscriber]]:
    subs: list[PersistentSubscriber] = []

    def make(port: int, topic: str, auth: tuple[str, str] | None = None) -> PersistentSubscriber:
        sub = PersistentSubscriber(port, topic, auth=auth)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


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
