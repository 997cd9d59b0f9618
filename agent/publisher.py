"""The delivery policy: what goes to the broker, in which order, and when.

Everything the agent publishes per vCPU or domain (transitions, lifecycle events,
retained states and retained clears) is ``put`` in one ordered ``Outbox`` and
leaves it only when the broker has it (PUBACK for QoS 1; at once for QoS 0). The
adapter, one ``agent.mqtt_client.Connection`` per connection, only moves bytes.

- **Flush, then send.** The pump (one per loop iteration, however many events or
  acks arrived in it) first makes the outbox durable (``flush``), then hands the
  broker what is pending, in order, at most ``window`` unacknowledged.
- **After CONNACK:** retained ``online`` first, then a ``gap`` marker if entries
  were dropped, then the backlog in order.
- **The retained mirror** (the latest message of every retained topic) is
  re-asserted once per connection, for a broker that lost its retained store, and
  only once the outbox has drained: then every mirrored state is the latest and
  the transition into it has been acknowledged, so a re-assert can never overtake
  an older event. Sent at CONNACK (as before), it reached subscribers ahead of the
  spooled transitions that led to it, and a subscriber applying messages in
  arrival order believed a state before it heard how it got there. A second
  round, ``online`` first, follows ``REASSERT_AGAIN_S`` later: a broker may
  acknowledge a retained message it did not store (nats-server during a leader
  election, docs/scale.md).
- **Failover.** With ``mqtt.servers`` every lost connection or failed connect
  moves to the next endpoint, at once within a round, with the backoff after a
  whole round failed (``run``).
- **Limits.** The window is min(``WINDOW``, the broker's Receive Maximum). An entry
  that can never be sent (larger than the broker's Maximum Packet Size, a topic
  over 65,535 bytes) is dropped and counted, so the ``gap`` marker tells
  subscribers; the entries that fit keep flowing. MQTT 3.1.1 brokers do not
  announce a limit (mosquitto's ``max_packet_size`` just closes the connection):
  after a connection dropped right after a send, the next one sends one entry at
  a time; one that drops right after sending it names the entry, which is then
  treated the same way (two connections per such entry, not a flap forever).
- **Refusals.** A negative PUBACK (MQTT 5 reason code >= 0x80) means not
  delivered: the entry stays queued, sending pauses for a backoff
  (``reconnect_min`` doubling to ``reconnect_max``), then everything unacknowledged
  is sent again in order, on the same connection.

Each lasting fault (connect failures, lost connections, refusals, oversized
entries) is a ``LastingFault``: a line when it starts, a reminder a minute while
it lasts, one when it ends; never a line per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__, logs
from agent.config import MqttSection
from agent.delivery import ChainUpdate, Message, Outbox
from agent.mqtt_client import (
    MAX_REMAINING_LENGTH,
    MAX_TOPIC_BYTES,
    Connack,
    ConnectFailedError,
    Connection,
    MqttError,
    describe,
)
from agent.payloads import Gap, Status, rfc3339
from agent.topics import Topics

log = logs.get("agent.publisher")

WINDOW = 1000  # unacknowledged QoS >= 1 messages on one connection, at most
# A connection that drops within this long after a send is suspected of a broker
# closing on a packet it will not take (see Publisher._judge_head).
SUSPECT_S = 5.0
# A packet no larger than one a broker already took is not over its size limit: a
# connection that drops each time such an entry alone is in flight names it only
# after this many drops in a row. A cluster node failing over drops connections
# too (CI once saw a 262-byte entry taken for one the broker refuses).
STRIKES = 3
FAULT_EVERY_S = 60.0  # the reminder pace of a lasting fault
# A broker may acknowledge a retained message it then fails to store: nats-server
# 2.9.10 PUBACKs it and logs "unable to store retained message" while its
# retained stream elects a new leader (~3 s after the leader node died; measured,
# docs/scale.md "nats-server facts"). So each connection re-asserts `online` and
# the mirror a second time this long after the first round.
REASSERT_AGAIN_S = 10.0


@dataclass(frozen=True, slots=True)
class Unsendable:
    """Why an entry can never be sent: what is too large, its size and the limit."""

    what: str  # "topic", "packet", or paho's reason
    size: int
    limit: int | None  # None: the broker did not say (MQTT 3.1.1)


def status_message(topics: Topics, *, online: bool, started_at: float, epoch: str) -> Message:
    body = Status(
        host=topics.host,
        status="online" if online else "offline",
        version=__version__,
        started_at=rfc3339(started_at),
        epoch=epoch,
        at=rfc3339(time.time()),
    )
    return Message(topics.status, body.encode(), qos=1, retain=True)


class Publisher:
    """Keeps one broker connection alive and drains the outbox through it."""

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
        self._mirror: dict[str, Message] = {}  # retained topic -> its latest message
        self._conn: Connection | None = None
        self._endpoint_index = 0  # which of cfg.endpoints the next connect goes to
        self._endpoint = cfg.endpoints[0]  # the one of the current (or last) connection
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._pump_scheduled = False
        self._answered = asyncio.Event()  # an ack or refusal arrived (stop waits on it)
        # Per connection (reset at CONNACK):
        # mid -> (entry id, sent at, packet size)
        self._inflight: dict[int, tuple[int, float, int]] = {}
        self._others: dict[int, tuple[str, object]] = {}  # mid -> status/gap/reassert
        self._sent_upto = 0  # highest entry id handed to this connection
        self._window = WINDOW
        self._max_packet: int | None = None
        self._gap_sent = 0  # the dropped total the last gap marker sent announced
        self._reassert: list[str] | None = None  # mirror topics still to re-assert
        self._again: asyncio.TimerHandle | None = None  # the second round, when due
        self._rounds_left = 0  # further re-assert rounds on this connection
        # Refusals: pause, back off, then resend everything unacknowledged.
        self._paused = False
        self._resume: asyncio.TimerHandle | None = None
        self._resume_due = False
        self._refused_ids: set[int] = set()
        self._refusal_delay = cfg.reconnect_min
        # Probing for a packet the broker closes on (see _judge_head): the highest
        # entry id sent before the suspicious drop; 0 when not probing.
        self._probe_upto = 0
        self._struck = (0, 0)  # (entry id, drops in a row with it alone in flight)
        self._largest_taken = 0  # the largest packet a broker acknowledged
        self._full_window = WINDOW
        self._connect_failed = logs.LastingFault(log, "mqtt.connect_failed", every=FAULT_EVERY_S)
        self._lost = logs.LastingFault(log, "mqtt.disconnected", every=FAULT_EVERY_S)
        self._refused = logs.LastingFault(log, "mqtt.publish_refused", every=FAULT_EVERY_S)
        self._unsendable_fault = logs.LastingFault(log, "mqtt.unsendable", every=FAULT_EVERY_S)

    # -- what the service calls -----------------------------------------------------

    @property
    def endpoint(self) -> tuple[str, int]:
        """(host, port) of the current connection, or of the last one tried."""
        return self._endpoint

    def publish(self, message: Message, told: ChainUpdate | None = None) -> None:
        """Queue a message (and the chain record it carries); sent at the end of
        this loop iteration. Never blocks."""
        self.outbox.put(message, told)
        if message.retain:
            if message.payload:
                self._mirror[message.topic] = message
            else:  # a clear: nothing to re-assert for this topic any more
                self._mirror.pop(message.topic, None)
        self._schedule_pump()

    async def run(self) -> None:
        """Connect, and reconnect with capped exponential backoff, until stopped.

        With several endpoints (``mqtt.servers``) every ended connection or failed
        connect moves on to the next one, at once while some endpoint has not been
        tried in this round; after a whole round has failed, the backoff pause
        (``reconnect_min`` doubling to ``reconnect_max``) comes before the next. A
        node killed with SIGKILL is so replaced by the next node within one
        connect, not one backoff. One endpoint behaves as it always did: a pause
        before every attempt.
        """
        endpoints = self.cfg.endpoints
        delay = self.cfg.reconnect_min
        untried = len(endpoints) - 1  # endpoints left in this round before a pause
        while not self._stopping:
            host, port = self._endpoint = endpoints[self._endpoint_index]
            try:
                conn = self._connection(host, port)
                self._conn = conn
                connack = await conn.connect()
            except MqttError as err:
                self._conn = None
                if self._stopping:
                    break
                pause, untried = self._next_endpoint(untried, delay)
                self._connect_failed.hit(
                    host=host, port=port, reason=str(err), retry_in=pause, next=self._where()
                )
                await self._sleep(pause)
                if pause:
                    delay = min(delay * 2, self.cfg.reconnect_max)
                continue
            except BaseException:
                if self._conn is not None:
                    self._conn.close(reason="cancelled")
                self._conn = None
                raise
            self._connect_failed.clear(host=host, port=port)
            self._on_connack(conn, connack)
            try:
                await conn.closed.wait()
            finally:
                conn.close(reason="cancelled")  # a no-op unless run() was cancelled
                drained = self._reassert is not None
                self._on_closed(conn)
            if self._stopping:
                break
            # A connection that delivered its backlog was a good one: start the
            # backoff and the round again. One that dropped before (a broker that
            # keeps closing on us) backs off further.
            if drained:
                delay = self.cfg.reconnect_min
                untried = len(endpoints) - 1
            pause, untried = self._next_endpoint(untried, delay)
            self._lost.hit(
                host=host, port=port, reason=conn.close_reason, retry_in=pause, next=self._where()
            )
            await self._sleep(pause)
            if pause and not drained:
                delay = min(delay * 2, self.cfg.reconnect_max)

    def _connection(self, host: str, port: int) -> Connection:
        try:
            return Connection(
                cfg=self.cfg,
                host=host,
                port=port,
                client_id=self.client_id,
                will=self._status(online=False),
                on_ack=self._on_ack,
                on_refused=self._on_refused,
            )
        except OSError as err:
            # The password file (read for every connection) went bad since the start:
            # a failed attempt, retried with backoff, never the end of the agent.
            raise ConnectFailedError(str(err)) from err

    def _next_endpoint(self, untried: int, delay: float) -> tuple[float, int]:
        """Move to the next endpoint; (pause before trying it, untried left)."""
        endpoints = self.cfg.endpoints
        self._endpoint_index = (self._endpoint_index + 1) % len(endpoints)
        if untried > 0:
            return 0.0, untried - 1
        return delay, len(endpoints) - 1

    def _where(self) -> str:
        host, port = self.cfg.endpoints[self._endpoint_index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def stop(self, timeout: float) -> None:
        """Publish ``offline``, wait up to ``timeout`` for acks, disconnect."""
        self._stopping = True
        self._stop_requested.set()
        conn = self._conn
        deadline = time.monotonic() + timeout
        if conn is not None and self.connected.is_set() and not conn.closed.is_set():
            await self._wait_answers(deadline, room_for_one=True)
            mid = conn.publish(self._status(online=False))
            if mid is not None:
                self._others[mid] = ("status", False)
            await self._wait_answers(deadline, room_for_one=False)
            conn.close(reason="stopped")
        self.connected.clear()
        self.outbox.flush()
        log.info("mqtt.stopped", unacknowledged=len(self.outbox))

    # -- connection events ------------------------------------------------------------

    def _on_connack(self, conn: Connection, connack: Connack) -> None:
        self._inflight.clear()
        self._others.clear()
        self._sent_upto = 0
        self._gap_sent = self.outbox.gap_reported
        self._reassert = None
        self._cancel_again()
        self._rounds_left = 1
        self._paused = self._resume_due = False
        self._full_window = min(WINDOW, connack.receive_maximum or WINDOW)
        self._window = 1 if self._probe_upto else self._full_window
        self._max_packet = connack.maximum_packet_size
        self.connected.set()
        if self._lost.count > 1:  # one more connection that keeps dropping: no news
            return self._start(conn)
        log.info(
            "mqtt.connected",
            host=conn.host,
            port=conn.port,
            protocol=self.cfg.protocol,
            client_id=self.client_id,
            backlog=len(self.outbox),
            retained=len(self._mirror),
            receive_maximum=connack.receive_maximum,
            maximum_packet_size=connack.maximum_packet_size,
        )
        self._start(conn)

    def _start(self, conn: Connection) -> None:
        self._send_status(conn)
        self._pump()

    def _on_closed(self, conn: Connection) -> None:
        self.connected.clear()
        if self._conn is conn:
            self._conn = None
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._cancel_again()
        self._judge_head(conn)
        self._inflight.clear()
        self._others.clear()
        self._unsendable_fault.clear()  # a limit belongs to a connection

    def _judge_head(self, conn: Connection) -> None:
        """Did the broker close on a packet it will never take (MQTT 3.1.1 brokers
        do not say why)? A connection that dropped right after a send, with entries
        in flight, makes the next connection *probe*: one entry in flight at a time
        up to the last one sent here. A probing connection that drops right after
        sending its one entry names the culprit: it is dropped like an entry over an
        announced limit, rather than flapping forever. An entry no larger than a
        packet a broker already took is named only after ``STRIKES`` such drops in a
        row: a size limit cannot refuse it, a failing node can drop any connection."""
        if self._stopping or not self._inflight:
            return
        newest = max(at for _, at, _ in self._inflight.values())
        if time.monotonic() - newest > SUSPECT_S:
            return
        if not self._probe_upto:
            self._probe_upto = self._sent_upto
            return
        head, _, size = min(self._inflight.values())
        strikes = self._struck[1] + 1 if self._struck[0] == head else 1
        self._struck = (head, strikes)
        if size <= self._largest_taken and strikes < STRIKES:
            return
        for entry_id, message in self.outbox.pending(head - 1, 1):
            if entry_id == head:
                self._drop(entry_id, message, Unsendable("packet", size, self._max_packet))

    def _probe_done(self) -> None:
        """Probing ends once every entry sent before the suspicious drop is gone."""
        if self._probe_upto:
            oldest = self.outbox.pending(0, 1)
            if not oldest or oldest[0][0] > self._probe_upto:
                self._probe_upto = 0
                self._struck = (0, 0)
                self._window = self._full_window

    # -- the pump ---------------------------------------------------------------------

    def _schedule_pump(self) -> None:
        """Pump once at the end of this loop iteration, however many events or acks
        arrive in it: the outbox then writes them in one transaction."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        self.outbox.flush()  # False: not durable (the outbox logs it); still deliver
        conn = self._conn
        if conn is None or not self.connected.is_set() or self._paused or self._stopping:
            return
        self._probe_done()
        while (room := self._room()) > 0:
            self._announce_gap(conn)
            batch = self.outbox.pending(self._sent_upto, room)
            if not batch:
                break
            for entry_id, message in batch:
                self._sent_upto = entry_id
                why = self._unsendable(conn, message)
                if why is not None:
                    self._drop(entry_id, message, why)
                    break  # announce the gap before anything that follows
                try:
                    mid = conn.publish(message)
                except ValueError as err:  # paho's own checks (e.g. a wildcard in the topic)
                    self._drop(entry_id, message, Unsendable(str(err), -1, None))
                    break
                if mid is None:
                    return  # the connection is going away; all is resent on the next
                if message.qos == 0:
                    self.outbox.ack(entry_id)
                else:
                    size = conn.packet_size(message)
                    self._inflight[mid] = (entry_id, time.monotonic(), size)
        self._reassert_mirror(conn)

    def _room(self) -> int:
        return self._window - len(self._inflight) - len(self._others)

    def _unsendable(self, conn: Connection, message: Message) -> Unsendable | None:
        try:
            topic_bytes = len(message.topic.encode())
        except UnicodeEncodeError:
            return Unsendable("topic", -1, MAX_TOPIC_BYTES)
        if topic_bytes > MAX_TOPIC_BYTES:
            return Unsendable("topic", topic_bytes, MAX_TOPIC_BYTES)
        size = conn.packet_size(message)
        limit = self._max_packet or MAX_REMAINING_LENGTH + 5
        if size > limit:
            return Unsendable("packet", size, limit)
        return None

    def _drop(self, entry_id: int, message: Message, why: Unsendable) -> None:
        """An entry the broker can never take: counted in ``dropped`` (a gap marker
        tells subscribers), so the entries that fit keep flowing."""
        self.outbox.drop(entry_id)
        if message.retain and self._mirror.get(message.topic) is message:
            del self._mirror[message.topic]
        self._unsendable_fault.hit(
            topic=message.topic[:200],
            reason=why.what,
            size=why.size,
            limit=why.limit,
            dropped_total=self.outbox.dropped,
        )
        self._schedule_pump()

    def _announce_gap(self, conn: Connection) -> None:
        """Before any further entry, tell subscribers how many entries were dropped."""
        dropped = self.outbox.dropped
        if dropped <= self._gap_sent:
            return
        body = Gap(
            host=self.topics.host,
            dropped=dropped - self._gap_sent,
            dropped_total=dropped,
            epoch=self.outbox.epoch,
            at=rfc3339(time.time()),
        )
        mid = conn.publish(Message(self.topics.gap, body.encode(), qos=1, retain=False))
        if mid is None:
            return
        self._others[mid] = ("gap", dropped)
        self._gap_sent = dropped
        log.warning("mqtt.gap", dropped=body.dropped, dropped_total=dropped)

    def _send_status(self, conn: Connection) -> None:
        online = self._status(online=True)
        if self._unsendable(conn, online) is None:
            mid = conn.publish(online)
            if mid is not None:
                self._others[mid] = ("status", True)

    def _reassert_mirror(self, conn: Connection) -> None:
        """Once per connection, after the outbox drained: every retained topic's
        latest message again (a broker restart may have lost its retained store);
        then once more ``REASSERT_AGAIN_S`` later, ``online`` first (a broker may
        have acknowledged a retained message it did not store)."""
        if self._paused or len(self.outbox):
            return
        if self._reassert is None:
            self._reassert = list(self._mirror)
            self._lost.clear()  # connected and delivered: the connection fault is over
        while self._reassert and self._room() > 0 and not len(self.outbox):
            topic = self._reassert.pop()
            if topic == self.topics.status:
                message = self._status(online=True)
            else:
                mirrored = self._mirror.get(topic)
                if mirrored is None:
                    continue
                message = mirrored
            if self._unsendable(conn, message) is not None:
                continue
            mid = conn.publish(message)
            if mid is None:
                return
            if message.qos:
                self._others[mid] = ("reassert", topic)
        if not self._reassert and self._rounds_left > 0 and self._again is None:
            self._again = asyncio.get_running_loop().call_later(
                REASSERT_AGAIN_S, self._reassert_again
            )

    def _reassert_again(self) -> None:
        self._again = None
        self._rounds_left -= 1
        # Popped from the end: `online` goes first.
        self._reassert = [*self._mirror, self.topics.status]
        self._schedule_pump()

    def _cancel_again(self) -> None:
        if self._again is not None:
            self._again.cancel()
            self._again = None

    # -- broker answers ---------------------------------------------------------------

    def _on_ack(self, mid: int) -> None:
        sent = self._inflight.pop(mid, None)
        if sent is not None:
            entry_id, _, size = sent
            self._largest_taken = max(self._largest_taken, size)
            self.outbox.ack(entry_id)
            self._accepted(entry_id)
        else:
            kind, ref = self._others.pop(mid, ("", None))
            if kind == "gap":
                assert isinstance(ref, int)
                if ref > self.outbox.gap_reported:
                    self.outbox.record_gap_reported(ref)
            elif kind == "status" and ref is True:
                self._accepted(0)
        self._answered.set()
        self._maybe_resume()
        self._schedule_pump()

    def _accepted(self, entry_id: int) -> None:
        """The broker took an entry (0: the online status) it had refused before?"""
        if self._refused_ids:
            self._refused_ids.discard(entry_id)
            if not self._refused_ids:
                self._refusal_delay = self.cfg.reconnect_min
                self._refused.clear(host=self._endpoint[0], port=self._endpoint[1])

    def _on_refused(self, mid: int, rc: ReasonCode) -> None:
        """A negative PUBACK (not authorised, quota exceeded...): not delivered. The
        entry stays queued; pause, back off, then resend in order."""
        sent = self._inflight.pop(mid, None)
        what = "event"
        if sent is not None:
            self._refused_ids.add(sent[0])
        else:
            kind, ref = self._others.pop(mid, ("", None))
            if kind == "gap":
                self._gap_sent = self.outbox.gap_reported  # announce it again
            elif kind == "reassert" and self._reassert is not None:
                assert isinstance(ref, str)
                self._reassert.append(ref)
            elif kind == "status" and ref is True:
                self._refused_ids.add(0)  # id 0: the online status, resent on resume
            what = kind or what
        self._answered.set()
        if not self._paused and not self._stopping:
            delay = self._refusal_delay
            self._refusal_delay = min(delay * 2, self.cfg.reconnect_max)
            self._refused.hit(
                host=self._endpoint[0],
                port=self._endpoint[1],
                reason=describe(rc),
                what=what,
                retry_in=delay,
            )
            self._paused = True
            self._resume_due = False
            self._resume = asyncio.get_running_loop().call_later(delay, self._resume_now)
        self._maybe_resume()

    def _resume_now(self) -> None:
        self._resume = None
        self._resume_due = True
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        """After a refusal's backoff, once every message in flight was answered:
        resend everything unacknowledged, in order."""
        if not (self._paused and self._resume_due) or self._inflight or self._others:
            return
        conn = self._conn
        self._paused = self._resume_due = False
        self._sent_upto = 0
        if conn is None:
            return
        if 0 in self._refused_ids:
            self._refused_ids.discard(0)
            self._send_status(conn)
        self._schedule_pump()

    # -- helpers ----------------------------------------------------------------------

    def _status(self, *, online: bool) -> Message:
        return status_message(
            self.topics, online=online, started_at=self.started_at, epoch=self.outbox.epoch
        )

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()

    async def _wait_answers(self, deadline: float, *, room_for_one: bool) -> None:
        """Wait until the broker answered what is in flight (or there is room for
        one more message), the connection closed, or the deadline passed."""
        conn = self._conn
        while conn is not None and not conn.closed.is_set():
            busy = len(self._inflight) + len(self._others)
            if (busy < self._window) if room_for_one else not busy:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.1)):
                    await self._answered.wait()
