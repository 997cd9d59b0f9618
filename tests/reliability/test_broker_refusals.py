"""Refusals and security against a real mosquitto: bad credentials, ACL denials, TLS.

Each refusal must give a clear log event with the reason and a retry with backoff:
never a crash, never a tight loop (connect attempts are counted), and the password
never appears in any output. Certificates are made at test time with the openssl CLI.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from structlog.testing import capture_logs

from agent.delivery import MemoryOutbox
from agent.payloads import Status, decode
from agent.publisher import Publisher
from lab.mosquitto import Mosquitto, free_port
from lab.rig import AgentProcess, Feed
from tests.reliability.fault_harness import AGENT, agent_config
from tests.reliability.publisher_rig import event, make_publisher, running, until

WATCH = 3.0  # seconds each refusal is watched
# reconnect_min 0.05 doubling to reconnect_max 0.3: at most ~12 attempts in WATCH s.
# A client retrying without backoff would make hundreds.
MAX_ATTEMPTS = 15


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path  # a CA that signed nothing the broker presents


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> Path:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    return d / f"{name}.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _make_ca(d, "test-ca")
    other = _make_ca(d, "other-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.ext",
        cwd=d,
    )  # fmt: skip
    return Pki(ca=ca, server_cert=d / "server.crt", server_key=d / "server.key", other_ca=other)


def _password_broker(
    make_broker: Callable[..., Mosquitto], tmp: Path, password: str, acl: str | None = None
) -> Mosquitto:
    pwfile = tmp / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "agent", password], check=True)
    conf = f"allow_anonymous false\npassword_file {pwfile}\n"
    if acl is not None:
        (tmp / "mosquitto.acl").write_text(acl)
        conf += f"acl_file {tmp / 'mosquitto.acl'}\n"
    return make_broker(conf)


def _secret(tmp: Path, text: str) -> Path:
    path = tmp / "mqtt-password"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


class _PasswordSetup(NamedTuple):
    broker: Mosquitto
    real: str  # the password the broker accepts
    secret: Path  # the publisher's password file
    pub: Publisher
    outbox: MemoryOutbox


def _password_publisher(
    make_broker: Callable[..., Mosquitto], tmp: Path, prefix: str, *, right: bool
) -> _PasswordSetup:
    """A password-protected broker and a publisher whose password file holds the
    right password or a wrong one."""
    real = f"right-{uuid.uuid4().hex}"
    broker = _password_broker(make_broker, tmp, real)
    secret = _secret(tmp, real if right else "wrong")
    pub, outbox = make_publisher(
        broker.port, prefix, username="agent", password_file=str(secret), reconnect_min=0.1
    )
    return _PasswordSetup(broker, real, secret, pub, outbox)


def _watch(agent: AgentProcess) -> None:
    time.sleep(WATCH)
    assert agent.running(), agent.raw()[-2000:]  # still running: no crash
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=5) == 0


def test_bad_credentials_are_logged_with_the_reason_and_retried_with_backoff(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    spawn: Callable[..., AgentProcess],
) -> None:
    real = f"right-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    broker = _password_broker(make_broker, tmp, real)
    cfg = agent_config(
        tmp / "agent.toml",
        port=broker.port,
        prefix=prefix,
        mqtt={"username": "agent", "password_file": str(_secret(tmp, wrong))},
    )
    agent = spawn([*AGENT, "run", "--config", str(cfg)])
    _watch(agent)
    # A lasting fault: one line when it starts (then one a minute), not one per attempt.
    failures = agent.events("mqtt.connect_failed")
    assert len(failures) == 1, failures
    # mosquitto 2.0 answers a bad password with CONNACK 135 (MQTT 5 "Not authorized").
    assert "[code:135] Not authorized" in str(failures[0]["reason"]), failures[0]
    assert failures[0]["retry_in"] == 0.05
    attempts = broker.log_tail(10_000).count("not authorised")
    assert 2 <= attempts <= MAX_ATTEMPTS  # retried, with backoff
    assert wrong not in agent.raw()
    assert not agent.events("mqtt.connected")


def test_publishes_the_broker_does_not_authorise_stay_queued_and_are_retried_with_backoff(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    broker = _password_broker(make_broker, tmp, password, acl="user agent\ntopic read #\n")
    pub, outbox = make_publisher(
        broker.port, prefix, username="agent", password_file=str(_secret(tmp, password))
    )

    async def scenario() -> list[MutableMapping[str, Any]]:
        for seq in range(1, 4):
            pub.publish(event(prefix, 0, seq), None)
        with capture_logs() as logs:
            async with running(pub):
                await asyncio.sleep(WATCH)
                assert len(outbox) == 3  # nothing delivered, nothing lost
        return logs

    logs = asyncio.run(scenario())
    refusals = [e for e in logs if e["event"] == "mqtt.publish_refused"]
    assert len(refusals) == 1, refusals  # a lasting fault, not a line per attempt
    assert "[code:135] Not authorized" in str(refusals[0]["reason"])
    # Resent on backoff (0.05 doubling to 0.3 s: ~12 rounds in 3 s), not in a spin;
    # on the same connection.
    attempts = broker.log_tail(100_000).count("Denied PUBLISH")
    assert 3 <= attempts <= 4 * (MAX_ATTEMPTS + 1)
    assert broker.log_tail(100_000).count(f" as {pub.client_id} ") == 1


@pytest.mark.mqtt
def test_after_the_acl_is_fixed_events_flow_within_seconds_and_the_status_never_says_offline(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
) -> None:
    # Before: a refused publish replaced the connection; the old paho client, closed
    # behind paho's back, unwatched the *new* connection's fd when it was collected:
    # "mqtt.connected", then silence until the keepalive dropped it (57 s), and the
    # broker fired the will "offline" while the agent was alive.
    password = f"pw-{uuid.uuid4().hex}"
    broker = _password_broker(
        make_broker, tmp, password, acl=f"user agent\ntopic read #\ntopic write {prefix}/+/status\n"
    )
    sub = make_subscriber(broker.port, f"{prefix}/#", auth=("agent", password))
    pub, outbox = make_publisher(
        broker.port,
        prefix,
        username="agent",
        password_file=str(_secret(tmp, password)),
        reconnect_max=2.0,
    )

    async def scenario() -> float:
        async with running(pub):
            for seq in range(1, 4):
                pub.publish(event(prefix, 0, seq), None)
            await asyncio.sleep(2.0)  # refused a few times, backoff growing
            gc.collect()  # whatever a collection could do, it does now
            assert len(outbox) == 3
            (tmp / "mosquitto.acl").write_text("user agent\ntopic readwrite #\n")
            assert broker.proc is not None
            os.kill(broker.proc.pid, signal.SIGHUP)  # mosquitto reloads its acl_file
            fixed = time.monotonic()
            await until(lambda: len(outbox) == 0, timeout=30)
            return time.monotonic() - fixed

    took = asyncio.run(scenario())
    assert took < 5.0  # the next backoff round (at most reconnect_max), not a keepalive
    sub.wait(lambda: len([m for m in sub.snapshot() if m.topic.endswith("/transition")]) >= 3)
    got = sub.snapshot()
    assert [json.loads(m.payload)["seq"] for m in got if m.topic.endswith("/transition")] == [
        1,
        2,
        3,
    ]
    statuses = [decode(m.payload) for m in got if m.topic.endswith("/status")]
    assert all(isinstance(st, Status) for st in statuses)
    assert [st.status for st in statuses if isinstance(st, Status)][:-1] == ["online"] * (
        len(statuses) - 1
    )  # offline only once, on the clean stop


@pytest.mark.mqtt
def test_a_refused_connection_then_a_fixed_password_connects_and_delivers_within_seconds(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
) -> None:
    _, real, secret, pub, outbox = _password_publisher(make_broker, tmp, prefix, right=False)

    async def scenario() -> list[MutableMapping[str, Any]]:
        pub.publish(event(prefix, 0, 1), None)
        with capture_logs() as logs:
            async with running(pub, connect=False):
                await asyncio.sleep(4.0)  # ~15 refused connections at reconnect_max 0.3
                gc.collect()
                secret.write_text(real + "\n")
                await until(lambda: len(outbox) == 0, timeout=5)
        return logs

    logs = asyncio.run(scenario())
    names = [str(e["event"]) for e in logs if str(e["event"]).startswith("mqtt.")]
    # The fault as three kinds of line, not one per attempt:
    assert names.count("mqtt.connect_failed") == 1
    assert names.count("mqtt.connect_failed.ended") == 1
    ended = next(e for e in logs if e["event"] == "mqtt.connect_failed.ended")
    assert int(str(ended["count"])) >= 10
    assert len(names) <= 6, names


def test_a_broker_certificate_from_an_unknown_ca_is_refused_and_retried_with_backoff(
    tmp: Path,
    prefix: str,
    pki: Pki,
    make_broker: Callable[..., Mosquitto],
    spawn: Callable[..., AgentProcess],
) -> None:
    tls_port = free_port()
    make_broker(
        f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\n"
        f"certfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
    )
    cfg = agent_config(
        tmp / "agent.toml",
        port=tls_port,
        prefix=prefix,
        mqtt={"tls": True, "ca_file": str(pki.other_ca)},
    )
    agent = spawn([*AGENT, "run", "--config", str(cfg)])
    _watch(agent)
    failures = agent.events("mqtt.connect_failed")
    assert len(failures) == 1  # a lasting fault: its first line (the next comes in a minute)
    assert "CERTIFICATE_VERIFY_FAILED" in str(failures[0]["reason"])
    assert not agent.events("mqtt.connected")


def test_tls_with_a_ca_made_at_test_time_and_a_password_connects_and_never_logs_the_password(
    tmp: Path,
    prefix: str,
    pki: Pki,
    make_broker: Callable[..., Mosquitto],
    make_subscriber: Callable[..., Feed],
    spawn: Callable[..., AgentProcess],
) -> None:
    password = f"tls-pw-{uuid.uuid4().hex}"
    pwfile = tmp / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "agent", password], check=True)
    tls_port = free_port()
    # The agent uses the TLS listener; the test's subscriber the plain one (lab
    # default); the password file applies to both.
    broker = make_broker(
        f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\n"
        f"certfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        f"allow_anonymous false\npassword_file {pwfile}\n"
    )
    sub = make_subscriber(broker.port, f"{prefix}/#", auth=("agent", password))
    cfg = agent_config(
        tmp / "agent.toml",
        port=tls_port,
        prefix=prefix,
        mqtt={
            "tls": True,
            "ca_file": str(pki.ca),
            "username": "agent",
            "password_file": str(_secret(tmp, password)),
        },
    )
    agent = spawn([*AGENT, "run", "--config", str(cfg)])
    sub.wait(lambda: any(m.topic.endswith("/status") for m in sub.snapshot()))
    first = decode(next(m for m in sub.snapshot() if m.topic.endswith("/status")).payload)
    assert isinstance(first, Status)
    assert first.status == "online"
    agent.signal(signal.SIGTERM)
    assert agent.wait(timeout=5) == 0
    everything = agent.raw() + broker.log_tail(10_000)
    assert password not in everything
    assert "mqtt.connected" in agent.raw()


def test_a_password_file_that_goes_missing_while_running_is_a_failed_connect_not_a_crash(
    tmp: Path,
    prefix: str,
    make_broker: Callable[..., Mosquitto],
) -> None:
    broker, real, secret, pub, outbox = _password_publisher(make_broker, tmp, prefix, right=True)

    async def scenario() -> list[MutableMapping[str, Any]]:
        with capture_logs() as logs:
            async with running(pub):
                secret.unlink()  # the credential is rotated away under the agent
                broker.stop()
                broker.start()  # so it must connect again, and read the file again
                await until(
                    lambda: any(e["event"] == "mqtt.connect_failed" for e in logs), timeout=10
                )
                secret.write_text(real + "\n")  # the new credential lands
                pub.publish(event(prefix, 0, 1), None)
                await until(lambda: len(outbox) == 0, timeout=10)
        return logs

    logs = asyncio.run(scenario())
    failed = [e for e in logs if e["event"] == "mqtt.connect_failed"]
    assert "mqtt-password" in str(failed[0]["reason"])
    assert real not in str(logs)
