"""Load ``config.toml`` into a frozen, validated ``Config`` (pure but for the read).

Strict by design: unknown sections and keys are errors, every value is type- and
range-checked, and *all* problems are reported at once, each with its TOML path
(``mqtt.port: expected an integer from 1 to 65535, got "x"``). The CLI turns a
``ConfigError`` into exit status 78 (EX_CONFIG), which the unit file marks as
not worth restarting for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.classify import Thresholds

DEFAULT_PATH = Path("/etc/vcpu-agent/config.toml")
EX_CONFIG = 78


class ConfigError(Exception):
    """Every problem found in one config file, each naming its TOML path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


# Each field carries a checker: value -> error text (None when fine).
Check = Callable[[Any], str | None]


def _setting(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


def _type_name(value: object) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, str) else repr(value)


def _number(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if ok and (v > lo if lo_open else v >= lo) and v <= hi:
            return None
        left = "(" if lo_open else "["
        return f"expected a number in {left}{lo}, {hi}], got {_type_name(v)}"

    return check


def _integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            return None
        return f"expected an integer from {lo} to {hi}, got {_type_name(v)}"

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {_type_name(v)}"


def _text(*, empty: bool = True, forbid: str = "") -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"expected a string, got {_type_name(v)}"
        if not empty and not v:
            return "must not be empty"
        bad = sorted({c for c in v if c in forbid or ord(c) < 32})
        if bad:
            return f"must not contain {', '.join(repr(c) for c in bad)}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        if v in options:
            return None
        return f"expected one of {', '.join(repr(o) for o in options)}, got {_type_name(v)}"

    return check


def _readable_file(*, optional: bool) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"expected a file path string, got {_type_name(v)}"
        if not v:
            return None if optional else "must not be empty"
        if not os.access(v, os.R_OK) or not Path(v).is_file():
            return f"cannot read file {v!r}"
        return None

    return check


@dataclass(frozen=True, slots=True)
class AgentSection:
    host_id: str = _setting("", _text(forbid="/+#"))


@dataclass(frozen=True, slots=True)
class LibvirtSection:
    uri: str = _setting("qemu:///system", _text(empty=False))
    read_only: bool = _setting(True, _boolean)
    call_timeout: float = _setting(3.0, _number(0.0, 600.0, lo_open=True))
    reconnect_min: float = _setting(1.0, _number(0.0, 3600.0, lo_open=True))
    reconnect_max: float = _setting(30.0, _number(0.0, 3600.0, lo_open=True))
    keepalive_interval: int = _setting(5, _integer(1, 3600))
    keepalive_count: int = _setting(3, _integer(1, 100))


@dataclass(frozen=True, slots=True)
class SamplingSection:
    interval: float = _setting(1.0, _number(0.05, 3600.0))
    halted_enter: float = _setting(0.7, _number(0.0, 1.0))
    halted_leave: float = _setting(0.3, _number(0.0, 1.0))
    min_samples: int = _setting(1, _integer(1, 100))
    unknown_after: int = _setting(3, _integer(1, 100))
    event_followup: float = _setting(0.25, _number(0.0, 60.0))
    confirm_after: float = _setting(0.1, _number(0.0, 60.0))

    def thresholds(self) -> Thresholds:
        return Thresholds(
            halted_enter=self.halted_enter,
            halted_leave=self.halted_leave,
            min_samples=self.min_samples,
            unknown_after=self.unknown_after,
        )


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str = _setting("localhost", _text(empty=False))
    port: int = _setting(1883, _integer(1, 65535))
    topic_prefix: str = _setting("vcpu", _text(empty=False, forbid="+#"))
    client_id: str = _setting("", _text())
    protocol: str = _setting("5", _choice("5", "3.1.1"))
    keepalive: int = _setting(30, _integer(5, 65535))
    qos: int = _setting(1, _integer(0, 2))
    username: str = _setting("", _text())
    password_file: str = _setting("", _readable_file(optional=True))
    tls: bool = _setting(False, _boolean)
    ca_file: str = _setting("", _readable_file(optional=True))
    cert_file: str = _setting("", _readable_file(optional=True))
    key_file: str = _setting("", _readable_file(optional=True))
    reconnect_min: float = _setting(1.0, _number(0.0, 3600.0, lo_open=True))
    reconnect_max: float = _setting(30.0, _number(0.0, 3600.0, lo_open=True))


@dataclass(frozen=True, slots=True)
class SpoolSection:
    # The unit's StateDirectory; "" keeps events in memory only (still spool.max_events).
    path: str = _setting("/var/lib/vcpu-agent/spool.sqlite3", _text())
    max_events: int = _setting(100000, _integer(1, 100_000_000))
    synchronous: Literal["normal", "full"] = _setting("normal", _choice("normal", "full"))


@dataclass(frozen=True, slots=True)
class LogSection:
    format: Literal["auto", "json", "console"] = _setting(
        "auto", _choice("auto", "json", "console")
    )
    level: str = _setting("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    libvirt: LibvirtSection = field(default_factory=LibvirtSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def host_id(self) -> str:
        return self.agent.host_id or socket.gethostname()


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "libvirt": LibvirtSection,
    "sampling": SamplingSection,
    "mqtt": MqttSection,
    "spool": SpoolSection,
    "log": LogSection,
}


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    s, m, lv = cfg.sampling, cfg.mqtt, cfg.libvirt
    if s.halted_leave >= s.halted_enter:
        problems.append(
            "sampling.halted_leave: must be below sampling.halted_enter "
            f"({s.halted_leave} >= {s.halted_enter})"
        )
    for sect, lo, hi in (
        ("mqtt", m.reconnect_min, m.reconnect_max),
        ("libvirt", lv.reconnect_min, lv.reconnect_max),
    ):
        if lo > hi:
            problems.append(f"{sect}.reconnect_min: must not exceed {sect}.reconnect_max")
    if bool(m.cert_file) != bool(m.key_file):
        problems.append("mqtt.cert_file: needs mqtt.key_file too (and the reverse)")
    if (m.ca_file or m.cert_file) and not m.tls:
        problems.append("mqtt.tls: must be true when mqtt.ca_file or mqtt.cert_file is set")
    if m.password_file and not m.username:
        problems.append("mqtt.password_file: needs mqtt.username")
    return problems


def parse(document: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a parsed TOML document; raise ConfigError with every problem."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {_type_name(table)}")
            continue
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in table:
                error = f.metadata["check"](table[f.name])
                if error:
                    problems.append(f"{name}.{f.name}: {error}")
                else:
                    value = table[f.name]
                    values[f.name] = float(value) if f.type == "float" else value
        names = {f.name for f in dataclasses.fields(cls)}
        problems.extend(f"{name}.{key}: unknown key" for key in table if key not in names)
        sections[name] = cls(**values)
    problems.extend(f"{key}: unknown section" for key in document if key not in _SECTIONS)
    # Invalid values were left at their defaults, so the cross checks can still run
    # and the user sees every problem in one go.
    cfg = Config(**sections)
    problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), [f"cannot read: {err}"]) from err
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"not valid TOML: {err}"]) from err
    return parse(document, str(path))


def read_password(cfg: MqttSection) -> str | None:
    """The broker password, from its file; trailing newline stripped. Never logged."""
    if not cfg.password_file:
        return None
    return Path(cfg.password_file).read_text(encoding="utf-8").rstrip("\r\n")
