"""docs/subscribers.md: its commands and examples run here, against a real mosquitto."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.client import default_client_id
from lab.mosquitto import Mosquitto, free_port
from lab.rig import wait_until
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import FakeAgent, new_uuid
from tests.subscribers.test_watch import EXE, config_file

ROOT = Path(__file__).parent.parent.parent
DOC = (ROOT / "docs" / "subscribers.md").read_text()
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's domain "test"

pytestmark = pytest.mark.mqtt


def console(command: str) -> tuple[str, list[str]]:
    """The doc's ``$ vcpu-agent <command> ...`` line and the output shown under it."""
    match = re.search(rf"^\$ (vcpu-agent {command} .*)\n((?:[^$`].*\n)*)", DOC, re.MULTILINE)
    assert match is not None, command
    return match.group(1), match.group(2).splitlines()


def argv(line: str, config: Path) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "vcpu-agent"
    return [str(EXE), *(str(config) if w == "config.toml" else w for w in words[1:])]


class Lines:
    """A child process's stdout, line by line, waited on."""

    def __init__(self, cmd: list[str], **popen: object) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            **popen,  # type: ignore[call-overload]
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, done: Callable[[list[str]], bool], timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.lines):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; got {self.lines}"
                self._cond.wait(left)
            return list(self.lines)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def children() -> Iterator[list[Lines]]:
    started: list[Lines] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.kill()


def test_the_watch_command_prints_what_the_doc_shows(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path
) -> None:
    agent = FakeAgent(prefix=prefix)
    wire.send(*agent.domain_state("test", TEST_UUID, 2), retain=True)
    for n in range(2):
        wire.send(*agent.vcpu_state("test", TEST_UUID, n), retain=True)
    line, shown = console("watch")
    done = subprocess.run(
        argv(line, config_file(tmp_path, bus.port, prefix)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = [json.loads(x) for x in done.stdout.splitlines()]
    want = [json.loads(x) for x in shown]
    assert [list(g) for g in got] == [list(w) for w in want]  # same keys, same order
    assert [(g["domain"], g["vcpu"], g["state"]) for g in got] == [
        (w["domain"], w["vcpu"], w["state"]) for w in want
    ]


def test_the_react_command_prints_what_the_doc_shows(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, children: list[Lines]
) -> None:
    line, shown = console("react")
    cmd = [*argv(line, config_file(tmp_path, bus.port, prefix)), "--ledger", str(tmp_path / "l")]
    react = Lines(cmd)
    children.append(react)
    react.wait(lambda lines: any("react.started" in x for x in lines))
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    for to in ("halted", "running"):
        wire.send(*agent.transition("web-01", u, 0, to))
    lines = react.wait(lambda lines: sum(not x.startswith("{") for x in lines) >= 2)
    assert [x for x in lines if not x.startswith("{")] == shown


def test_the_metrics_command_serves_what_the_doc_shows(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, children: list[Lines]
) -> None:
    agent = FakeAgent(prefix=prefix)
    for n in range(2):
        wire.send(*agent.vcpu_state("test", TEST_UUID, n), retain=True)
    line, _ = console("metrics")
    port = free_port()
    cmd = argv(line.replace("9847", str(port)), config_file(tmp_path, bus.port, prefix))
    children.append(Lines(cmd))
    curl = re.search(r"^\$ curl .*\| grep '(.*)'\n((?:vcpu.*\n)+)", DOC, re.MULTILINE)
    assert curl is not None
    pattern, shown = re.compile(curl.group(1)), curl.group(2).splitlines()
    deadline = time.monotonic() + 15
    got: list[str] = []
    while got != shown:
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                got = [x for x in r.read().decode().splitlines() if pattern.search(x)]
        except OSError:
            continue


@pytest.mark.parametrize("name", ["events.py", "halted_seconds.py"])
def test_the_examples_in_the_doc_are_the_example_files(name: str) -> None:
    text = (ROOT / "examples" / name).read_text()
    body = text[text.index("from __future__") :].rstrip("\n")
    assert f"```python\n{body}\n```" in DOC


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / name), *args]


def example_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_the_events_example_prints_states_changes_and_losses(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, children: list[Lines]
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.vcpu_state("web-01", u, 0), retain=True)
    run = Lines(
        example("events.py", str(config_file(tmp_path, bus.port, prefix))), env=example_env()
    )
    children.append(run)
    run.wait(lambda lines: any(x.startswith("-- the retained tree is in") for x in lines))
    sent = [agent.transition("web-01", u, 0) for _ in range(3)]
    for i in (0, 0, 2):  # a duplicate, and seq 2 lost
        wire.send(*sent[i])
    lines = run.wait(lambda lines: any("seq 3)" in x for x in lines))
    assert lines == [
        "node1 web-01 vCPU 0 is running",
        "-- the retained tree is in; changes follow --",
        "node1 web-01 vCPU 0: running -> halted (seq 1)",
        "node1 web-01 vCPU 0: seq 2..2 missing (lost on the way)",
        "node1 web-01 vCPU 0: running -> halted (seq 3)",
    ]


def committed(ledger: str, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            (rows,) = db.execute("SELECT count(*) FROM handled").fetchone()
        if rows >= count:
            return
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_the_durable_example_counts_each_transition_once_across_a_sigkill(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, children: list[Lines]
) -> None:
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    config = str(config_file(tmp_path, bus.port, prefix))
    ledger = str(tmp_path / "ledger.sqlite3")

    client_id = default_client_id("halted-seconds", Path(config))

    def start() -> Lines:
        # No readiness line in a 30-line example: the broker's SUBACK to it is one.
        before = bus.subacks(client_id)
        children.append(Lines(example("halted_seconds.py", config, ledger), env=example_env()))
        wait_until(lambda: bus.subacks(client_id) > before, 15, "the example subscribed")
        return children[-1]

    def halted_then_running() -> None:
        wire.send(*agent.transition("web-01", u, 0, "halted"))
        wire.send(*agent.transition("web-01", u, 0, "running"))

    first = start()
    for _ in range(3):
        wire.send(*agent.transition("web-01", u, 0, "halted"))
        wire.send(*agent.transition("web-01", u, 0, "running"))
    first.wait(lambda lines: len(lines) == 3)
    committed(ledger, 6)  # printed is not handled: committed is
    first.kill()
    halted_then_running()  # while it is down: seq 8, counted after the restart
    second = start()
    halted_then_running()  # seq 10
    lines = second.wait(lambda lines: len(lines) == 2)
    time.sleep(0.5)
    assert (
        second.lines
        == lines
        == [
            "web-01 vCPU 0 seq 8: +1.5 s halted",
            "web-01 vCPU 0 seq 10: +1.5 s halted",
        ]
    )
