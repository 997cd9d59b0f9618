"""Log event names are an interface: docs/logging.md lists exactly those in use."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
from pathlib import Path

import structlog

from agent import logs

ROOT = Path(__file__).parent.parent


def events_in_code() -> dict[str, set[str]]:
    """Every ``log.<level>("name", key=...)`` call in the agent: name -> keys."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "agent").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                keys = {k.arg for k in node.keywords if k.arg}
                found.setdefault(str(node.args[0].value), set()).update(keys)
    return found


def lasting_faults_in_code() -> set[str]:
    """Every ``LastingFault(log, "name")``: it logs ``name`` and ``name.ended``."""
    found: set[str] = set()
    for path in sorted((ROOT / "agent").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "LastingFault"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                name = str(node.args[1].value)
                found |= {name, f"{name}.ended"}
    return found


def events_in_docs() -> dict[str, set[str]]:
    table = {}
    for line in (ROOT / "docs" / "logging.md").read_text().splitlines():
        m = re.match(r"\| `([a-z_]+\.[a-z_.]+)` \| \w+ \|([^|]*)\|", line)
        if m:
            table[m.group(1)] = set(re.findall(r"`([a-z_]+)`", m.group(2)))
    return table


def test_every_log_event_is_documented_with_its_fields() -> None:
    documented, faults = events_in_docs(), lasting_faults_in_code()
    # A lasting fault's fields depend on where it is hit: its name is checked.
    assert {k: v for k, v in documented.items() if k not in faults} == events_in_code()
    assert faults <= set(documented)


def test_event_names_are_stable_dotted_lowercase() -> None:
    for name in events_in_code():
        assert re.fullmatch(r"[a-z]+(\.[a-z_]+)+", name), name


def test_json_lines_carry_the_event_and_bound_context() -> None:
    out = io.StringIO()
    logs.configure(fmt="json", level="info", stream=out)
    try:
        logs.get("agent.test").bind(domain="vm").info("vcpu.transition", vcpu=1)
        logging.getLogger("paho").warning("from %s", "paho")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "vcpu.transition"
    assert (first["domain"], first["vcpu"], first["level"]) == ("vm", 1, "info")
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "from paho"
    assert second["logger"] == "paho"
