"""The fast decoder: the same verdicts as the reference checker (its cost against
``json.loads``: bench/client.py)."""

from __future__ import annotations

import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.payloads import PAYLOADS, Payload, PayloadError, Transition, _check, _validators, decode

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["running", "halted", "n/a", "online", "nostate", "kvm", "", "x"])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=4,
)
FIELDS = [
    (cls, key, name, check) for cls in PAYLOADS.values() for key, name, check in _validators(cls)
]


def verdict(fn: typing.Callable[[], object]) -> tuple[str, object]:
    try:
        value = fn()
    except PayloadError as err:
        return ("error", str(err))
    return ("ok", (type(value), value))


@settings(max_examples=400)
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_the_precomputed_checkers_agree_with_the_reference_on_any_json_value(
    field: tuple[type[Payload], str, str, typing.Callable[[object], object]], value: object
) -> None:
    cls, key, name, check = field
    hint = typing.get_type_hints(cls)[name]
    fast = verdict(lambda: check(value))
    slow = verdict(lambda: _check(cls.KIND, key, value, hint))
    if fast[0] == "ok" and isinstance(value, float) and value != value:  # NaN never equals
        raise AssertionError("NaN accepted")
    assert fast == slow


def test_a_missing_field_is_named_in_the_error() -> None:
    body = json.loads(Transition.encode(_transition()))
    del body["epoch"]
    with pytest.raises(PayloadError, match="transition: missing field 'epoch'"):
        decode(json.dumps(body))


def _transition() -> Transition:
    return Transition(
        host="h",
        domain="d",
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
