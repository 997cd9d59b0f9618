"""MQTT topic names and the reversible encoding of names into one topic level (pure).

A topic level must not contain ``/``, ``+`` or ``#``, must not be empty, and a
level starting with ``$`` is reserved at the start of a topic. Domain names may
contain all of these, spaces, control characters and any unicode. We escape every
byte outside ``[A-Za-z0-9_-]`` of the name's UTF-8 form as ``%XX`` (uppercase hex),
like RFC 3986 percent-encoding with a smaller safe set, so that:

- every encoded level is plain ASCII, non-empty and safe in any broker and shell;
- ``decode_level(encode_level(name)) == name`` for every string;
- names already in the safe set (most real domain names) read unchanged.

``.`` is escaped too (``%2E``): nats-server 2.9's MQTT listener maps ``/`` to the
NATS subject separator ``.`` and closes the connection on a PUBLISH whose topic
holds a ``.`` or a space (docs/scale.md, "nats-server facts"), so an FQDN host id
or a domain ``web.example.com`` would never be delivered there. Topic contract
change (docs/topics.md, "Names in topics"): subscribers decode levels with
``decode_level``/``parse_topic``, never by reading them as names.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPE = re.compile(r"%([0-9A-F]{2})")
_VALID_LEVEL = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+")
MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string length limit


class TopicError(ValueError):
    """A name cannot be made into a topic, or a topic is not one of ours."""


@functools.lru_cache(maxsize=65536)  # asked for every domain of every sample
def _fits(base: str, domain: str) -> bool:
    longest = f"{base}/{encode_level(domain)}/vcpu/99999/transition"
    return len(longest.encode()) <= MAX_TOPIC_BYTES


@functools.lru_cache(maxsize=65536)  # a host has few names; each is encoded per message
def encode_level(name: str) -> str:
    """Encode any string into one safe, reversible topic level."""
    if name == "":
        return "%"  # never produced otherwise: '%' alone is not a valid escape
    data = name.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)


def decode_level(level: str) -> str:
    """Invert ``encode_level``; reject anything it could not have produced."""
    if level == "%":
        return ""
    if not _VALID_LEVEL.fullmatch(level):
        raise TopicError(f"not an encoded topic level: {level!r}")
    raw = bytearray()
    i = 0
    while i < len(level):
        if level[i] == "%":
            raw.append(int(level[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(level[i]))
            i += 1
    if any(b in _SAFE for b in _escaped_bytes(level)):
        raise TopicError(f"not a canonical encoding (escapes a safe byte): {level!r}")
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as err:
        raise TopicError(f"topic level is not UTF-8 once decoded: {level!r}") from err


def _escaped_bytes(level: str) -> list[int]:
    return [int(m.group(1), 16) for m in _ESCAPE.finditer(level)]


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic tree of one host under one prefix."""

    prefix: str
    host: str

    def __post_init__(self) -> None:
        if (
            not self.prefix
            or any(c in self.prefix for c in "+#\0")
            or self.prefix.startswith(("/", "$"))
            or self.prefix.endswith("/")
        ):
            raise TopicError(f"bad topic prefix {self.prefix!r}")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{encode_level(self.host)}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def gap(self) -> str:
        """Overflow markers; two levels like ``status``, so no domain can collide."""
        return f"{self.base}/gap"

    def fits(self, domain: str) -> bool:
        """Whether every topic of this domain fits MQTT's limit (its longest is a
        ``transition`` topic; vCPU indices stay below 10^5, records.MAX_VCPUS)."""
        return _fits(self.base, domain)

    def domain_state(self, domain: str) -> str:
        return self._checked(f"{self.base}/{encode_level(domain)}/state")

    def lifecycle(self, domain: str) -> str:
        return self._checked(f"{self.base}/{encode_level(domain)}/lifecycle")

    def vcpu_state(self, domain: str, vcpu: int) -> str:
        return self._checked(f"{self.base}/{encode_level(domain)}/vcpu/{vcpu}/state")

    def vcpu_transition(self, domain: str, vcpu: int) -> str:
        return self._checked(f"{self.base}/{encode_level(domain)}/vcpu/{vcpu}/transition")

    @staticmethod
    def _checked(topic: str) -> str:
        if len(topic.encode()) > MAX_TOPIC_BYTES:
            raise TopicError(f"topic longer than {MAX_TOPIC_BYTES} bytes: {topic[:80]}...")
        return topic


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic of ours, taken apart: what a subscriber needs to route a message."""

    host: str
    kind: str  # "status" | "gap" | "state" | "lifecycle" | "vcpu_state" | "vcpu_transition"
    domain: str | None = None
    vcpu: int | None = None


def parse_topic(prefix: str, topic: str) -> ParsedTopic:
    """Take one of our topics apart, decoding host and domain names."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise TopicError(f"topic {topic!r} is not under prefix {prefix!r}")
    parts = topic[len(head) :].split("/")
    match parts:
        case [host, ("status" | "gap") as kind]:
            return ParsedTopic(host=decode_level(host), kind=kind)
        case [host, domain, ("state" | "lifecycle") as kind]:
            return ParsedTopic(host=decode_level(host), kind=kind, domain=decode_level(domain))
        case [host, domain, "vcpu", n, ("state" | "transition") as leaf] if n.isdigit():
            return ParsedTopic(
                host=decode_level(host),
                kind=f"vcpu_{leaf}",
                domain=decode_level(domain),
                vcpu=int(n),
            )
    raise TopicError(f"topic {topic!r} is not one of vcpu-agent's")
