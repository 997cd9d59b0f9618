"""``[mqtt] servers``: broker endpoints of a cluster, validated strictly."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse, split_server


def test_servers_give_the_endpoints_in_order() -> None:
    cfg = parse({"mqtt": {"servers": ["b1.example.org:1883", "[::1]:1884", "10.0.0.3:1885"]}})
    assert cfg.mqtt.endpoints == (("b1.example.org", 1883), ("::1", 1884), ("10.0.0.3", 1885))
    assert cfg.mqtt.servers == ("b1.example.org:1883", "[::1]:1884", "10.0.0.3:1885")


def test_without_servers_host_and_port_are_the_one_endpoint() -> None:
    assert parse({"mqtt": {"host": "b", "port": 2}}).mqtt.endpoints == (("b", 2),)
    assert parse({}).mqtt.endpoints == (("localhost", 1883),)


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ("a:1", "mqtt.servers: expected a list of \"host:port\" strings, got 'a:1'"),
        (["a:1", 7], 'mqtt.servers[1]: expected a "host:port" string, got int 7'),
        (["a"], 'mqtt.servers[0]: expected "host:port"'),
        (["a:0"], "mqtt.servers[0]: expected a port from 1 to 65535"),
        (["a:65536"], "mqtt.servers[0]: expected a port from 1 to 65535"),
        (["a:+1"], "mqtt.servers[0]: expected a port from 1 to 65535"),
        (["a:"], "mqtt.servers[0]: expected a port from 1 to 65535"),
        ([":1"], 'mqtt.servers[0]: expected "host:port"'),
        (["::1:1883"], "mqtt.servers[0]: an IPv6 address needs brackets"),
        (["[b]:1"], "mqtt.servers[0]: brackets are for an IPv6 address only"),
        (["a..b:1"], "mqtt.servers[0]: a host name must not have an empty label"),
        (["bröker:1"], "mqtt.servers[0]: must be ASCII"),
        (["ok:1", "ok:1"], "mqtt.servers[1]: 'ok:1' repeats mqtt.servers[0]"),
        ([f"h{i}:1" for i in range(65)], "mqtt.servers: at most 64 servers, got 65"),
    ],
)
def test_a_bad_servers_value_names_its_toml_path(servers: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"mqtt": {"servers": servers}})
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_an_empty_list_means_host_and_port() -> None:
    assert parse({"mqtt": {"servers": [], "host": "b"}}).mqtt.endpoints == (("b", 1883),)


def test_servers_beside_default_host_and_port_replace_them() -> None:
    # The shipped config.toml lists host and port at their defaults.
    cfg = parse({"mqtt": {"servers": ["a:1"], "host": "localhost", "port": 1883}})
    assert cfg.mqtt.endpoints == (("a", 1),)


@pytest.mark.parametrize("other", [{"host": "b"}, {"port": 2}, {"host": "b", "port": 2}])
def test_servers_beside_another_host_or_port_is_an_error_not_a_silent_choice(
    other: dict[str, object],
) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.servers: replaces mqtt\.host and mqtt\.port"):
        parse({"mqtt": {"servers": ["a:1"], **other}})


def test_split_server_reads_ipv6_in_brackets() -> None:
    assert split_server("[fe80::1]:8883") == ("fe80::1", 8883)
