"""Load ``config.toml`` into a frozen, validated ``Config`` (pure but for the read).

Strict by design: unknown sections and keys are errors, every value is type- and
range-checked, and *all* problems are reported at once, each with its TOML path
(``mqtt.port: expected an integer from 1 to 65535, got "x"``). The CLI turns a
``ConfigError`` into exit status 78 (EX_CONFIG), which the unit file marks as
not worth restarting for.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import stat
import tomllib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.classify import Thresholds

DEFAULT_PATH = Path("/etc/vcpu-agent/config.toml")
EX_CONFIG = 78

# MQTT strings (topics, client id, username) and binary data (the password) are at
# most 65535 bytes: a two-byte length prefix (MQTT 5 sections 1.5.4 and 1.5.6).
# paho does not check: a longer one fails in struct.pack and the agent crashed.
MQTT_MAX_BYTES = 65535
# A topic is prefix/host/domain/vcpu/N/transition, and must fit in 65535 bytes.
# Prefix and host id are short identifiers; capping both at 256 bytes (the host id
# is encoded, so at most 768 bytes in a topic) leaves over 64,000 bytes for the
# encoded domain name, so no real domain name can be pushed out of its topic by
# the configuration. The host id's cap is on its UTF-8 form, before encoding.
MAX_PREFIX_BYTES = 256
MAX_HOST_ID_BYTES = 256
# A config file is a few kilobytes; anything larger is the wrong file.
MAX_CONFIG_BYTES = 1 << 20
# While /proc serves every running domain, the libvirt bulk call (domain state,
# online vCPUs) still runs this often, seconds (docs/design.md, "Sampling").
PROC_LIBVIRT_EVERY = 5.0


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


def _mqtt_unsafe(c: str) -> bool:
    """Characters an MQTT string should not hold (MQTT 5 section 1.5.4: controls
    U+0001-U+001F and U+007F-U+009F, and Unicode noncharacters). mosquitto 2 closes
    the connection without a CONNACK on any of them in a topic, client id or
    username (measured: docs/reliability.md, "Bad input"), so the agent would retry
    forever."""
    o = ord(c)
    return (
        o < 0x20
        or 0x7F <= o <= 0x9F
        or 0xFDD0 <= o <= 0xFDEF
        or (o & 0xFFFE) == 0xFFFE
        or unicodedata.category(c) == "Cs"
    )


def _text(*, empty: bool = True, forbid: str = "", max_bytes: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"expected a string, got {_type_name(v)}"
        if not empty and not v:
            return "must not be empty"
        bad = sorted({c for c in v if c in forbid or _mqtt_unsafe(c)})
        if bad:
            shown = ", ".join(repr(c) for c in bad[:5]) + (", ..." if len(bad) > 5 else "")
            return f"must not contain {shown}"
        size = len(v.encode("utf-8", "surrogatepass"))
        if max_bytes is not None and size > max_bytes:
            return f"must be at most {max_bytes} bytes in UTF-8, got {size}"
        return None

    return check


def _topic_prefix(v: Any) -> str | None:
    error = _text(empty=False, forbid="+#", max_bytes=MAX_PREFIX_BYTES)(v)
    if error:
        return error
    if v.startswith("$"):
        # Brokers reserve topics starting with $ ($SYS): clients cannot subscribe
        # to them with # and mosquitto refuses publications to them.
        return f"must not start with '$' (reserved by brokers, as in $SYS), got {v!r}"
    if "" in v.split("/"):
        return f"must not have an empty topic level (a leading or trailing '/', or '//'), got {v!r}"
    return None


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def _broker_host(v: Any) -> str | None:
    """An IPv4/IPv6 literal, or a DNS name in ASCII (RFC 1035 lengths).

    Non-ASCII is refused rather than converted: Python's ``idna`` codec (which
    getaddrinfo would use) implements IDNA 2003 and maps 'ß' to 'ss', so it may
    resolve a different name than IDNA 2008 (xn--strae-oqa); and it raised
    UnicodeError for an empty or over-long label, which crashed ``run``.
    """
    error = _text(empty=False)(v)
    if error:
        return error
    if ":" in v:
        try:
            ipaddress.IPv6Address(v)
        except ValueError:
            return f"expected a host name or an IP address (IPv6 without brackets), got {v!r}"
        return None
    if not v.isascii():
        return f"must be ASCII (an internationalised name in its IDNA form, xn--...), got {v!r}"
    name = v.removesuffix(".")  # a fully qualified name may end with a dot
    if len(name) > 253:
        return f"a host name is at most 253 characters, got {len(name)}"
    for label in name.split("."):
        if not label:
            return f"a host name must not have an empty label ('..' or a leading '.'), got {v!r}"
        if len(label) > 63:
            return f"a host name label is at most 63 characters, got one of {len(label)}"
        if not _HOST_LABEL.fullmatch(label):
            return f"expected a host name (letters, digits, '-', '_', '.') or an IP, got {v!r}"
    return None


MAX_SERVERS = 64  # broker endpoints in mqtt.servers; a cluster has a handful


def split_server(text: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port); ValueError saying why."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:1883"), got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"brackets are for an IPv6 address only, got {text!r}")
    elif ":" in host:
        raise ValueError(f'an IPv6 address needs brackets ("[{host}]:{port_text}"), got {text!r}')
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port from 1 to 65535 after the ':', got {text!r}")
    error = _broker_host(host)
    if error:
        raise ValueError(error)
    return host, int(port_text)


def _servers(v: Any) -> str | None:
    """A non-empty list of distinct ``host:port`` strings; an item's error is
    reported as ``mqtt.servers[i]: ...`` (parse joins a leading ``[`` directly)."""
    if not isinstance(v, list):
        return f'expected a list of "host:port" strings, got {_type_name(v)}'
    if not v:
        return None  # the default: mqtt.host and mqtt.port
    if len(v) > MAX_SERVERS:
        return f"at most {MAX_SERVERS} servers, got {len(v)}"
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(v):
        if not isinstance(item, str):
            return f'[{i}]: expected a "host:port" string, got {_type_name(item)}'
        try:
            endpoint = split_server(item)
        except ValueError as err:
            return f"[{i}]: {err}"
        if endpoint in seen:
            return f"[{i}]: {item!r} repeats mqtt.servers[{seen[endpoint]}]"
        seen[endpoint] = i
    return None


def _qos(v: Any) -> str | None:
    if v == 2 and isinstance(v, int) and not isinstance(v, bool):
        # paho-mqtt 2.x ignores the reason code of a PUBREC (Client._handle_pubrec:
        # "TODO: by ignoring reason code & properties ...") and completes the flow
        # with PUBREL/PUBCOMP even when the broker refused the message (mosquitto
        # answers "quota exceeded" under max_inflight_messages), so a lost event
        # would be counted as delivered. QoS 2 cannot be made honest through paho.
        return (
            "QoS 2 is not supported: paho-mqtt ignores a refusal in PUBREC "
            "(paho.mqtt.client.Client._handle_pubrec) and would report a refused "
            "event as delivered; use 1 (with seq to drop duplicates) or 0"
        )
    return _integer(0, 1)(v)


def _choice(*options: str) -> Check:
    def check(v: Any) -> str | None:
        if v in options:
            return None
        return f"expected one of {', '.join(repr(o) for o in options)}, got {_type_name(v)}"

    return check


def _password_file(v: Any) -> str | None:
    error = _readable_file(optional=True)(v)
    if error or not v:
        return error
    try:
        read_password_file(v)
    except PasswordError as err:
        return str(err)
    return None


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
    host_id: str = _setting("", _text(forbid="/+#", max_bytes=MAX_HOST_ID_BYTES))


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
    # The tick: vCPUs read from /proc (agent/schedstat.py) are looked at this often.
    interval: float = _setting(0.25, _number(0.05, 3600.0))
    # The libvirt bulk call's cadence for running domains /proc does not serve
    # (KVM, single-threaded TCG, s390, /proc hidden); never more often than
    # ``interval``. While /proc serves every running domain the call runs every
    # PROC_LIBVIRT_EVERY s, for what only libvirt knows (state, online vCPUs).
    libvirt_interval: float = _setting(1.0, _number(0.05, 3600.0))
    halted_enter: float = _setting(0.7, _number(0.0, 1.0))
    halted_leave: float = _setting(0.3, _number(0.0, 1.0))
    min_samples: int = _setting(1, _integer(1, 100))
    unknown_after: int = _setting(3, _integer(1, 100))
    event_followup: float = _setting(0.25, _number(0.0, 60.0))
    confirm_after: float = _setting(0.1, _number(0.0, 60.0))

    @property
    def libvirt_every(self) -> float:
        """Seconds between bulk calls while some running domain is not on /proc."""
        return max(self.interval, self.libvirt_interval)

    @property
    def libvirt_longest(self) -> float:
        """The longest the agent goes between bulk calls (all domains on /proc)."""
        return max(self.libvirt_every, PROC_LIBVIRT_EVERY)

    def thresholds(self) -> Thresholds:
        return Thresholds(
            halted_enter=self.halted_enter,
            halted_leave=self.halted_leave,
            min_samples=self.min_samples,
            unknown_after=self.unknown_after,
        )


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str = _setting("localhost", _broker_host)
    port: int = _setting(1883, _integer(1, 65535))
    # Broker endpoints of one cluster, tried in turn (docs/scale.md, "Failover").
    # Non-empty, it replaces host/port; host/port set away from their defaults
    # beside it is an error (two brokers configured; nothing silently ignored).
    servers: tuple[str, ...] = _setting((), _servers)
    topic_prefix: str = _setting("vcpu", _topic_prefix)
    client_id: str = _setting("", _text(max_bytes=MQTT_MAX_BYTES))
    protocol: str = _setting("5", _choice("5", "3.1.1"))
    keepalive: int = _setting(30, _integer(5, 65535))
    qos: int = _setting(1, _qos)
    username: str = _setting("", _text(max_bytes=MQTT_MAX_BYTES))
    password_file: str = _setting("", _password_file)
    tls: bool = _setting(False, _boolean)
    ca_file: str = _setting("", _readable_file(optional=True))
    cert_file: str = _setting("", _readable_file(optional=True))
    key_file: str = _setting("", _readable_file(optional=True))
    reconnect_min: float = _setting(1.0, _number(0.0, 3600.0, lo_open=True))
    reconnect_max: float = _setting(30.0, _number(0.0, 3600.0, lo_open=True))

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """Where the broker is: every ``servers`` entry in order, else (host, port)."""
        if self.servers:
            return tuple(split_server(s) for s in self.servers)
        return ((self.host, self.port),)


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
    default = MqttSection()
    single = (default.host, default.port)
    if m.servers and (m.host, m.port) != single:
        # Two different brokers configured: say so rather than pick one silently.
        problems.append(
            "mqtt.servers: replaces mqtt.host and mqtt.port; leave those at their "
            f"defaults ({single[0]}, {single[1]}) or remove them, got {m.host}:{m.port}"
        )
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
                    sep = "" if error.startswith("[") else ": "  # mqtt.servers[1]: ...
                    problems.append(f"{name}.{f.name}{sep}{error}")
                else:
                    value = table[f.name]
                    if f.type == "float":
                        value = float(value)
                    elif isinstance(value, list):
                        value = tuple(value)  # frozen all the way down
                    values[f.name] = value
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


def _read_regular(path: Path | str, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit``; never blocks on a FIFO or device.

    Raises OSError (errno set by the kernel) or ValueError (with the reason).
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket"
                if stat.S_ISSOCK(mode)
                else "not a regular file"
            )
            raise ValueError(f"is {kind}, not a regular file")
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ValueError(f"is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        data = _read_regular(path, MAX_CONFIG_BYTES)
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read: {err.strerror or err}"]) from err
    except ValueError as err:
        raise ConfigError(str(path), [f"cannot read: {err}"]) from err
    try:
        # As Path.read_text: universal newlines (TOML allows \r\n; a lone \r is
        # then a newline too, as before).
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), [f"cannot read: not UTF-8 text ({err})"]) from err
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), [f"not valid TOML: {err}"]) from err
    return parse(document, str(path))


class PasswordError(OSError):
    """The password file cannot be used; the message says why (never the password).

    An OSError, so that a file that goes bad while the agent runs is handled like
    any other failed connection attempt: logged with this reason, retried with
    backoff (agent/mqtt.py catches OSError around the connect).
    """


def read_password_file(path: str) -> str:
    """The password in ``path``: UTF-8, trailing newline stripped, not empty, at
    most 65535 bytes (MQTT's limit). Raises PasswordError saying what is wrong."""
    try:
        data = _read_regular(path, MAX_CONFIG_BYTES)
    except OSError as err:
        raise PasswordError(f"cannot read password file {path!r}: {err.strerror or err}") from err
    except ValueError as err:
        raise PasswordError(f"password file {path!r} {err}") from err
    try:
        password = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise PasswordError(f"password file {path!r} is not UTF-8 text (byte {err.start})") from err
    size = len(password.encode())
    if not password:
        raise PasswordError(
            f"password file {path!r} is empty (for a username without a password, "
            "leave mqtt.password_file empty)"
        )
    if size > MQTT_MAX_BYTES:
        raise PasswordError(
            f"password file {path!r} holds {size} bytes; MQTT allows at most {MQTT_MAX_BYTES}"
        )
    return password


def read_password(cfg: MqttSection) -> str | None:
    """The broker password, from its file; trailing newline stripped. Never logged.

    Raises PasswordError (an OSError) with the reason when the file went bad since
    the config was checked.
    """
    if not cfg.password_file:
        return None
    return read_password_file(cfg.password_file)
