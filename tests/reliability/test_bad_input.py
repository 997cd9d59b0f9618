"""Bad input never crashes the agent nor makes it lie.

- config files (wrong types, unknown keys, out-of-range values, broken TOML) through
  the real ``vcpu-agent check-config`` entry point: exit 78 naming the key; and every
  edge-case string it accepts also starts the real ``run`` against a real mosquitto;
- hostile domain names through the real agent and a real broker: valid topics that
  decode back to the name;
- malformed stats records through the real parser and differ: no crash, and a
  malformed sample never yields a transition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import signal
import tempfile
import time
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.config import EX_CONFIG, Config
from agent.records import domain_record
from agent.topics import parse_topic
from agent.transitions import HostState, VcpuTransition, advance
from lab.mosquitto import Mosquitto
from lab.rig import AgentProcess, Feed
from tests.reliability.fault_harness import AGENT, agent_config

# -- config ------------------------------------------------------------------------------

# Every section's keys and their type hints (resolved: config.py uses string annotations).
SECTIONS: dict[str, dict[str, object]] = {
    f.name: {
        g.name: typing.get_type_hints(typing.get_type_hints(Config)[f.name])[g.name]
        for g in dataclasses.fields(typing.get_type_hints(Config)[f.name])
    }
    for f in dataclasses.fields(Config)
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else "inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _toml_string(text: str) -> str:
    """A TOML basic string: control characters escaped, everything else literal (TOML
    has no surrogate-pair escapes, so json.dumps will not do)."""
    body = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c for c in text
    )
    return f'"{body}"'


def _check_config(text: str) -> tuple[int, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["check-config", "--config", f.name])
    Path(f.name).unlink()
    return status, err.getvalue()


def _wrong_for(hint: object) -> st.SearchStrategy[Any]:
    """Values of a type the field does not take (checked against the field's hint)."""
    scalars: list[st.SearchStrategy[Any]] = [
        st.lists(st.integers(), max_size=3),
        st.booleans(),
        st.text(max_size=8),
    ]
    if hint in (int, float):
        return st.one_of(st.lists(st.integers(), max_size=3), st.booleans(), st.text(max_size=8))
    if hint is bool:
        return st.one_of(st.integers(), st.text(max_size=8), st.floats(allow_nan=False))
    # str and Literal[str] fields
    return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), scalars[0])


@st.composite
def bad_configs(draw: st.DrawFn) -> tuple[str, str]:
    """A TOML document with one defect; returns it and the TOML path of the defect."""
    section = draw(st.sampled_from(sorted(SECTIONS)))
    key = draw(st.sampled_from(sorted(SECTIONS[section])))
    hint = SECTIONS[section][key]
    kind = draw(st.sampled_from(["wrong-type", "unknown-key", "out-of-range"]))
    if kind == "unknown-key":
        key = draw(
            st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(
                lambda k: k not in SECTIONS[section]
            )
        )
        value: object = draw(st.integers())
    elif kind == "out-of-range" and hint in (int, float):
        value = draw(st.sampled_from([-(10**12), 10**12, -1e300, 1e300]))
        if hint is float:
            value = draw(st.sampled_from([-1e300, 1e300, math.inf, -math.inf, math.nan]))
    else:
        value = draw(_wrong_for(hint))
    return f"[{section}]\n{key} = {_toml_value(value)}\n", f"{section}.{key}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_configs())
