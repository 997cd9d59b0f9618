"""One MQTT connection: a paho-mqtt 2.x ``Client`` driven by the running asyncio loop.

The adapter only; what to send and when is ``agent.publisher``'s. As in aiomqtt,
paho's socket is watched by the loop (``add_reader`` / ``add_writer``) and only
the blocking TCP/TLS connect runs in a thread. One ``Connection`` object per
connection, never reused: a reconnect builds a new one.

Each connection touches only its own file descriptor. It registers the fd once
the connect has returned (on the loop thread, never from paho's connect thread),
and unregisters it *before* the socket is closed, in ``close()`` or in paho's
socket-close callback, both on the loop thread. Then every paho callback is
detached and paho closes its sockets. A closed fd number is soon reused by the
next connection's socket; an old connection that unwatched "its" fd afterwards
(as the single-object publisher before it did, when the replaced client was
garbage-collected) unwatched the new connection: it looked connected and sent
nothing until the keepalive dropped it.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import logs
from agent.config import MqttSection, read_password
from agent.delivery import Message

if TYPE_CHECKING:
    from paho.mqtt.client import ConnectFlags, DisconnectFlags, SocketLike

CONTENT_TYPE = "application/json"
MAX_TOPIC_BYTES = 65535  # MQTT: a UTF-8 string is prefixed by a 16-bit length
MAX_REMAINING_LENGTH = 268_435_455  # MQTT: four bytes of variable-length integer
# paho's keepalive bookkeeping (loop_misc) runs every keepalive / 4: a PINGREQ
# then leaves at most 1.25 x keepalive after the last packet, inside the 1.5 x
# the broker allows, and an idle agent wakes for it every 7.5 s (keepalive 30),
# not every second (docs/benchmarks.md, "wake-ups").
HOUSEKEEPING_SHARE = 0.25


class MqttError(Exception):
    """Anything that ends or prevents an MQTT connection."""


class ConnectRefusedError(MqttError):
    """The broker answered CONNACK with a failure (credentials, authorisation...)."""


class ConnectFailedError(MqttError):
    """No CONNACK: unreachable, TLS failure, or the connection dropped first."""


def describe(rc: ReasonCode) -> str:
    """``[code:135] Not authorized``: the number and paho's text for it."""
    return f"[code:{rc.value}] {rc}"


@dataclass(frozen=True, slots=True)
class Connack:
    """What the broker announced in CONNACK (MQTT 5 properties; None when absent)."""

    receive_maximum: int | None
    maximum_packet_size: int | None


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:  # 7 bits per byte of an MQTT variable-length integer
        n //= 128
        size += 1
    return size


def use_credentials(client: paho.Client, cfg: MqttSection) -> None:
    """The ``[mqtt]`` username, password file and TLS settings, on a paho client
    (the agent's connections and the subscriber library's alike)."""
    if cfg.username:
        client.username_pw_set(cfg.username, read_password(cfg))
    if cfg.tls:
        client.tls_set(
            ca_certs=cfg.ca_file or None,
            certfile=cfg.cert_file or None,
            keyfile=cfg.key_file or None,
        )


