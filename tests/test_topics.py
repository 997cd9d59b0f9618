from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.topics import (
    MAX_TOPIC_BYTES,
    TopicError,
    Topics,
    decode_level,
    encode_level,
    parse_topic,
)

HOSTILE = [
    "a/b",
    "+",
    "#",
    "a b",
    "$SYS",
    "100%",
    "%2F",
    "ünïcødé-ドメイン",
    "tab\there",
    "nl\nx",
    "\x01\x7f",
    "emoji 🖥️",
    "x" * 5000,
    "",
    ".",
    "..",
]


def _valid_level(level: str) -> bool:
    """What every supported broker takes as one level: no MQTT wildcard or separator,
    and no '.' or space, which nats-server 2.9's MQTT closes the connection on."""
    return bool(level) and re.fullmatch(r"[A-Za-z0-9_%-]+", level) is not None


@given(st.text())
def test_encoding_is_reversible_for_every_string(name: str) -> None:
    level = encode_level(name)
    assert _valid_level(level)
    assert decode_level(level) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_make_valid_topics_that_parse_back(name: str) -> None:
    topics = Topics(prefix="vcpu", host="host/1")
    topic = topics.vcpu_transition(name, 3)
    assert all(_valid_level(level) for level in topic.split("/"))
    parsed = parse_topic("vcpu", topic)
    assert (parsed.host, parsed.domain, parsed.vcpu, parsed.kind) == (
        "host/1",
        name,
        3,
        "vcpu_transition",
    )


def test_safe_names_read_unchanged() -> None:
    assert encode_level("web-01_prod") == "web-01_prod"


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("web.example.com", "web%2Eexample%2Ecom"),
        ("node1.example.com.", "node1%2Eexample%2Ecom%2E"),
        ("web-01.prod_eu", "web-01%2Eprod_eu"),
        ("my vm", "my%20vm"),
    ],
)
def test_dots_and_spaces_are_escaped_so_nats_server_takes_the_topic(name: str, level: str) -> None:
    assert encode_level(name) == level
    assert decode_level(level) == name


@pytest.mark.parametrize("level", ["web.example.com", "a.b", "a b"])
def test_decode_refuses_a_raw_dot_or_space_that_encode_never_writes(level: str) -> None:
    # An agent before the topic contract change wrote '.' raw; such a level is
    # refused (a clear TopicError), never read as a second name for the same domain.
    with pytest.raises(TopicError, match="not an encoded topic level"):
        decode_level(level)


def test_an_fqdn_host_and_a_dotted_domain_make_a_topic_with_no_dot() -> None:
    topic = Topics(prefix="vcpu", host="node1.example.com").vcpu_transition("web.example.com", 0)
    assert topic == "vcpu/node1%2Eexample%2Ecom/web%2Eexample%2Ecom/vcpu/0/transition"
    parsed = parse_topic("vcpu", topic)
    assert (parsed.host, parsed.domain) == ("node1.example.com", "web.example.com")


def test_distinct_names_never_share_a_level() -> None:
    # '%' itself is escaped, so a name that looks like an escape stays distinct.
    assert encode_level("a/b") != encode_level("a%2Fb")
    assert encode_level("") != encode_level("%")


@pytest.mark.parametrize("level", ["%2f", "%41", "a%", "%G0", "a b", ""])
def test_decode_rejects_what_encode_cannot_produce(level: str) -> None:
    with pytest.raises(TopicError):
        decode_level(level)


def test_a_topic_over_the_mqtt_limit_is_refused_not_truncated() -> None:
    with pytest.raises(TopicError, match="longer than"):
        Topics(prefix="vcpu", host="h").vcpu_state("\u3042" * (MAX_TOPIC_BYTES // 3), 0)


@pytest.mark.parametrize("prefix", ["", "a/+", "#", "/lead", "trail/", "$SYS"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix=prefix, host="h")


def test_the_topic_tree_has_the_documented_shape() -> None:
    t = Topics(prefix="vcpu", host="node1")
    assert t.status == "vcpu/node1/status"
    assert t.domain_state("vm") == "vcpu/node1/vm/state"
    assert t.lifecycle("vm") == "vcpu/node1/vm/lifecycle"
    assert t.vcpu_state("vm", 2) == "vcpu/node1/vm/vcpu/2/state"
    assert t.vcpu_transition("vm", 2) == "vcpu/node1/vm/vcpu/2/transition"


@pytest.mark.parametrize(
    "topic", ["other/h/status", "vcpu/h", "vcpu/h/vm/vcpu/x/state", "vcpu/h/vm/nope"]
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic("vcpu", topic)