def test_every_bad_config_value_exits_78_with_an_error_naming_its_key(
    case: tuple[str, str],
) -> None:
    text, path = case
    status, err = _check_config(text)
    assert status == EX_CONFIG, (text, err)
    assert f"  {path}: " in err, (text, err)
    assert "Traceback" not in err


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_as_a_config_file_exits_0_or_78_and_never_raises(text: str) -> None:
    try:  # as the agent reads it: Path.read_text translates \r and \r\n to \n
        document: dict[str, object] | None = tomllib.loads(
            text.replace("\r\n", "\n").replace("\r", "\n")
        )
    except tomllib.TOMLDecodeError:
        document = None
    status, err = _check_config(text)
    if document is None:
        assert status == EX_CONFIG
        assert "not valid TOML" in err
    else:
        assert status in (0, EX_CONFIG)
        assert status == 0 or err.count("\n") >= 2  # the header and each problem


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.integers(), min_size=1, max_size=3))
def test_unknown_sections_are_named_in_the_error(tables: dict[str, int]) -> None:
    names = [n for n in tables if n not in SECTIONS]
    text = "".join(f"[{_toml_string(n)}]\nx = {v}\n" for n, v in tables.items())
    status, err = _check_config(text)
    if names:
        assert status == EX_CONFIG
        for n in names:
            assert f"{n}: unknown section" in err


# -- what check-config accepts, run starts --------------------------------------------------

# Edge cases of a string: empty, blank, $-prefixed, empty topic levels, each kind of
# character MQTT strings should not hold (DEL, a C1 control, a noncharacter), non-ASCII
# beyond the BMP, past 256 bytes, past MQTT's 65535-byte strings. Each of these crashed
# or stalled `run` on some key while check-config accepted it (issue 7).
EDGE_STRINGS = [
    "",
    " ",
    "$x",
    "x/",
    "a//b",
    "a\x7fb",
    "a\x85b",
    "a\ufffeb",
    "é雪🚀",
    "x" * 257,
    "x" * 65536,
    "a b",
    "..",
]
# Every free-text key. File paths are checked by reading them (tests/test_config.py);
# spool.path would create the edge names as files in the working directory.
STRING_KEYS = sorted(
    (section, key)
    for section, keys in SECTIONS.items()
    for key, hint in keys.items()
    if hint is str
    and not key.endswith("_file")
    and (section, key) != ("spool", "path")
    and (section, key) != ("log", "level")
)


def test_every_edge_string_check_config_accepts_also_starts_run_without_a_traceback(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    spawn: Callable[..., AgentProcess],
) -> None:
    """For each free-text key and edge string: check-config refuses it (78), or the real
    `run` against a real mosquitto and the test driver starts, connects (unless the key
    is where it connects to) and stops with 0 on SIGTERM, never a traceback."""
    broker = make_broker()
    accepted: list[tuple[str, str, str, Path]] = []
    for n, ((section, key), value) in enumerate((k, v) for k in STRING_KEYS for v in EDGE_STRINGS):
        base: dict[str, dict[str, object]] = {
            "agent": {"host_id": "edge"},
            "libvirt": {"uri": "test:///default"},
            "sampling": {"interval": 0.2, "libvirt_interval": 0.2},
            "mqtt": {
                "host": "127.0.0.1",
                "port": broker.port,
                "topic_prefix": f"{prefix}/{n}",
                "client_id": f"edge-{n}",
                "keepalive": 5,
            },
            "spool": {"path": ""},
            "log": {"format": "json"},
        }
        base[section][key] = value
        text = "".join(
            f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
            for name, table in base.items()
        )
        status, err = _check_config(text)
        assert "Traceback" not in err
        if status == EX_CONFIG:
            assert f"  {section}.{key}: " in err, (section, key, value, err)
            continue
        assert status == 0, err
        cfg = tmp / f"edge-{n}.toml"
        cfg.write_text(text)
        accepted.append((section, key, value, cfg))

    for batch in range(0, len(accepted), 6):  # a few at a time: 2 cores are shared
        agents = [
            (case, spawn([*AGENT, "run", "--config", str(case[3])], name=f"edge-{batch}-{i}"))
            for i, case in enumerate(accepted[batch : batch + 6])
        ]
        for (section, key, value, _), agent in agents:
            if (section, key) not in {("mqtt", "host"), ("libvirt", "uri")}:
                agent.wait_log("agent.ready", timeout=20)
                assert agent.events("mqtt.connected"), (section, key, value, agent.raw()[-2000:])
            else:  # it may not connect: wait until it handles SIGTERM
                agent.wait_log("agent.starting", timeout=20)
                time.sleep(0.3)
            agent.signal(signal.SIGTERM)
        for (section, key, value, _), agent in agents:
            assert agent.wait(timeout=15) == 0, (section, key, value, agent.raw()[-2000:])
            assert "Traceback" not in agent.raw(), (section, key, value)
            assert not agent.events("agent.crashed")
    # The loop above ran something: most keys take most of these values.
    assert len(accepted) >= 20, accepted


