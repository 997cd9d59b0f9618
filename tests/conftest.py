"""Shared fixtures: real mosquittos, the rig's subscribers (lab/rig.py), the
in-process agent, the CI skip rule."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Generator, Iterator

import libvirt
import pytest

from agent.config import Config
from lab.domains import GuestPool
from lab.libvirtd import Libvirtd
from lab.mosquitto import Mosquitto
from lab.rig import Feed
from tests.testdriver import RunningAgent, start_agent


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI (``CI=true``) a skipped test fails the run: a skipped fault test hides
    a failure. Only a test marked ``kvm`` may skip, where /dev/kvm is unusable."""
    report = yield
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("kvm") is None
    ):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (only KVM tests may skip): {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def broker() -> Iterator[Mosquitto]:
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirtd]:
    """THE libvirtd of this test session: borrowed if one answers, else started by
    PID (virtlogd too) and stopped at the end. One object for every test, so a
    test that restarts libvirtd is not refused for "other users" of it."""
    with Libvirtd() as daemon:
        yield daemon


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Mosquitto]]:
    """Brokers of this test's own (it may stop and restart them)."""
    brokers: list[Mosquitto] = []

    def make(extra_conf: str = "", *, persistent: bool = False) -> Mosquitto:
        broker = Mosquitto(extra_conf=extra_conf)
        if persistent:
            # Later lines win: the session and its queued QoS 1 messages survive a
            # broker restart, as a production broker's would.
            broker.extra_conf = (
                f"persistence true\npersistence_location {broker.workdir}/\n"
                f"max_queued_messages 0\n{extra_conf}"
            )
        broker.start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., Feed]]:
    """The rig's subscriber with a persistent session (survives broker restarts)."""
    subs: list[Feed] = []

    def make(port: int, topic: str, auth: tuple[str, str] | None = None) -> Feed:
        prefix = topic.split("/", 1)[0]
        sub = Feed(port=port, prefix=prefix, topic=topic, persistent=True, auth=auth)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


@pytest.fixture
def pool(libvirtd: Libvirtd) -> Iterator[GuestPool]:
    """Real QEMU guests of this test's own on the session's libvirtd, destroyed after."""
    conn = libvirt.open(libvirtd.uri)
    guests = GuestPool(conn)
    try:
        yield guests
    finally:
        guests.close()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests never see each other's messages."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def subscribe(broker: Mosquitto) -> Iterator[Callable[[str], Feed]]:
    """The rig's subscriber (MQTT 5, a clean session) on a topic filter."""
    subs: list[Feed] = []

    def make(topic: str) -> Feed:
        sub = Feed(port=broker.port, prefix=topic.split("/", 1)[0], topic=topic)
        subs.append(sub)
        return sub

    yield make
    for sub in subs:
        sub.close()


@pytest.fixture
def run_agent() -> Iterator[Callable[[Config], RunningAgent]]:
    """Start the agent in-process (test driver); every one is stopped afterwards."""
    started: list[RunningAgent] = []

    def start(cfg: Config) -> RunningAgent:
        agent = start_agent(cfg)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.thread.is_alive():
            agent.stop()
