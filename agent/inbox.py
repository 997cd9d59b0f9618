"""One message off the bus, read into a typed value or a ``BadMessage`` (pure).

Everything a broker hands a subscriber is untrusted: any client allowed to
publish under the prefix can send anything. ``read`` never raises: a topic that
is not ours, a body that is not JSON, an unknown schema or kind, a body whose
host, domain, vCPU or kind contradicts its topic, or one larger than
``max_bytes`` (checked before parsing) becomes a ``BadMessage`` with a short,
stable ``reason`` that subscribers count and log.
"""

from __future__ import annotations

import functools

from agent.chain import BadMessage, DomainCleared, VcpuCleared
from agent.payloads import (
    DomainStatePayload,
    Gap,
    Lifecycle,
    Payload,
    PayloadError,
    Status,
    Transition,
    VcpuStatePayload,
    decode,
)
from agent.topics import ParsedTopic, TopicError, parse_topic

MAX_BYTES = 64 * 1024  # the largest real body is well under 1 KiB

_KINDS: dict[str, type[Payload]] = {
    "status": Status,
    "gap": Gap,
    "state": DomainStatePayload,
    "lifecycle": Lifecycle,
    "vcpu_state": VcpuStatePayload,
    "vcpu_transition": Transition,
}

Item = Payload | VcpuCleared | DomainCleared | BadMessage


def _reason(err: PayloadError) -> str:
    text = str(err)
    if text.startswith(("not JSON", "not a JSON object")):
        return "json"
    if "schema" in text:
        return "schema"
    if text.startswith("unknown kind"):
        return "kind"
    return "field"


# A host's topics repeat with every message (one per vCPU): parse each once.
# Errors are not cached (lru_cache does not keep exceptions), valid topics are.
_parse = functools.lru_cache(maxsize=65536)(parse_topic)


def read(prefix: str, topic: str, payload: bytes, *, max_bytes: int = MAX_BYTES) -> Item:
    try:
        where = _parse(prefix, topic)
    except TopicError as err:
        return BadMessage(topic=topic, reason="topic", detail=str(err))
    if not payload:
        if where.kind == "vcpu_state" and where.domain is not None and where.vcpu is not None:
            return VcpuCleared(host=where.host, domain=where.domain, vcpu=where.vcpu)
        if where.kind == "state" and where.domain is not None:
            return DomainCleared(host=where.host, domain=where.domain)
        return BadMessage(topic=topic, reason="empty", detail=f"empty {where.kind} message")
    if len(payload) > max_bytes:
        return BadMessage(
            topic=topic, reason="too-large", detail=f"{len(payload)} bytes > {max_bytes}"
        )
    try:
        body = decode(payload)
    except PayloadError as err:
        return BadMessage(topic=topic, reason=_reason(err), detail=str(err)[:200])
    problem = _mismatch(where, body)
    if problem:
        return BadMessage(topic=topic, reason="mismatch", detail=problem)
    return body


def _mismatch(where: ParsedTopic, body: Payload) -> str | None:
    if type(body) is not _KINDS[where.kind]:
        return f"a {body.KIND} body on a {where.kind} topic"
    if body.host != where.host:
        return f"host {body.host!r} on the topic of host {where.host!r}"
    domain = getattr(body, "domain", None)
    if where.domain is not None and domain != where.domain:
        return f"domain {domain!r} on the topic of domain {where.domain!r}"
    vcpu = getattr(body, "vcpu", None)
    if where.vcpu is not None and vcpu != where.vcpu:
        return f"vCPU {vcpu!r} on the topic of vCPU {where.vcpu}"
    return None