# -- hostile domain names -------------------------------------------------------------

# libvirt itself refuses '/', newlines and most control characters in names (XML 1.0
# cannot carry them); everything it accepts must survive the round trip.
HOSTILE = [
    "plus+and#hash",
    "#",
    "+",
    "$SYS",
    "tab\there",
    "del\x7fchar",
    " leading and trailing ",
    "percent%2Fslash",
    "%",
    "..",
    "é雪☃🚀",
    "l" * 250,
    "雪" * 80,
    "emoji-🚀-" * 20,
]


def test_hostile_domain_names_give_valid_topics_that_decode_back_to_the_name(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
    spawn: Callable[..., AgentProcess],
) -> None:
    broker = make_broker()
    sub = make_subscriber(broker.port, f"{prefix}/#")
    node = tmp / "node.xml"
    domains = "".join(
        f"<domain type='test'><name>{escape(name)}</name><memory>1024</memory>"
        f"<vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        for name in HOSTILE
    )
    node.write_text(f"<node>{domains}</node>")
    cfg = agent_config(tmp / "agent.toml", port=broker.port, prefix=prefix, uri=f"test://{node}")
    agent = spawn([*AGENT, "run", "--config", str(cfg)])

    def named() -> set[str]:
        out = set()
        for m in sub.snapshot():
            parsed = parse_topic(prefix, m.topic)
            if parsed.kind == "state" and parsed.domain is not None:
                out.add(parsed.domain)
        return out

    sub.wait(lambda: named() >= set(HOSTILE), timeout=15)
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=5) == 0
    for m in sub.snapshot():
        levels = m.topic.split("/")
        assert all(levels)
        assert not any(c in m.topic for c in "+#\0")
        assert m.topic.isascii()
        parsed = parse_topic(prefix, m.topic)
        assert parsed.host == "rel-host"
        assert parsed.domain is None or parsed.domain in HOSTILE
    assert not agent.events("agent.crashed")
    assert "Traceback" not in agent.raw()


# -- malformed stats records ----------------------------------------------------------

GARBAGE = st.one_of(
    st.none(),
    st.text(max_size=4),
    st.floats(),
    st.integers(max_value=-1),
    st.integers(min_value=2**63),
    st.lists(st.integers(), max_size=2),
    st.just(True),
)
VCPU_FIELDS = ("state", "time", "halted", "halt_wait_ns.sum")


def _good(t: float, busy_ns: int, halt_ns: int, vcpus: int = 2) -> dict[str, object]:
    stats: dict[str, object] = {
        "state.state": 1,
        "state.reason": 1,
        "vcpu.current": vcpus,
        "vcpu.maximum": vcpus,
    }
    for n in range(vcpus):
        stats[f"vcpu.{n}.state"] = 1
        stats[f"vcpu.{n}.time"] = busy_ns
        stats[f"vcpu.{n}.halt_wait_ns.sum"] = halt_ns
    return stats


def _record(stats: dict[str, object], t: float) -> Any:
    return domain_record(name="vm", uuid="u-1", stats=stats, t_mono=t, t_wall=1e9 + t)


