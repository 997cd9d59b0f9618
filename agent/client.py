"""Subscribe to what vcpu-agents publish: typed events, chains checked, sync or asyncio.

```python
with Subscriber(cfg.mqtt, client_id="vcpu-billing-1") as sub:
    for event in sub:          # Transition, VcpuStatePayload, SeqGap, EpochChanged, ...
        ...
```

docs/subscribers.md is the guide. What it does:

- connects with the agent's ``[mqtt]`` settings (TLS, password file, MQTT 5 or
  3.1.1) under its own client id (an agent's id is refused: two clients with one
  id take each other's session);
- with several ``[mqtt] servers`` (the nodes of one cluster), fails over as the
  agent's publisher does: a lost connection or a failed connect moves on to the
  next node at once while the round lasts, with the capped backoff after a whole
  round; every new connection subscribes again (a refused subscription is
  retried), and the chain tracker and ledger carry over, so the chain seen across
  a failover is the agent's (docs/scale.md, "Subscriber failover");
- subscribes to a ``Selection`` (hosts, domains, vCPUs) and starts from the
  retained tree, so every vCPU's state is known before its first transition;
- reads every message with ``agent.inbox.read`` (bad input becomes a counted,
  logged ``BadMessage``, never an exception) and runs it through
  ``agent.chain.ChainTracker`` (duplicates dropped; gaps, broken chains and epoch
  changes reported as events);
- *durable* mode: a persistent session (MQTT 5 session expiry, or 3.1.1
  ``clean_session=False``), so QoS 1 transitions published while the subscriber
  was away are delivered when it returns, and manual acks: a transition is
  acknowledged to the broker only after ``commit`` wrote it to the ``Ledger`` and
  the ledger committed. Until then the broker keeps it and redelivers it after a
  crash; the ledger turns the redelivery into a dropped duplicate.

Concurrency: paho's network thread (``loop_start``) only enqueues raw messages.
Decoding, chain tracking, the ledger and acks run on the consumer: the thread
that iterates, or the asyncio loop running ``aevents()``. paho's ``ack`` and
``subscribe`` only queue packets under paho's own lock, so calling them from the
consumer is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import logs
from agent.chain import BadMessage, ChainTracker, Event, Synced
from agent.config import MqttSection
from agent.inbox import MAX_BYTES, read
from agent.ledger import Key, Ledger, Status, key_of
from agent.mqtt_client import use_credentials
from agent.payloads import Payload, Transition
from agent.topics import encode_level

log = logs.get("agent.client")

SESSION_EXPIRY = 7 * 86400  # seconds the broker keeps a durable subscriber's queue
FLUSH_EVERY = 256  # committed transitions acknowledged in one ledger transaction
# Bad input is a lasting fault (one line, then a reminder a minute): it has ended
# when valid messages flowed this long without a bad one in between.
BAD_QUIET = 60.0


class ClientError(Exception):
    """The broker could not be reached, or refused us (``[code:135] Not authorized``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Which hosts, domains and vCPUs to subscribe to (empty: all)."""

    hosts: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    vcpus: tuple[int, ...] = ()

    def filters(self, prefix: str) -> list[str]:
        hosts = [encode_level(h) for h in self.hosts] or ["+"]
        if not self.domains and not self.vcpus:
            return [f"{prefix}/{h}/#" for h in hosts]
        domains = [encode_level(d) for d in self.domains] or ["+"]
        out: list[str] = []
        for h in hosts:
            out += [f"{prefix}/{h}/status", f"{prefix}/{h}/gap"]
            for d in domains:
                if not self.vcpus:
                    out.append(f"{prefix}/{h}/{d}/#")
                    continue
                out += [f"{prefix}/{h}/{d}/state", f"{prefix}/{h}/{d}/lifecycle"]
                out += [f"{prefix}/{h}/{d}/vcpu/{n}/+" for n in self.vcpus]
        return out


def default_client_id(role: str, config: Path | None, extra: str = "") -> str:
    """A stable id per (machine, role, config file, extra): restarts resume the session."""
    where = str(config.resolve()) if config is not None else ""
    digest = hashlib.sha256(f"{where}\0{extra}".encode()).hexdigest()[:10]
    return f"vcpu-{role}-{socket.gethostname()}-{digest}"


def check_client_id(mqtt: MqttSection, client_id: str) -> None:
    agent_id = mqtt.client_id or f"vcpu-agent-{socket.gethostname()}"
    if not client_id:
        raise ValueError("a subscriber needs a client id of its own")
    if client_id == agent_id or client_id.startswith("vcpu-agent-"):
        raise ValueError(f"client id {client_id!r} is (or looks like) an agent's")


@dataclass(frozen=True, slots=True)
class _Raw:
    topic: str
    payload: bytes
    mid: int
    qos: int
    conn: int = 0  # the connection it came on: its mid means nothing on another


class Subscriber:
    """One connection, one consumer. Iterate it (blocking) or ``aevents()`` (asyncio)."""

    def __init__(
        self,
        mqtt: MqttSection,
        *,
        client_id: str,
        selection: Selection | None = None,
        qos: int = 1,
        ledger: Ledger | None = None,
        session_expiry: int = SESSION_EXPIRY,
        share_group: str | None = None,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        check_client_id(mqtt, client_id)
        self.cfg = mqtt
        self.client_id = client_id
        self.prefix = mqtt.topic_prefix
        self.selection = selection or Selection()
        self.qos = qos
        self.ledger = ledger
        self.durable = ledger is not None
        self.session_expiry = session_expiry
        self.max_bytes = max_bytes
        filters = self.selection.filters(self.prefix)
        if share_group is not None:
            filters = [f"$share/{share_group}/{f}" for f in filters]
        self.filters = filters
        self.tracker = ChainTracker(ledger.seeds() if ledger is not None else ())
        self.bad: Counter[str] = Counter()
        self.received = 0
        self._bad_log = logs.LastingFault(log, "client.bad_message")
        self._last_bad = 0.0
        self._raw: queue.SimpleQueue[_Raw] = queue.SimpleQueue()
        self._pending: deque[Event] = deque()
        self._unacked: dict[Key, list[tuple[int, int, int]]] = {}  # (mid, qos, conn)
        self._to_ack: list[tuple[int, int, int]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._synced = threading.Event()
        self._marker_mid: int | None = None
        self._refused: str | None = None
        self._closing = False
        self._stop = threading.Event()  # cuts a failover pause short on close
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        # Failover (paho's network thread only, but ``_conn``, read by the consumer).
        self.endpoints = mqtt.endpoints
        self._endpoint_index = 0
        self._attempts = 0
        self._untried = len(self.endpoints) - 1  # endpoints left in this round
        self._delay = mqtt.reconnect_min
        self._conn = 0  # connections so far; acks carry the one their mid belongs to
        self._resubscribe: threading.Timer | None = None
        self._resubscribe_delay = mqtt.reconnect_min
        self._clean_start: paho.CleanStartOption = paho.MQTT_CLEAN_START_FIRST_ONLY
        self._props: Properties | None = None
        self._client = self._new_client()

    # -- connection ---------------------------------------------------------------------

    def _new_client(self) -> paho.Client:
        v5 = self.cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else not self.durable,
            manual_ack=self.durable,
        )
        client.enable_logger(logs.stdlib("paho"))
        if len(self.endpoints) > 1:
            # paho reconnects to one host; _on_pre_connect picks the endpoint and
            # pauses as the publisher does, so paho's own pause is zero.
            client.reconnect_delay_set(min_delay=0, max_delay=0)
            client.on_pre_connect = self._on_pre_connect
        else:
            client.reconnect_delay_set(
                min_delay=max(1, round(self.cfg.reconnect_min)),
                max_delay=max(1, round(self.cfg.reconnect_max)),
            )
        use_credentials(client, self.cfg)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def connect(self, timeout: float = 10.0) -> Self:
        """Connect and subscribe; raise ``ClientError`` if that fails within ``timeout``."""
        v5 = self.cfg.protocol == "5"
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry if self.durable else 0
        host, port = self.endpoints[0]
        self._clean_start = not self.durable if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY
        self._props = props
        try:
            self._client.connect_async(
                host, port, self.cfg.keepalive, clean_start=self._clean_start, properties=props
            )
        except (OSError, ValueError) as err:
            raise ClientError(f"cannot connect to {_where(host, port)}: {err}") from err
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout) or self._refused is not None:
            reason = self._refused or f"no CONNACK from {self._tried()}"
            self.close()
            raise ClientError(reason)
        # Return subscribed: what is published from now on reaches us.
        if not self._subscribed.wait(max(0.0, deadline - time.monotonic())):
            self.close()
            raise ClientError(f"no SUBACK from {self.where}")
        return self

    def close(self) -> None:
        """Commit and acknowledge what was committed, then disconnect."""
        self._closing = True
        self._stop.set()
        timer = self._resubscribe
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(Exception):
            self.flush()
        # Stop paho's thread first: disconnect() then writes the queued acks and the
        # DISCONNECT itself, and no loop trips over the closed socket.
        self._client.loop_stop()
        self._client.disconnect()
        if self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def where(self) -> str:
        """The endpoint of the current (or next) connection, ``host:port``."""
        return _where(*self.endpoints[self._endpoint_index])

    def _tried(self) -> str:
        if len(self.endpoints) == 1:
            return self.where
        return ", ".join(_where(h, p) for h, p in self.endpoints)

    def _on_pre_connect(self, client: paho.Client, _u: object) -> None:
        """Before every connect attempt (paho's thread, no socket open): the first
        goes to the first endpoint; every later one to the next, at once while
        some endpoint is untried in this round, after the backoff pause once a
        whole round failed (as ``Publisher.run``). A connection whose subscription
        was granted starts a new round (``_on_subscribe``)."""
        self._attempts += 1
        if self._attempts == 1:
            return
        n = len(self.endpoints)
        was = self.where
        self._endpoint_index = (self._endpoint_index + 1) % n
        if self._untried > 0:
            self._untried -= 1
            pause = 0.0
        else:
            pause, self._untried = self._delay, n - 1
            self._delay = min(self._delay * 2, self.cfg.reconnect_max)
        log.info("client.failover", left=was, next=self.where, retry_in=pause)
        if pause:
            self._stop.wait(pause)
        # paho's host/port setters refuse while it is connecting (it is, here);
        # connect_async is the public way to aim the attempt under way elsewhere.
        host, port = self.endpoints[self._endpoint_index]
        client.connect_async(
            host, port, self.cfg.keepalive, clean_start=self._clean_start, properties=self._props
        )

    def wait_synced(self, timeout: float) -> bool:
        """Wait until the retained tree present at subscription has arrived.

        The broker sends a subscription's retained messages right after its SUBACK;
        a second, empty subscription's SUBACK follows them (mosquitto writes a
        client's packets in order). Exact for QoS 0 subscriptions; with QoS 1 the
        broker's in-flight window may hold retained messages back behind it.
        """
        return self._synced.wait(timeout)

    def _on_connect(
        self,
        client: paho.Client,
        _u: object,
        flags: paho.ConnectFlags,
        rc: ReasonCode,
        _p: object,
    ) -> None:
        if rc.is_failure:
            self._refused = f"broker refused the connection: [code:{rc.value}] {rc}"
            log.error("client.refused", reason=self._refused)
            self._connected.set()
            return
        self._conn += 1
        self._refused = None
        host, port = self.endpoints[self._endpoint_index]
        log.info(
            "client.connected",
            host=host,
            port=port,
            client_id=self.client_id,
            session_present=flags.session_present,
            durable=self.durable,
        )
        self._subscribe(client)
        # '%s' is no encode_level output: this filter matches none of the agents' topics.
        _, self._marker_mid = client.subscribe(f"{self.prefix}/%sync/{self.client_id}", qos=0)
        self._connected.set()

    def _subscribe(self, client: paho.Client) -> None:
        """Subscribe the filters on this connection (again, on every connection: a
        session the broker lost has none; one it kept just re-grants them)."""
        self._resubscribe = None
        if self.cfg.protocol == "5":
            client.subscribe([(f, SubscribeOptions(qos=self.qos)) for f in self.filters])
        else:
            client.subscribe([(f, self.qos) for f in self.filters])

    def _on_subscribe(
        self, client: paho.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        if mid == self._marker_mid:
            client.unsubscribe(f"{self.prefix}/%sync/{self.client_id}")
            self._synced.set()
            self._enqueue(_Raw("", b"", -1, 0))  # in the stream, after the retained tree
            return
        refused = [str(c) for c in codes if c.is_failure]
        if refused:
            log.error("client.subscribe_refused", filters=self.filters, reasons=refused)
        # Every SUBACK but the marker's answers the filters (the first
        # subscription, or a retry from the timer thread).
        if refused and len(self.endpoints) > 1 and not self._closing:
            # A cluster missing a node may refuse a subscription it cannot yet
            # replicate (nats-server: most new QoS 1 ones, docs/scale.md): ask
            # again, with the capped backoff, on this connection.
            delay = self._resubscribe_delay
            self._resubscribe_delay = min(delay * 2, self.cfg.reconnect_max)
            timer = threading.Timer(delay, self._subscribe, (client,))
            timer.daemon = True
            self._resubscribe = timer
            timer.start()
        elif not refused:
            # A granted subscription makes a good connection: a new round.
            self._resubscribe_delay = self._delay = self.cfg.reconnect_min
            self._untried = len(self.endpoints) - 1
        self._subscribed.set()

    def _on_disconnect(
        self, _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
    ) -> None:
        self._synced.clear()
        timer = self._resubscribe
        if timer is not None:
            timer.cancel()
            self._resubscribe = None
        if self._closing:
            log.debug("client.closed", reason=str(rc))
        else:
            log.warning("client.disconnected", reason=str(rc), where=self.where)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._enqueue(_Raw(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._conn))

    def _enqueue(self, raw: _Raw) -> None:
        self._raw.put(raw)
        wake = self._wake
        if wake is not None:
            wake[0].call_soon_threadsafe(wake[1].set)

    # -- consuming ----------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; ``None`` when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = self._pending
        while not pending:
            try:
                raw = self._raw.get_nowait()
            except queue.Empty:
                self.flush()  # about to wait: make what was committed durable and acked
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                try:
                    raw = self._raw.get(timeout=left)
                except queue.Empty:
                    return None
            self._process(raw)
        return pending.popleft()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.get()
            if event is not None:
                yield event

    async def aevents(self) -> AsyncIterator[Event]:
        """The events, on the running asyncio loop (never blocking it)."""
        wake = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), wake)
        try:
            while True:
                event = self.get(0)
                if event is not None:
                    yield event
                    continue
                wake.clear()
                if self._raw.empty():
                    await wake.wait()
        finally:
            self._wake = None

    def _process(self, raw: _Raw) -> None:
        if raw.mid == -1:
            self._pending.append(Synced())
            return
        self.received += 1
        item = read(self.prefix, raw.topic, raw.payload, max_bytes=self.max_bytes)
        if isinstance(item, Payload):
            if self._bad_log.active and time.monotonic() - self._last_bad > BAD_QUIET:
                self._bad_log.clear()  # client.bad_message.ended
            events = self.tracker.feed(item)
            if self.ledger is not None and isinstance(item, Transition):
                events = self._durable_transition(item, events, raw)
            elif self.durable and raw.qos > 0:
                self._ack(raw.mid, raw.qos, raw.conn)
            self._pending.extend(events)
            return
        if isinstance(item, BadMessage):
            self.bad[item.reason] += 1
            self._last_bad = time.monotonic()
            self._bad_log.hit(topic=item.topic[:200], reason=item.reason, detail=item.detail)
        if self.durable and raw.qos > 0:
            self._ack(raw.mid, raw.qos, raw.conn)
        self._pending.append(item)

    # -- durable: ledger, then ack ---------------------------------------------------------

    def _durable_transition(self, t: Transition, events: list[Event], raw: _Raw) -> list[Event]:
        assert self.ledger is not None
        delivered = any(e is t for e in events)
        if (
            delivered
            and self.tracker.epoch_of(t.host) != t.epoch
            and self.ledger.status(t) in ("done", "failed")
        ):
            # A late copy from a superseded epoch moves no chain, so the tracker cannot
            # call it a duplicate; the ledger can.
            self.tracker.duplicates += 1
            events = [e for e in events if e is not t]
            delivered = False
        if raw.qos > 0:
            key = key_of(t)
            if delivered or key in self._unacked:  # a redelivery waits with it
                self._unacked.setdefault(key, []).append((raw.mid, raw.qos, raw.conn))
            else:
                # A duplicate: acknowledged once the ledger row that made it one
                # is committed (it may still wait for the next flush).
                self._to_ack.append((raw.mid, raw.qos, raw.conn))
        return events

    def commit(self, t: Transition, status: Status = "done", outcome: str = "") -> None:
        """Record ``t`` as handled; it is acknowledged once the ledger committed."""
        if self.ledger is None:
            return
        self.ledger.record(t, status, outcome)
        self.release(t)

    def release(self, t: Transition) -> None:
        """Acknowledge ``t`` (and its redeliveries) at the next ``flush``: only once the
        caller's ledger row for it is committed or will be by that flush."""
        acks = self._unacked.pop(key_of(t), None)
        if acks:
            self._to_ack.extend(acks)
        if len(self._to_ack) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.ledger is not None:
            self.ledger.flush()
        acks, self._to_ack = self._to_ack, []
        for mid, qos, conn in acks:
            self._ack(mid, qos, conn)

    def _ack(self, mid: int, qos: int, conn: int) -> None:
        """Acknowledge ``mid`` if it came on the current connection. One from an
        earlier connection is dropped: the packet id may name another message on
        this one, and the broker redelivers the unacknowledged message on the new
        connection (MQTT 3.1.1 4.4), where the ledger makes it a duplicate."""
        if conn == self._conn:
            self._client.ack(mid, qos)

    @property
    def counters(self) -> dict[str, int]:
        t = self.tracker
        return {
            "received": self.received,
            "duplicates": t.duplicates,
            "gaps": t.gaps,
            "missing": t.missing,
            "late": t.late,
            "broken": t.broken,
            "epoch_changes": t.epoch_changes,
            "stale": t.stale,
            "bad": sum(self.bad.values()),
        }


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
