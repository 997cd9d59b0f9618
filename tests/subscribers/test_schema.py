"""docs/schema/*.json: generated from agent/payloads.py, and saying what decode says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from agent.payloads import PAYLOADS, Payload, PayloadError, decode
from agent.schema import render, schema_of
from tests.subscribers.messages import FakeAgent, new_uuid

SCHEMA_DIR = Path(__file__).parent.parent.parent / "docs" / "schema"


def samples() -> list[Payload]:
    agent = FakeAgent()
    u = new_uuid()
    return [
        agent.status()[1],
        agent.domain_state("web", u, 2)[1],
        agent.vcpu_state("web", u, 0)[1],
        agent.transition("web", u, 0)[1],
        agent.lifecycle("web", u)[1],
        agent.gap(3)[1],
    ]


def validator(kind: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{kind}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_the_schema_file_is_what_payloads_py_generates(kind: str) -> None:
    path = SCHEMA_DIR / f"{kind}.json"
    assert path.read_text() == render(PAYLOADS[kind]), (
        f"{path} is stale: python -m agent.schema docs/schema"
    )


def test_there_is_a_schema_for_every_kind_and_every_sample_kind_is_covered() -> None:
    assert sorted(p.stem for p in SCHEMA_DIR.glob("*.json")) == sorted(PAYLOADS)
    assert sorted(s.KIND for s in samples()) == sorted(PAYLOADS)


def test_every_message_the_agent_would_send_validates() -> None:
    for sample in samples():
        body = json.loads(sample.encode())
        assert not list(validator(sample.KIND).iter_errors(body)), sample


def verdicts(body: dict[str, object], kind: str) -> tuple[bool, bool]:
    by_schema = validator(kind).is_valid(body)
    try:
        decode(json.dumps(body))
    except PayloadError:
        by_decode = False
    else:
        by_decode = True
    return by_schema, by_decode


@pytest.mark.parametrize("sample", samples(), ids=lambda s: s.KIND)
def test_schema_and_decode_agree_on_every_missing_or_mistyped_field(sample: Payload) -> None:
    body = json.loads(sample.encode())
    assert verdicts({**body, "added_later": 1}, sample.KIND) == (True, True)
    for key in schema_of(type(sample))["required"]:  # type: ignore[attr-defined]
        if key in ("schema", "kind"):
            continue
        missing = {k: v for k, v in body.items() if k != key}
        assert verdicts(missing, sample.KIND) == (False, False), f"without {key}"
        wrongs: list[object] = [[], "x" if not isinstance(body[key], str) else 1, True, None, 1.5]
        for wrong in wrongs:
            if wrong == body[key] or (wrong is None and body[key] is None):
                continue
            by_schema, by_decode = verdicts({**body, key: wrong}, sample.KIND)
            assert by_schema == by_decode, (
                f"{key}={wrong!r}: schema {by_schema}, decode {by_decode}"
            )
