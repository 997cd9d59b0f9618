from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.payloads import (
    SCHEMA,
    DomainStatePayload,
    Lifecycle,
    PayloadError,
    Status,
    Transition,
    VcpuStatePayload,
    decode,
    parse_rfc3339,
    rfc3339,
)

TRANSITION = Transition(
    host="h",
    domain="vm/1",
    uuid="u",
    vcpu=0,
    from_state="running",
    to_state="halted",
    source="kvm",
    ratio=0.99,
    at="2026-11-26T09:00:01.000Z",
    changed_at="2026-11-26T09:00:00.400Z",
    previous_duration_s=3.0,
    seq=7,
    epoch="e1",
    resync=False,
)
SAMPLES = [
    TRANSITION,
    Status(
        host="h",
        status="online",
        version="0.1.0",
        started_at="2026-11-26T09:00:00.000Z",
        epoch="e1",
        at="2026-11-26T09:00:00.000Z",
    ),
    VcpuStatePayload(
        host="h",
        domain="d",
        uuid="u",
        vcpu=3,
        state="halted",
        label="running (halted)",
        source="cputime",
        ratio=None,
        since="2026-11-26T09:00:00.000Z",
        seq=0,
        epoch="e1",
        at="2026-11-26T09:00:00.000Z",
    ),
    DomainStatePayload(
        host="h",
        domain="d",
        uuid="u",
        state="paused",
        reason=1,
        vcpus_current=2,
        vcpus_maximum=None,
        at="2026-11-26T09:00:00.000Z",
    ),
    Lifecycle(
        host="h",
        domain="d",
        uuid="u",
        event="suspended",
        detail="paused",
        at="2026-11-26T09:00:00.000Z",
        seq=1,
        epoch="e1",
    ),
]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: p.KIND)
def test_every_payload_decodes_back_to_itself(payload: object) -> None:
    assert decode(payload.encode()) == payload  # type: ignore[attr-defined]


def test_a_transition_uses_from_and_to_on_the_wire() -> None:
    body = json.loads(TRANSITION.encode())
    assert body["schema"] == SCHEMA
    assert body["kind"] == "transition"
    assert (body["from"], body["to"]) == ("running", "halted")


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = json.loads(TRANSITION.encode())
    body["added_later"] = 1
    assert decode(json.dumps(body)) == TRANSITION


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop("vcpu"), "missing field 'vcpu'"),
        (lambda b: b.update(vcpu="0"), "transition.vcpu"),
        (lambda b: b.update(vcpu=True), "transition.vcpu"),
        (lambda b: b.update(to="asleep"), "transition.to"),
        (lambda b: b.update(ratio=float("nan")), "transition.ratio"),
        (lambda b: b.update(schema=SCHEMA + 1), "newer"),
        (lambda b: b.update(schema="1"), "bad schema"),
        (lambda b: b.update(kind="nope"), "unknown kind"),
    ],
)
def test_a_bad_body_gets_a_specific_error(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    body = json.loads(TRANSITION.encode())
    mutate(body)
    with pytest.raises(PayloadError, match=message):
        decode(json.dumps(body))


@pytest.mark.parametrize("data", [b"", b"[]", b"\xff", b"null", b"{"])
def test_non_objects_are_rejected(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(data)


@given(st.floats(min_value=0, max_value=4e9))
def test_timestamps_are_utc_with_milliseconds_and_parse_back(t: float) -> None:
    text = rfc3339(t)
    assert text.endswith("Z")
    assert len(text.split(".")[1]) == 4  # "mmmZ"
    assert abs(parse_rfc3339(text) - t) < 0.001