class Connection:
    """One connection to the broker; built, connected, used, closed, dropped.

    ``on_ack(mid)`` is called for each successful PUBACK (QoS 1) or PUBCOMP (QoS 2),
    ``on_refused(mid, reason)`` for an MQTT 5 PUBACK with a failure reason code.
    ``closed`` is set when the connection has ended, for any reason; ``close_reason``
    then says why.
    """

    def __init__(
        self,
        *,
        cfg: MqttSection,
        host: str,
        port: int,
        client_id: str,
        will: Message,
        on_ack: Callable[[int], None],
        on_refused: Callable[[int, ReasonCode], None],
    ) -> None:
        self.cfg = cfg
        self.host = host  # one of cfg.endpoints: the publisher picks which
        self.port = port
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._on_ack = on_ack
        self._on_refused = on_refused
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._fd: int | None = None  # the fd this connection registered with the loop
        self._writing = False
        self._misc: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[tuple[ReasonCode, Connack]] = self._loop.create_future()
        self._publish_props = self._properties(PacketTypes.PUBLISH)
        self._props_len = 0
        if self._publish_props is not None:
            self._props_len = len(self._publish_props.pack())  # type: ignore[no-untyped-call]
        self._client = self._new_client(client_id, will)

    # -- life cycle ------------------------------------------------------------------

    def _new_client(self, client_id: str, will: Message) -> paho.Client:
        v5 = self.cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        client.enable_logger(logs.stdlib("paho"))
        # The publisher bounds what is in flight. paho's own limit would be redundant
        # and costly: with one set, every PUBACK rescans all in-flight messages
        # (Client._update_inflight), which capped throughput near 4,000 events/s.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.will_set(
            will.topic,
            will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=self._properties(PacketTypes.WILLMESSAGE),
        )
        use_credentials(client, self.cfg)
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _properties(self, packet: int) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(packet)  # type: ignore[no-untyped-call]
        props.ContentType = CONTENT_TYPE
        return props

    async def connect(self) -> Connack:
        """Connect and wait for CONNACK; raise ``MqttError`` (closed) when refused."""
        client = self._client
        blocking = self._loop.run_in_executor(
            None, lambda: client.connect(self.host, self.port, self.cfg.keepalive)
        )
        try:
            # Shielded: a cancelled wait leaves the thread connecting; close its
            # socket once it is done rather than leak it.
            await asyncio.shield(blocking)
        except asyncio.CancelledError:
            blocking.add_done_callback(self._close_after_thread)
            raise
        except (OSError, ssl.SSLError, ValueError) as err:
            self.close(reason=str(err) or type(err).__name__)
            raise ConnectFailedError(self.close_reason) from err
        sock = client.socket()
        if sock is None:
            self.close(reason="socket closed while connecting")
            raise ConnectFailedError(self.close_reason)
        self._watch(sock.fileno())
        try:
            async with asyncio.timeout(max(10.0, self.cfg.keepalive)):
                rc, connack = await self._connack
        except TimeoutError as err:
            self.close(reason="no CONNACK")
            raise ConnectFailedError(self.close_reason) from err
        except MqttError:
            self.close()
            raise
        if rc.is_failure:
            # The CONNACK's reason, not paho's disconnect that follows it.
            self.close_reason = f"broker refused the connection: {describe(rc)}"
            self.close()
            raise ConnectRefusedError(self.close_reason)
        self._misc = self._loop.call_later(self._housekeeping_s, self._housekeeping)
        return connack

    def _close_after_thread(self, fut: asyncio.Future[MQTTErrorCode]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: a failed connect of a cancelled wait is no news
        self.close(reason="cancelled")

    def close(self, *, reason: str = "closed", clean: bool = True) -> None:
        """End this connection; idempotent. ``clean``: send DISCONNECT first, so the
        broker does not publish the will (the agent is alive and reconnects)."""
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self.closed.set()
        if self._misc is not None:
            self._misc.cancel()
        self._unwatch()  # our fd, while our socket still holds it
        if not self._connack.done():
            self._connack.set_exception(ConnectFailedError(self.close_reason))
            self._connack.exception()  # retrieved: nobody may be waiting any more
        client = self._client
        for name in (
            "on_socket_open",
            "on_socket_close",
            "on_socket_register_write",
            "on_socket_unregister_write",
            "on_connect",
            "on_disconnect",
            "on_publish",
        ):
            setattr(client, name, None)
        if clean and client.is_connected():
            client.disconnect()
            client.loop_write()  # best effort: a full socket buffer means no DISCONNECT
        # What Client.__del__ would do at some later collection: close the socket
        # and paho's wake-up socket pair, now, with no callback left to fire.
        client._reset_sockets()

    # -- sending ---------------------------------------------------------------------

    def packet_size(self, message: Message) -> int:
        """The size in bytes of the PUBLISH packet that carries ``message``."""
        remaining = (
            2
            + len(message.topic.encode())
            + (2 if message.qos else 0)
            + self._props_len
            + len(message.payload)
        )
        return 1 + _varint_len(remaining) + remaining

    def publish(self, message: Message) -> int | None:
        """Hand a message to paho; its mid, or None when the connection is gone."""
        if self.closed.is_set():
            return None
        info = self._client.publish(
            message.topic,
            message.payload,
            qos=message.qos,
            retain=message.retain,
            properties=self._publish_props,
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    # -- paho callbacks and socket plumbing (loop thread, except during connect) -------

    def _on_loop(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _watch(self, fd: int) -> None:
        if self.closed.is_set() or fd < 0:
            return
        self._fd = fd
        self._loop.add_reader(fd, self._readable)
        if self._client.want_write():
            self._on_register_write(self._client, None, None)

    def _unwatch(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            if self._writing:
                self._loop.remove_writer(fd)
        self._writing = False

    def _on_register_write(self, _c: paho.Client, _u: object, _s: SocketLike | None) -> None:
        # During the connect (executor thread) the fd is not ours yet: _watch looks
        # at want_write() when it registers it.
        if self._on_loop() and self._fd is not None and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _on_unregister_write(self, _c: paho.Client, _u: object, _s: SocketLike) -> None:
        if self._on_loop() and self._fd is not None and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_socket_close(self, _c: paho.Client, _u: object, _s: SocketLike) -> None:
        if self._on_loop():
            self._unwatch()  # paho closes the socket right after this returns

    def _readable(self) -> None:
        rc = self._client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"read: {rc.name}")

    def _writable(self) -> None:
        rc = self._client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"write: {rc.name}")

    @property
    def _housekeeping_s(self) -> float:
        return self.cfg.keepalive * HOUSEKEEPING_SHARE

    def _housekeeping(self) -> None:
        rc = self._client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"keepalive: {rc.name}")
        elif not self.closed.is_set():
            self._misc = self._loop.call_later(self._housekeeping_s, self._housekeeping)

    def _lost(self, reason: str) -> None:
        # Deferred: this may run inside a paho callback, where paho holds its locks.
        self.close_reason = self.close_reason or reason
        if self._on_loop():
            self._loop.call_soon(lambda: self.close(clean=False))
        else:  # paho's connect thread
            self._loop.call_soon_threadsafe(lambda: self.close(clean=False))

    def _on_connect(
        self,
        _c: paho.Client,
        _u: object,
        _f: ConnectFlags,
        rc: ReasonCode,
        props: Properties | None,
    ) -> None:
        connack = Connack(
            receive_maximum=getattr(props, "ReceiveMaximum", None),
            maximum_packet_size=getattr(props, "MaximumPacketSize", None),
        )
        if not self._connack.done():
            self._connack.set_result((rc, connack))

    def _on_disconnect(
        self,
        _c: paho.Client,
        _u: object,
        _f: DisconnectFlags,
        rc: ReasonCode,
        _p: Properties | None,
    ) -> None:
        # An MQTT 5 broker says why it disconnects us (e.g. 0x95 Packet too large).
        self._lost(f"disconnected: {describe(rc)}")

    def _on_publish(
        self, _c: paho.Client, _u: object, mid: int, rc: ReasonCode, _p: Properties
    ) -> None:
        if self.closed.is_set():
            return
        if rc.is_failure:  # MQTT 5 only: a 3.1.1 broker drops a refused message silently
            self._on_refused(mid, rc)
        else:
            self._on_ack(mid)
