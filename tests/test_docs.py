"""Docs that show commands and code are executed here, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest

from agent.config import Config
from lab.mosquitto import Mosquitto
from tests.testdriver import RunningAgent, agent_config, start_domain, with_cleanup

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_points_at_a_file() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_the_readme_check_config_command_prints_what_it_says() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"\$ \.venv/bin/(vcpu-agent check-config --config config\.toml)\n(.+)\n", readme
    )
    assert match is not None
    command, expected = match.groups()
    exe = Path(sys.executable).parent / "vcpu-agent"
    out = subprocess.run(
        [str(exe), *command.split()[1:]], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


def test_the_subscriber_in_the_docs_is_the_example_file() -> None:
    topics_md = (ROOT / "docs" / "topics.md").read_text()
    block = topics_md.split("```python\n", 1)[1].split("```", 1)[0]
    example = (ROOT / "examples" / "subscriber.py").read_text()
    normalized = {
        re.sub(r"\s+", " ", line.strip()).replace(", flush=True", "")
        for line in example.splitlines()
    }
    for raw in block.splitlines():
        line = re.sub(r"\s+", " ", raw.strip())
        if not line or line.startswith(("client.connect", "PREFIX =", "def on_message")):
            continue
        if line.startswith('print(f"{where.host}') or line.startswith('f"{body'):
            continue  # the example splits the f-string differently
        assert line in normalized or any(line in n for n in normalized), line


@pytest.mark.mqtt
def test_the_example_subscriber_prints_transitions_from_a_real_agent(
    broker: Mosquitto,
    prefix: str,
    run_agent: Callable[[Config], RunningAgent],
) -> None:
    conn = libvirt.open("test:///default")
    dom = start_domain(conn, f"docs-{uuid.uuid4().hex[:6]}")
    sub = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "subscriber.py"),
            "127.0.0.1",
            str(broker.port),
            prefix,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    try:
        run_agent(agent_config(broker, prefix))
        assert sub.stdout is not None
        lines = []
        deadline = time.monotonic() + 20
        suspended = False
        while time.monotonic() < deadline:
            line = sub.stdout.readline().strip()
            lines.append(line)
            if not suspended and line == f"testhost {dom.name()} vCPU 0 is running":
                dom.suspend()
                suspended = True
            if line == f"testhost {dom.name()} vCPU 0: running -> n/a (domstate)":
                break
        else:
            pytest.fail(f"no transition printed: {lines}")
    finally:
        sub.kill()
        sub.wait()
        if sub.stdout is not None:
            sub.stdout.close()
        with_cleanup(dom)
        conn.close()
