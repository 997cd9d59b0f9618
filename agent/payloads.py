"""The JSON bodies vcpu-agent publishes: one typed class per message, both ways.

Every body is a JSON object with ``schema`` (this module's ``SCHEMA``) and ``kind``.
The agent encodes with ``Payload.encode()``; subscribers decode with ``decode()``,
which checks every field's type and rejects unknown kinds and newer schemas, so a
subscriber reusing this module sees typed values or a ``PayloadError``, never a
half-read dict. Times are UTC RFC 3339 strings with milliseconds ("...T12:00:00.123Z").
``docs/topics.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Self

SCHEMA = 2
# Schema 2 added ``epoch`` (status, vcpu_state, transition, lifecycle, gap) and
# fixed what a retained vcpu_state's ``seq`` means (docs/topics.md, "Schema").
# One encoder: json.dumps with non-default options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class PayloadError(ValueError):
    """A message body is not a valid vcpu-agent payload."""


@functools.lru_cache(maxsize=1024)  # the changes of one sample share their times
def rfc3339(t: float) -> str:
    """UTC timestamp with milliseconds, e.g. ``2026-11-26T09:00:00.123Z``."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise PayloadError(f"not an RFC 3339 time: {text!r}") from err
    if moment.tzinfo is None:
        raise PayloadError(f"time without a zone: {text!r}")
    return moment.timestamp()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Payload:
    """Base of all bodies: ``kind`` names the class, ``schema`` its version."""

    KIND: ClassVar[str] = ""
    host: str

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"schema": SCHEMA, "kind": self.KIND}
        for key, name in _wire_names(type(self)):
            body[key] = getattr(self, name)
        return body

    def encode(self) -> bytes:
        return _ENCODER.encode(self.to_dict()).encode()

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Self:
        values: dict[str, Any] = {}
        for key, name, check in _validators(cls):
            try:
                value = body[key]
            except KeyError:
                raise PayloadError(f"{cls.KIND}: missing field {key!r}") from None
            values[name] = check(value)
        return cls(**values)


_WIRE_NAMES: dict[type[Payload], tuple[tuple[str, str], ...]] = {}


def _wire_names(cls: type[Payload]) -> tuple[tuple[str, str], ...]:
    """(JSON key, attribute) of every field, in order; computed once per class."""
    names = _WIRE_NAMES.get(cls)
    if names is None:
        names = tuple((f.metadata.get("key", f.name), f.name) for f in dataclasses.fields(cls))
        _WIRE_NAMES[cls] = names
    return names


Validator = Callable[[object], object]
_VALIDATORS: dict[type[Payload], tuple[tuple[str, str, Validator], ...]] = {}


def _validators(cls: type[Payload]) -> tuple[tuple[str, str, Validator], ...]:
    """(JSON key, attribute, checker) of every field, built once per class.

    ``typing.get_type_hints`` costs ~300 us per class: resolving the hints on each
    message made ``decode`` 40x slower than ``json.loads`` (issue 8).
    """
    found = _VALIDATORS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = tuple(
            (key, name, _validator(cls.KIND, key, hints[name])) for key, name in _wire_names(cls)
        )
        _VALIDATORS[cls] = found
    return found


