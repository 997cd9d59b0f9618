"""``vcpu-agent react``: the installed command, a real mosquitto, SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.payloads import Transition
from agent.react import Match, MatchError, hook_env
from lab.mosquitto import Mosquitto
from tests.subscribers.conftest import Wire
from tests.subscribers.messages import FakeAgent, new_uuid
from tests.subscribers.test_watch import EXE, config_file

HOOK = """\
import json, os, sys, time
body = json.loads(sys.stdin.read())
seq, rerun, attempt = os.environ["VCPU_SEQ"], os.environ["VCPU_RERUN"], os.environ["VCPU_ATTEMPT"]
def note(line):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(line + "\\n")
note(f"start {os.environ['VCPU_INDEX']} {seq} {rerun} {os.getpid()}")
if os.environ.get("HOOK_SLOW") == f"{os.environ['VCPU_INDEX']}/{seq}" and rerun == "0":
    time.sleep(60)
if os.environ.get("HOOK_FAIL") == f"{os.environ['VCPU_INDEX']}/{seq}" and attempt == "1":
    sys.exit(3)
assert body["seq"] == int(seq)
note(f"end {os.environ['VCPU_INDEX']} {seq} {rerun}")
"""


class React:
    """``vcpu-agent react`` as a child process, its JSON log lines collected."""

    def __init__(
        self, config: Path, tmp: Path, client_id: str, *args: str, hook: str = HOOK, **env: str
    ) -> None:
        self.hook_log = tmp / "hook.log"
        script = tmp / "hook.py"
        script.write_text(hook)
        self.proc = subprocess.Popen(
            [
                str(EXE),
                "react",
                "--config",
                str(config),
                "--exec",
                f"{sys.executable} {script}",
                "--ledger",
                str(tmp / "ledger.sqlite3"),
                "--client-id",
                client_id,
                "--retry-delay",
                "0.1",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HOOK_LOG": str(self.hook_log), **env},
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_log("react.started")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_log(self, event: str, timeout: float = 15, **fields: object) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if f'"event": "{event}"' in line:
                        found: dict[str, object] = json.loads(line)
                        if all(found.get(k) == v for k, v in fields.items()):
                            return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {event} in:\n{''.join(self.lines)}")
                self._cond.wait(left)

    def events(self, event: str) -> list[dict[str, object]]:
        with self._cond:
            return [json.loads(x) for x in self.lines if f'"event": "{event}"' in x]

    def kill(self, *and_pids: int) -> None:
        """SIGKILL react (and, as systemd would with its cgroup, the hooks it ran)."""
        self.proc.kill()
        self.proc.wait()
        for pid in and_pids:
            os.kill(pid, signal.SIGKILL)
        self._close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def hook_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_hook_line(path: Path, line: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not any(x.startswith(line) for x in hook_lines(path)):
        assert time.monotonic() < deadline, f"no {line!r} in {hook_lines(path)}"
        time.sleep(0.02)


@pytest.fixture
def reacts() -> Iterator[list[React]]:
    started: list[React] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.kill()


@pytest.mark.mqtt
def test_react_runs_each_transition_once_across_duplicates_sigkills_and_a_cut_off_hook(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, reacts: list[React]
) -> None:
    config = config_file(tmp_path, bus.port, prefix)
    client_id = f"vcpu-react-test-{uuid.uuid4().hex[:8]}"
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    wire.send(*agent.vcpu_state("web", u, 0), retain=True)
    sent = [agent.transition("web", u, 0) for _ in range(7)]

    def start() -> React:
        reacts.append(React(config, tmp_path, client_id, HOOK_SLOW="0/7"))
        return reacts[-1]

    react = start()
    for i in (0, 0, 1, 1, 2, 0):  # QoS 1 redeliveries, as a broker may make them
        wire.send(*sent[i])
    # react's own word that seq 3 is finished: a kill between the hook's end and the
    # ledger commit would (rightly) rerun it, marked.
    react.wait_log("react.hook_done", seq=3)

    react.kill()  # SIGKILL: nothing flushed, nothing said goodbye
    wire.send(*sent[3])  # while react is down: kept in its session
    wire.send(*sent[4])
    react = start()
    wire.send(*sent[2])  # a late duplicate after the restart
    wire.send(*sent[5])
    wait_hook_line(react.hook_log, "end 0 6 ")

    wire.send(*sent[6])  # its hook hangs (HOOK_SLOW) ...
    wait_hook_line(react.hook_log, "start 0 7 0")
    hook_pid = int(hook_lines(react.hook_log)[-1].split()[4])
    react.kill(hook_pid)  # ... and react dies under it, the hook with it
    react = start()
    wait_hook_line(react.hook_log, "end 0 7 1")
    assert react.stop() == 0

    lines = hook_lines(react.hook_log)
    ends = [x for x in lines if x.startswith("end")]
    assert ends == [f"end 0 {s} 0" for s in range(1, 7)] + ["end 0 7 1"], "\n".join(lines)
    starts = [" ".join(x.split()[:4]) for x in lines if x.startswith("start")]
    assert starts == [f"start 0 {s} 0" for s in range(1, 8)] + ["start 0 7 1"]


@pytest.mark.mqtt
def test_a_failing_hook_is_retried_and_a_hung_one_times_out_without_blocking_others(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, reacts: list[React]
) -> None:
    config = config_file(tmp_path, bus.port, prefix)
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    react = React(
        config,
        tmp_path,
        f"vcpu-react-test-{uuid.uuid4().hex[:8]}",
        "--timeout",
        "1.5",
        "--retries",
        "1",
        HOOK_FAIL="0/1",
        HOOK_SLOW="1/1",
    )
    reacts.append(react)
    wire.send(*agent.transition("web", u, 1))  # hangs: timeout, retried, times out again
    wire.send(*agent.transition("web", u, 0))  # fails once (exit 3), then succeeds
    wire.send(*agent.transition("web", u, 2))
    wait_hook_line(react.hook_log, "end 2 1 0", timeout=5)  # not held up by vCPU 1
    wait_hook_line(react.hook_log, "end 0 1 0", timeout=5)
    failed = [e["outcome"] for e in react.events("react.hook_failed")]
    assert "exit 3" in failed
    react.wait_log("react.hook_done")
    deadline = time.monotonic() + 15
    while sum(e["outcome"] == "timeout" for e in react.events("react.hook_done")) < 1:
        assert time.monotonic() < deadline, react.lines
        time.sleep(0.05)
    assert [e["outcome"] for e in react.events("react.hook_failed")].count("timeout") == 2
    assert react.stop() == 0


def test_match_conditions_all_hold_and_a_repeated_key_accepts_either_value() -> None:
    agent = FakeAgent()
    _, t = agent.transition("web-01", new_uuid(), 2, "halted")
    assert Match.parse([])(t)
    assert Match.parse(["domain=web-*", "to=halted", "vcpu=1,2", "resync=false"])(t)
    assert Match.parse(["from=offline", "from=running"])(t)
    assert not Match.parse(["domain=db-*"])(t)
    assert not Match.parse(["resync=true"])(t)
    with pytest.raises(MatchError):
        Match.parse(["colour=blue"])
    with pytest.raises(MatchError):
        Match.parse(["vcpu=one"])


def test_the_hook_environment_carries_the_whole_event() -> None:
    _, t = FakeAgent().transition("my vm", new_uuid(), 3, "halted")
    assert isinstance(t, Transition)
    env = hook_env(t, rerun=True, attempt=2)
    assert env["VCPU_DOMAIN"] == "my vm"
    assert (env["VCPU_INDEX"], env["VCPU_TO"], env["VCPU_RERUN"]) == ("3", "halted", "1")
    assert env["VCPU_SEQ"] == "1"


@pytest.mark.mqtt
def test_a_late_duplicate_from_a_superseded_epoch_does_not_run_the_hook_again(
    bus: Mosquitto, wire: Wire, prefix: str, tmp_path: Path, reacts: list[React]
) -> None:
    config = config_file(tmp_path, bus.port, prefix)
    agent = FakeAgent(prefix=prefix)
    u = new_uuid()
    react = React(config, tmp_path, f"vcpu-react-test-{uuid.uuid4().hex[:8]}")
    reacts.append(react)
    old = agent.transition("web", u, 0)
    wire.send(*old)
    react.wait_log("react.hook_done", seq=1, epoch="e1")
    agent.new_epoch("e2")  # a memory-only agent restarted
    wire.send(*agent.transition("web", u, 0))
    react.wait_log("react.hook_done", seq=1, epoch="e2")
    wire.send(*old)  # e1's seq 1 once more: stale to the chain tracker, known to the ledger
    wire.send(*agent.transition("web", u, 0))
    react.wait_log("react.hook_done", seq=2, epoch="e2")
    assert react.stop() == 0
    assert [x for x in hook_lines(react.hook_log) if x.startswith("end")] == [
        "end 0 1 0",
        "end 0 1 0",
        "end 0 2 0",
    ]
