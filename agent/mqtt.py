"""The MQTT edge: paho-mqtt 2.x driven by the asyncio loop, no paho thread.

paho's socket callbacks (``on_socket_open`` / ``register_write`` ...) hook its
socket into the running loop, as aiomqtt does; only the blocking TCP/TLS connect
runs in a thread. Each (re)connection uses a fresh ``Client``: paho's in-memory
queue is never the source of truth. Two kinds of traffic:

- *events* (transitions, lifecycle) go through the ``Outbox`` and leave it only
  on PUBACK; on reconnect everything unacknowledged is sent again, in order;
- *state* (retained vCPU/domain state, and clears) is latest-value: a mirror of
  every retained topic is republished after each reconnect, so the broker's
  retained view is repaired after an outage or a broker restart that lost it.

Status: retained ``online`` first thing after CONNACK, retained ``offline`` as
the last will, and an explicit ``offline`` on a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__, logs
from agent.config import MqttSection, read_password
from agent.outbox import Message, Outbox
from agent.payloads import Gap, Status, rfc3339
from agent.topics import Topics

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = logs.get("agent.mqtt")

WINDOW = 1000  # unacknowledged QoS 1 events handed to the socket at once
CONTENT_TYPE = "application/json"


class MqttRefusedError(Exception):
    """The broker refused the connection (credentials, authorisation, TLS)."""


@runtime_checkable
class GapLedger(Protocol):
    """An outbox that remembers which overflow drops a gap marker announced.

    The durable spool implements it so a gap is announced once, across restarts;
    with a plain outbox the publisher keeps the count in memory.
    """

    @property
    def gap_reported(self) -> int: ...

    def record_gap_reported(self, total: int) -> None: ...


def status_message(topics: Topics, *, online: bool, started_at: float) -> Message:
    body = Status(
        host=topics.host,
        status="online" if online else "offline",
        version=__version__,
        started_at=rfc3339(started_at),
        at=rfc3339(time.time()),
    )
    return Message(topics.status, body.encode(), qos=1, retain=True)


class Publisher:
    """Keeps one broker connection alive and pushes events and state through it."""

    def __init__(
        self,
        *,
        cfg: MqttSection,
        topics: Topics,
        outbox: Outbox,
        started_at: float,
        client_id: str,
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.outbox = outbox
        self.started_at = started_at
        self.client_id = client_id
        self.connected = asyncio.Event()
        self._retained: dict[str, bytes] = {}  # topic -> payload (b"" pending a clear)
        self._client: paho.Client | None = None
        self._fd: int | None = None  # the current client's socket, watched by the loop
        self._inflight: dict[int, int] = {}  # paho mid -> outbox event id
        self._sent_upto = 0  # highest outbox id handed to the current client
        self._stopping = False
        self._disconnected: asyncio.Event = asyncio.Event()
        self._acked = asyncio.Event()
        self._pump_scheduled = False
        # Built once: paho only reads it, and building one per publish cost ~35 us.
        self._publish_props = self._properties(PacketTypes.PUBLISH)
        # Overflow drops announced by an acknowledged gap marker / by one handed to
        # the current client; mid of each gap marker in flight -> the total it covers.
        self._gap_reported = outbox.gap_reported if isinstance(outbox, GapLedger) else 0
        self._gap_sent = self._gap_reported
        self._gap_inflight: dict[int, int] = {}
        self._refused: str | None = None  # why the broker refused a publish, if it did

    # -- what the service calls -----------------------------------------------------

    def publish_event(self, message: Message) -> None:
        self.outbox.put(message)
        self._schedule_pump()

    def publish_state(self, message: Message) -> None:
        """Set (or, with an empty payload, clear) a retained topic."""
        if message.payload:
            self._retained[message.topic] = message.payload
        else:
            self._retained.pop(message.topic, None)
        if self._client is not None and self.connected.is_set():
            self._send(message)

    async def run(self) -> None:
        """Connect, and reconnect with capped exponential backoff, until stopped."""
        delay = self.cfg.reconnect_min
        while not self._stopping:
            try:
                await self._connect()
            except (OSError, MqttRefusedError, ssl.SSLError, TimeoutError) as err:
                log.warning(
                    "mqtt.connect_failed",
                    host=self.cfg.host,
                    port=self.cfg.port,
                    reason=str(err) or type(err).__name__,
                    retry_in=delay,
                )
                self._drop_client()
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.cfg.reconnect_max)
                continue
            await self._serve()
            if self._stopping:
                break
            refused, self._refused = self._refused, None
            if refused is not None:
                # Connected, but the broker refuses our events (ACL): keep them, back
                # off as for a refused connection; never resend in a tight loop.
                log.warning(
                    "mqtt.publish_refused",
                    host=self.cfg.host,
                    port=self.cfg.port,
                    reason=refused,
                    retry_in=delay,
                )
                await self._sleep_unless_stopping(delay)
                delay = min(delay * 2, self.cfg.reconnect_max)
                continue
            delay = self.cfg.reconnect_min
            log.warning("mqtt.disconnected", retry_in=delay)
            await self._sleep_unless_stopping(delay)

    async def stop(self, timeout: float) -> None:
        """Publish ``offline``, wait up to ``timeout`` for acks, disconnect."""
        self._stopping = True
        client = self._client
        if client is not None and self.connected.is_set():
            offline = status_message(self.topics, online=False, started_at=self.started_at)
            info = self._send(offline)
            deadline = time.monotonic() + timeout
            while (self._inflight or not info.is_published()) and time.monotonic() < deadline:
                self._acked.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(deadline - time.monotonic()):
                        await self._acked.wait()
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._disconnected.wait()
        self._drop_client()
        self._disconnected.set()
        log.info("mqtt.stopped", unacknowledged=len(self.outbox))

    # -- connection ---------------------------------------------------------------------

    def _new_client(self) -> paho.Client:
        v5 = self.cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.enable_logger(logs.stdlib("paho"))
        # Our own WINDOW bounds what is in flight. paho's limit would be redundant and
        # costly: with one set, every PUBACK rescans all in-flight messages
        # (Client._update_inflight), which capped throughput near 4,000 events/s.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        will = status_message(self.topics, online=False, started_at=self.started_at)
        client.will_set(
            will.topic,
            will.payload,
            qos=1,
            retain=True,
            properties=self._properties(PacketTypes.WILLMESSAGE),
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, read_password(self.cfg))
        if self.cfg.tls:
            client.tls_set(
                ca_certs=self.cfg.ca_file or None,
                certfile=self.cfg.cert_file or None,
                keyfile=self.cfg.key_file or None,
            )
        return client

    def _properties(self, packet: int) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(packet)  # type: ignore[no-untyped-call]
        props.ContentType = CONTENT_TYPE
        return props

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._new_client()
        self._client = client
        connack: asyncio.Future[ReasonCode] = loop.create_future()
        self._disconnected = asyncio.Event()

        loop_thread = threading.get_ident()

        def on_loop(fn: Callable[[], None]) -> None:
            # paho calls these from the loop thread, except during the blocking connect
            # in the executor. Run them at once when we can: a deferred remove_reader
            # would find the fd already closed.
            if threading.get_ident() == loop_thread:
                fn()
            else:
                loop.call_soon_threadsafe(fn)

        def on_socket_open(_c: paho.Client, _u: object, sock: SocketLike) -> None:
            fd = sock.fileno()
            on_loop(lambda: self._watch(client, fd))

        def on_socket_close(_c: paho.Client, _u: object, _sock: SocketLike) -> None:
            on_loop(self._unwatch)

        def on_write(_c: paho.Client, _u: object, _sock: SocketLike) -> None:
            on_loop(lambda: self._watch_write(client, on=True))

        def on_unwrite(_c: paho.Client, _u: object, _sock: SocketLike) -> None:
            on_loop(lambda: self._watch_write(client, on=False))

        def on_connect(_c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
            if not connack.done():
                connack.set_result(rc)

        def on_disconnect(
            _c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object
        ) -> None:
            if not connack.done():
                connack.set_exception(MqttRefusedError(f"disconnected before CONNACK: {rc}"))
            self._disconnected.set()

        def on_publish(_c: paho.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
            if rc.is_failure:  # MQTT 5 only: 3.1.1 brokers drop refused messages silently
                self._on_refused(client, mid, rc)
            else:
                self._on_ack(mid)

        client.on_socket_open = on_socket_open
        client.on_socket_close = on_socket_close
        client.on_socket_register_write = on_write
        client.on_socket_unregister_write = on_unwrite
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish

        await loop.run_in_executor(
            None, lambda: client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        )
        async with asyncio.timeout(max(10.0, self.cfg.keepalive)):
            rc = await connack
        if rc.is_failure:
            client.disconnect()
            raise MqttRefusedError(f"broker refused the connection: [code:{rc.value}] {rc}")
        self._after_connack()

    def _after_connack(self) -> None:
        self._inflight.clear()
        self._sent_upto = 0
        self._gap_inflight.clear()
        self._gap_sent = self._gap_reported
        self._send(status_message(self.topics, online=True, started_at=self.started_at))
        for topic, payload in list(self._retained.items()):
            self._send(Message(topic, payload, qos=self.cfg.qos, retain=True))
        self.connected.set()
        log.info(
            "mqtt.connected",
            host=self.cfg.host,
            port=self.cfg.port,
            protocol=self.cfg.protocol,
            backlog=len(self.outbox),
            retained=len(self._retained),
            client_id=self.client_id,
        )
        self._pump()

    async def _serve(self) -> None:
        """Run keepalive housekeeping until the connection drops."""
        client = self._client
        assert client is not None
        while not self._disconnected.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._disconnected.wait()
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self.connected.clear()
        self._drop_client()

    def _drop_client(self) -> None:
        self.connected.clear()
        client, self._client = self._client, None
        self._unwatch()
        if client is not None:
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._inflight.clear()
        self._sent_upto = 0

    async def _sleep_unless_stopping(self, delay: float) -> None:
        end = time.monotonic() + delay
        while not self._stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    # -- socket plumbing (always on the loop thread) ----------------------------------

    def _watch(self, client: paho.Client, fd: int) -> None:
        if self._client is client and fd >= 0:
            self._unwatch()
            self._fd = fd
            asyncio.get_running_loop().add_reader(fd, self._readable, client)

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(OSError, ValueError):  # fd closed under us
                loop.remove_reader(fd)
                loop.remove_writer(fd)

    def _watch_write(self, client: paho.Client, *, on: bool) -> None:
        if self._fd is None or self._client is not client:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ValueError):  # fd closed under us
            if on:
                loop.add_writer(self._fd, self._writable, client)
            else:
                loop.remove_writer(self._fd)

    def _readable(self, client: paho.Client) -> None:
        if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._disconnected.set()

    def _writable(self, client: paho.Client) -> None:
        if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._disconnected.set()

    # -- sending --------------------------------------------------------------------------

    def _send(self, message: Message) -> paho.MQTTMessageInfo:
        assert self._client is not None
        return self._client.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            properties=self._publish_props,
        )

    def _schedule_pump(self) -> None:
        """Pump once at the end of this loop iteration, however many events or acks
        arrive in it: the spool then writes them in one transaction."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def _announce_gap(self) -> None:
        """Before any event, tell subscribers how many events overflow dropped."""
        dropped = self.outbox.dropped
        if dropped <= self._gap_sent:
            return
        body = Gap(
            host=self.topics.host,
            dropped=dropped - self._gap_sent,
            dropped_total=dropped,
            at=rfc3339(time.time()),
        )
        info = self._send(Message(self.topics.gap, body.encode(), qos=1, retain=False))
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._gap_inflight[info.mid] = dropped
            self._gap_sent = dropped
            log.warning("mqtt.gap", dropped=body.dropped, dropped_total=dropped)

    def _pump(self) -> None:
        """Hand outbox events to paho, keeping at most WINDOW unacknowledged."""
        if self._client is None or not self.connected.is_set():
            return
        self._announce_gap()
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for event_id, message in self.outbox.pending(self._sent_upto, room):
            info = self._send(message)
            self._sent_upto = event_id
            if message.qos == 0:
                self.outbox.ack(event_id)
            elif info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._inflight[info.mid] = event_id
            else:
                break  # the connection is going away; resent after reconnect

    def _on_refused(self, client: paho.Client, mid: int, rc: ReasonCode) -> None:
        """A negative PUBACK (not authorised, quota...): the event stays spooled."""
        self._inflight.pop(mid, None)
        self._gap_inflight.pop(mid, None)
        if self._refused is None and self._client is client:
            self._refused = f"[code:{rc.value}] {rc}"
            client.disconnect()
            self._disconnected.set()

    def _on_ack(self, mid: int) -> None:
        event_id = self._inflight.pop(mid, None)
        if event_id is not None:
            self.outbox.ack(event_id)
        gap_total = self._gap_inflight.pop(mid, None)
        if gap_total is not None and gap_total > self._gap_reported:
            self._gap_reported = gap_total
            if isinstance(self.outbox, GapLedger):
                self.outbox.record_gap_reported(gap_total)
        self._acked.set()
        self._schedule_pump()