@st.composite
def malformed(
    draw: st.DrawFn, good: dict[str, object], prev: dict[str, object]
) -> dict[str, object]:
    """The good record with per-vCPU keys missing, of the wrong type, or gone
    backwards (a guest reset; ``time=0`` after an unplug timeout)."""
    stats = dict(good)
    for n in range(2):
        for field in VCPU_FIELDS:
            key = f"vcpu.{n}.{field}"
            action = draw(st.sampled_from(["keep", "drop", "garbage", "backwards"]))
            if action == "drop":
                stats.pop(key, None)
            elif action == "garbage":
                stats[key] = draw(GARBAGE.filter(functools.partial(_garbage, field)))
            elif action == "backwards" and field in ("time", "halt_wait_ns.sum"):
                stats[key] = draw(st.integers(0, int(str(prev[key])) - 1))
    return stats


def _garbage(field: str, value: object) -> bool:
    return not _valid(field, value)


def _valid(field: str, value: object) -> bool:
    """Whether a value would be read as a real reading (then it is not garbage)."""
    if field == "halted":
        return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    if field == "state" and isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["running", "halted"]))
def test_a_malformed_stats_record_never_crashes_nor_yields_a_transition(
    data: st.DataObject, established: str
) -> None:
    th = Config().sampling.thresholds()
    host = HostState()
    # Three good samples establish both vCPUs as busy (running) or halted (KVM stats).
    busy = established == "running"
    t, cpu, halt = 0.0, 10**9, 10**9
    for _ in range(3):
        t += 1.0
        cpu += 10**9 if busy else 0
        halt += 0 if busy else 10**9
        host, _ = advance(host, [_record(_good(t, cpu, halt), t)], th, complete=True)
    views = {n: v.view for n, v in host.domains["u-1"].vcpus.items()}
    assert {v.state.value for v in views.values() if v} == {established}

    # The next sample as it should have been, then damaged.
    prev = _good(t, cpu, halt)
    t += 1.0
    cpu += 10**9 if busy else 0
    halt += 0 if busy else 10**9
    bad = data.draw(malformed(_good(t, cpu, halt), prev))
    host, changes = advance(host, [_record(bad, t)], th, complete=True)
    assert [c for c in changes if isinstance(c, VcpuTransition)] == []
    # ... and the stream goes on without crashing once good records return.
    for _ in range(3):
        t += 1.0
        cpu += 10**9 if busy else 0
        halt += 0 if busy else 10**9
        host, _ = advance(host, [_record(_good(t, cpu, halt), t)], th, complete=True)


def test_a_halted_vcpu_whose_counters_vanish_for_one_sample_is_not_reported_running() -> None:
    """Found by the property test above: a run state alone once meant "running"."""
    th = Config().sampling.thresholds()
    host = HostState()
    for i in range(1, 4):  # halted: KVM halt-wait grows with wall time, CPU time does not
        host, _ = advance(host, [_record(_good(i, 10**9, i * 10**9), i)], th, complete=True)
    damaged = {k: v for k, v in _good(4, 10**9, 4 * 10**9).items() if ".time" not in k}
    damaged = {k: v for k, v in damaged.items() if "halt_wait" not in k}
    host, changes = advance(host, [_record(damaged, 4.0)], th, complete=True)
    assert [c for c in changes if isinstance(c, VcpuTransition)] == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.one_of(
                st.sampled_from(["state.state", "state.reason", "vcpu.current", "vcpu.maximum"]),
                st.builds(
                    "vcpu.{}.{}".format,
                    st.integers(-1, 4),
                    st.sampled_from([*VCPU_FIELDS, "wait", "delay"]),
                ),
                st.text(max_size=10),
            ),
            st.one_of(GARBAGE, st.integers(0, 10**12), st.booleans()),
            max_size=12,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_arbitrary_stats_dicts_never_crash_the_parser_or_the_differ(
    samples: list[dict[str, object]],
) -> None:
    th = Config().sampling.thresholds()
    host = HostState()
    for i, stats in enumerate(samples):
        record = _record(stats, float(i + 1))
        host, changes = advance(host, [record], th, complete=True)
        for change in changes:
            if isinstance(change, VcpuTransition):
                assert change.before.state is not change.after.state
