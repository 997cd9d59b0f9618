from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import EX_CONFIG, Config, ConfigError, load, parse

SHIPPED = Path(__file__).parent.parent / "config.toml"


def test_the_shipped_config_is_exactly_the_defaults() -> None:
    assert load(SHIPPED) == Config()


def test_the_shipped_config_documents_every_key() -> None:
    document = tomllib.loads(SHIPPED.read_text())
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(document[section.name]) == keys, section.name


def test_every_problem_is_reported_at_once_with_its_toml_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse(
            {
                "mqtt": {"port": "x", "prot": 1},
                "sampling": {"interval": -1, "halted_leave": 0.9},
                "bogus": {},
                "log": [],
            }
        )
    assert err.value.problems == [
        "sampling.interval: expected a number in [0.05, 3600.0], got int -1",
        "mqtt.port: expected an integer from 1 to 65535, got 'x'",
        "mqtt.prot: unknown key",
        "log: expected a table, got list []",
        "bogus: unknown section",
        "sampling.halted_leave: must be below sampling.halted_enter (0.9 >= 0.7)",
    ]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"libvirt": {"read_only": "yes"}}, "libvirt.read_only: expected true or false"),
        ({"mqtt": {"qos": 3}}, "mqtt.qos: expected an integer from 0 to 2"),
        ({"mqtt": {"port": True}}, "mqtt.port: expected an integer"),
        ({"mqtt": {"protocol": "4"}}, "mqtt.protocol: expected one of '5', '3.1.1'"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix: must not contain '#'"),
        ({"agent": {"host_id": "a/b"}}, "agent.host_id: must not contain '/'"),
        ({"mqtt": {"ca_file": "/nonexistent"}}, "mqtt.ca_file: cannot read file"),
        ({"mqtt": {"ca_file": ""}, "log": {"level": "loud"}}, "log.level: expected one of"),
        ({"mqtt": {"cert_file": __file__, "tls": True}}, "mqtt.cert_file: needs mqtt.key_file"),
        ({"mqtt": {"password_file": __file__}}, "mqtt.password_file: needs mqtt.username"),
    ],
)
def test_bad_values_name_their_key(document: dict, problem: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as err:
        parse(document)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_integers_are_accepted_where_seconds_are_floats() -> None:
    cfg = parse({"sampling": {"interval": 2}})
    assert cfg.sampling.interval == 2.0
    assert isinstance(cfg.sampling.interval, float)


def test_check_config_exits_0_on_a_good_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(SHIPPED)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_config_exits_78_listing_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "x"\nqos = 9\n')
    assert main(["check-config", "--config", str(bad)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "mqtt.port: expected an integer" in err
    assert "mqtt.qos: expected an integer" in err


@pytest.mark.parametrize("text", ["[mqtt\n", "a = = 1", "\xff"])
def test_broken_toml_exits_78_with_the_parser_message(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(text.encode("latin-1"))
    assert main(["check-config", "--config", str(bad)]) == EX_CONFIG
    assert "invalid config" in capsys.readouterr().err


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == EX_CONFIG