def _validator(kind: str, key: str, hint: object) -> Validator:
    """A checker for one field, specialised for its hint; same rules as ``_check``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = frozenset(typing.get_args(hint))

        def literal(value: object) -> object:
            if isinstance(value, str) and value in allowed:
                return value
            return _check(kind, key, value, hint)  # raises with the reference message

        return literal
    if origin in (types.UnionType, typing.Union):
        arms = typing.get_args(hint)
        if len(arms) == 2 and type(None) in arms:  # "X | None"
            inner = _validator(kind, key, next(a for a in arms if a is not type(None)))

            def optional(value: object) -> object:
                if value is None:
                    return None
                try:
                    return inner(value)
                except PayloadError:  # the reference's message for the whole union
                    return _check(kind, key, value, hint)

            return optional
        return lambda value: _check(kind, key, value, hint)
    if hint is str:

        def text(value: object) -> object:
            if type(value) is str:
                return value
            return _check(kind, key, value, hint)

        return text
    if hint is int:

        def integer(value: object) -> object:
            if type(value) is int:
                return value
            return _check(kind, key, value, hint)

        return integer
    if hint is float:

        def number(value: object) -> object:
            if isinstance(value, float | int) and type(value) is not bool and math.isfinite(value):
                return float(value)
            return _check(kind, key, value, hint)

        return number
    if hint is bool:

        def flag(value: object) -> object:
            if type(value) is bool:
                return value
            return _check(kind, key, value, hint)

        return flag
    raise TypeError(f"unsupported field type {hint!r}")  # pragma: no cover


def _check(kind: str, key: str, value: object, hint: object) -> object:  # noqa: PLR0912
    """Check ``value`` against a field's type hint (the few shapes we use)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        for arm in typing.get_args(hint):
            try:
                return _check(kind, key, value, arm)
            except PayloadError:
                continue
        raise PayloadError(f"{kind}.{key}: unexpected value {value!r}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise PayloadError(f"{kind}.{key}: {value!r} is not one of {typing.get_args(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    else:  # pragma: no cover - a programming error in this module
        raise TypeError(f"unsupported field type {hint!r}")
    raise PayloadError(f"{kind}.{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


StateName = Literal["offline", "running", "blocked", "halted", "unknown", "n/a"]
SourceName = Literal["libvirt", "kvm", "cputime", "vcpustate", "domstate"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Status(Payload):
    """``<prefix>/<host>/status``, retained: the agent's birth and last will."""

    KIND: ClassVar[str] = "status"
    status: Literal["online", "offline"]
    version: str
    started_at: str
    epoch: str  # the numbering space of every seq this agent publishes (see Transition)
    at: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VcpuStatePayload(Payload):
    """``.../<domain>/vcpu/<n>/state``, retained: the vCPU's current state."""

    KIND: ClassVar[str] = "vcpu_state"
    domain: str
    uuid: str
    vcpu: int
    state: StateName
    label: str  # the seed's text: "running (halted)", "no state", "N/A", ...
    source: SourceName
    ratio: float | None  # halted share of the deciding interval, 0..1
    since: str  # when this state began (estimated for kvm/cputime)
    seq: int  # the seq of the transition that entered this state (0: none yet)
    epoch: str
    at: str  # when it was observed


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Transition(Payload):
    """``.../<domain>/vcpu/<n>/transition``, QoS 1, not retained: one change."""

    KIND: ClassVar[str] = "transition"
    domain: str
    uuid: str
    vcpu: int
    from_state: StateName = dataclasses.field(metadata={"key": "from"})
    to_state: StateName = dataclasses.field(metadata={"key": "to"})
    source: SourceName
    ratio: float | None
    at: str  # when the agent saw it (the sample's time)
    changed_at: str  # best estimate of when it happened, from straddling intervals
    previous_duration_s: float  # time spent in ``from``
    seq: int  # per vCPU, +1 per transition: gaps and duplicates are detectable
    # seqs are numbered within an epoch: a new epoch (a new spool, or a memory-only
    # agent's restart) starts every seq at 1 again, so a subscriber resets its chain.
    epoch: str
    resync: bool  # a change the agent found, not saw: it happened while it could not look


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DomainStatePayload(Payload):
    """``.../<domain>/state``, retained: the domain's run state and vCPU counts."""

    KIND: ClassVar[str] = "domain_state"
    domain: str
    uuid: str
    state: Literal[
        "nostate",
        "running",
        "blocked",
        "paused",
        "shutdown",
        "shutoff",
        "crashed",
        "pmsuspended",
    ]
    reason: int
    vcpus_current: int | None
    vcpus_maximum: int | None
    at: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Lifecycle(Payload):
    """``.../<domain>/lifecycle``, QoS 1, not retained: one libvirt lifecycle event."""

    KIND: ClassVar[str] = "lifecycle"
    domain: str
    uuid: str
    event: str  # "defined", "started", "suspended", "resumed", "stopped", "rebooted", ...
    detail: str
    at: str
    seq: int  # per domain, +1 per event
    epoch: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Gap(Payload):
    """``<prefix>/<host>/gap``, QoS 1, not retained: events were lost to overflow.

    The spool (``spool.max_events``) was full during a long outage and its oldest
    events were dropped. A subscriber seeing a skipped ``seq`` after this marker
    knows why; without it, a skipped seq means something else went wrong.
    """

    KIND: ClassVar[str] = "gap"
    dropped: int  # events dropped since the previous gap marker
    dropped_total: int  # events dropped over the spool's whole life (this epoch)
    epoch: str
    at: str


PAYLOADS: dict[str, type[Payload]] = {
    cls.KIND: cls
    for cls in (Status, VcpuStatePayload, Transition, DomainStatePayload, Lifecycle, Gap)
}


def decode(data: bytes | str) -> Payload:
    """Decode any vcpu-agent body into its typed class."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise PayloadError(f"not JSON: {err}") from err
    if not isinstance(body, dict):
        raise PayloadError("not a JSON object")
    schema = body.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise PayloadError(f"bad schema field: {schema!r}")
    if schema > SCHEMA:
        raise PayloadError(f"schema {schema} is newer than this reader's {SCHEMA}")
    kind = body.get("kind")
    cls = PAYLOADS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PayloadError(f"unknown kind: {kind!r}")
    return cls.from_dict(body)
