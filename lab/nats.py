"""A real 3-node nats-server cluster on 127.0.0.1 with JetStream and MQTT, by PID.

Debian 12's ``nats-server`` (2.9.10) is a clustered broker whose MQTT listener
keeps sessions, QoS 1 messages and retained messages in JetStream streams
replicated over RAFT (``mqtt { stream_replicas: 3 }``). Each node is one
foreground child process (its PID is the Popen's) with its own config file,
store directory and four free loopback ports: client, MQTT, cluster route and
HTTP monitoring. ``start()`` returns once a JetStream meta leader is known to
every node (``/jsz`` on the monitoring port) and a retained MQTT message
published through the first node was read back through every node, so tests
start on a cluster that answers; ``kill(i)`` is a SIGKILL (no last will, no
goodbye), ``restart(i)`` brings a node back with its store. docs/scale.md has
the facts this relies on and how they were measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from lab.mosquitto import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER_NAME = "vcpu-lab"
ACK_WAIT_S = 5.0  # nats-server's mqtt.ack_wait: redelivery of an unacknowledged QoS 1 message


class NatsNode:
    """One nats-server process of the cluster."""

    def __init__(self, *, index: int, workdir: Path) -> None:
        self.index = index
        self.name = f"n{index + 1}"
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.mqtt_port = free_port()
        self.cluster_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nats.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def write_conf(self, routes: list[int]) -> None:
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        self.conf_path.write_text(
            f'server_name: "{self.name}"\n'
            f'listen: "127.0.0.1:{self.client_port}"\n'
            f'http: "127.0.0.1:{self.http_port}"\n'
            f'jetstream {{ store_dir: "{self.workdir / "js"}" }}\n'
            # The MQTT streams (sessions, QoS 1 messages, retained messages) are
            # replicated to all three nodes, so any one of them can die. A QoS 1
            # message sent but not PUBACKed (its subscriber's node died, or the
            # session moved) is sent again only after ack_wait (30 s by default),
            # behind newer ones: ACK_WAIT_S bounds that (docs/scale.md).
            f'mqtt {{ listen: "127.0.0.1:{self.mqtt_port}", stream_replicas: 3, '
            f'ack_wait: "{ACK_WAIT_S:g}s" }}\n'
            f"cluster {{\n"
            f'  name: "{CLUSTER_NAME}"\n'
            f'  listen: "127.0.0.1:{self.cluster_port}"\n'
            f"  routes: [{route_urls}]\n"
            f"}}\n"
        )

    def start(self) -> None:
        if self.pid is not None:
            return
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def jsz(self) -> dict[str, object]:
        """The node's JetStream monitoring document (``/jsz``); {} when it cannot say."""
        url = f"http://127.0.0.1:{self.http_port}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                doc: dict[str, object] = json.loads(answer.read())
                return doc
        except (OSError, ValueError):
            return {}

    def stream_leader(self, stream: str) -> str:
        """The server name leading a JetStream stream, as this node sees it; ""."""
        url = f"http://127.0.0.1:{self.http_port}/jsz?streams=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                doc = json.loads(answer.read())
        except (OSError, ValueError):
            return ""
        for account in doc.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    leader = (detail.get("cluster") or {}).get("leader", "")
                    return leader if isinstance(leader, str) else ""
        return ""

    def meta_leader(self) -> str:
        meta = self.jsz().get("meta_cluster")
        leader = meta.get("leader", "") if isinstance(meta, dict) else ""
        return leader if isinstance(leader, str) else ""

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NatsCluster:
    """Three nats-server nodes routed to each other; MQTT on ``mqtt_ports``."""

    def __init__(self, *, size: int = 3, workdir: Path | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="vcpu-nats-"))
        self.nodes = [NatsNode(index=i, workdir=self.workdir) for i in range(size)]
        routes = [n.cluster_port for n in self.nodes]
        for node in self.nodes:
            node.write_conf([p for p in routes if p != node.cluster_port])

    @property
    def mqtt_ports(self) -> list[int]:
        return [n.mqtt_port for n in self.nodes]

    @property
    def servers(self) -> list[str]:
        """The ``[mqtt] servers`` value for an agent using every node."""
        return [f"127.0.0.1:{p}" for p in self.mqtt_ports]

    def pids(self) -> list[int | None]:
        return [n.pid for n in self.nodes]

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0, *, nodes: list[int] | None = None) -> float:
        """Wait until every running node names the same meta leader and a retained
        message goes round through the MQTT listeners; return the seconds it took."""
        began = time.monotonic()
        deadline = began + timeout
        alive = [n for n in self.nodes if (nodes is None or n.index in nodes)]
        while True:
            for node in alive:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(
                        f"nats-server {node.name} exited with {node.proc.returncode}: "
                        f"{node.log_tail()}"
                    )
            leaders = {n.meta_leader() for n in alive}
            if len(leaders) == 1 and "" not in leaders:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no JetStream meta leader in {timeout} s: {leaders}")
            time.sleep(0.1)
        while not self._retained_round_trip([n.mqtt_port for n in alive]):
            if time.monotonic() > deadline:
                logs = "\n".join(n.log_tail(5) for n in alive)
                raise RuntimeError(f"MQTT retained round trip failed for {timeout} s:\n{logs}")
            time.sleep(0.2)
        return time.monotonic() - began

    def leader_of(self, stream: str) -> int:
        """The index of the node leading ``stream`` (e.g. ``$MQTT_rmsgs``, where
        retained messages live); raises when no running node knows one."""
        for node in self.nodes:
            if node.pid is not None:
                name = node.stream_leader(stream)
                for other in self.nodes:
                    if other.name == name:
                        return other.index
        raise RuntimeError(f"no leader known for stream {stream}")

    def kill(self, index: int) -> None:
        """SIGKILL one node: no last will of its clients fires, no goodbye."""
        self.nodes[index].stop(signal.SIGKILL)

    def restart(self, index: int, timeout: float = 30.0) -> float:
        """Start a stopped node again (same ports, same store); seconds until ready."""
        self.nodes[index].start()
        return self.wait_ready(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @staticmethod
    def _retained_round_trip(ports: list[int], timeout: float = 5.0) -> bool:
        """Publish a retained QoS 1 message through the first port and read it back
        through each port (then clear it). False on any failure."""
        topic = f"lab-ready/{uuid.uuid4().hex[:12]}"
        payload = uuid.uuid4().hex.encode()
        try:
            if not _publish(ports[0], topic, payload, timeout):
                return False
            ok = all(_read_retained(p, topic, timeout) == payload for p in ports)
            _publish(ports[0], topic, b"", timeout)
        except (OSError, paho.WebsocketConnectionError):
            return False
        return ok


def mqtt_client(client_id: str | None = None) -> paho.Client:
    """A paho client speaking what nats-server's MQTT speaks: 3.1.1, clean session."""
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"lab-{uuid.uuid4().hex[:10]}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )


def _publish(port: int, topic: str, payload: bytes, timeout: float) -> bool:
    client = mqtt_client()
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)
        return info.is_published()
    except (RuntimeError, ValueError):
        return False
    finally:
        client.disconnect()
        client.loop_stop()


def _read_retained(port: int, topic: str, timeout: float) -> bytes | None:
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt_client()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        got.append(bytes(msg.payload))
        done.set()

    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        done.wait(timeout)
        return got[0] if got else None
    finally:
        client.disconnect()
        client.loop_stop()
