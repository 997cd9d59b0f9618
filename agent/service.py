"""The agent: wires libvirt, the pure core and MQTT together on one asyncio loop.

One task runs the sampling loop below; the publisher runs its own connection
task. libvirt callbacks arrive as ``SourceEvent``s on ``self._events``.

    tick (every sampling.interval)  -> every vCPU's counters -> advance -> render
                                       -> publish
    lifecycle event                 -> publish it, re-sample that domain now and
                                       again after sampling.event_followup
    connection lost                 -> reconnect with backoff, rebaseline (first
                                       decisions marked resync)

A tick reads the counters of domains that ``agent/schedstat.py`` serves from
/proc (no libvirt call, nothing asked of QEMU); the libvirt bulk call runs every
``sampling.libvirt_interval`` while some running domain is not served (those
domains are looked at that often), and every ``PROC_LIBVIRT_EVERY`` s otherwise,
for what only libvirt knows (domain state, online vCPUs, s390's halted flag).
Every libvirt sample re-attaches the domains it returns, so a restarted QEMU or a
hot-plugged vCPU is found again (docs/design.md, "Sampling").

At start the renderer is seeded with the outbox's chain (what subscribers were
told), so a change that happened while the agent was down is told as a resync
transition from the state subscribers last saw (agent/render.py).

The systemd watchdog is fed after each *completed* sample, never by a timer, so a
hung libvirt stops the pings and systemd restarts us.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from agent import __version__, logs
from agent.config import Config
from agent.delivery import MemoryOutbox, Outbox
from agent.model import DomainRecord, LifecycleEvent
from agent.publisher import Publisher
from agent.render import Renderer
from agent.schedstat import SchedstatSource
from agent.schedule import Resamples
from agent.sdnotify import Notifier
from agent.source import (
    ConnectionLost,
    LibvirtSource,
    SourceBusyError,
    SourceError,
    SourceEvent,
    SourceTimeoutError,
)
from agent.spool import SqliteSpool
from agent.ticker import Pace, Ticker
from agent.topics import Topics
from agent.transitions import Change, HostState, advance, rebaseline, retire

log = logs.get("agent.service")
T = TypeVar("T")

STOP_TIMEOUT = 3.0  # seconds to flush the broker on SIGTERM (the unit allows 5 s)
READY_MQTT_WAIT = 10.0  # how long READY waits for the broker before going ahead


class Service:
    """The agent. Raises ``agent.spool.SpoolError`` when its spool is unusable."""

    def __init__(
        self, cfg: Config, *, notifier: Notifier | None = None, outbox: Outbox | None = None
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.th = cfg.sampling.thresholds()
        self.topics = Topics(prefix=cfg.mqtt.topic_prefix, host=cfg.host_id)
        self.outbox = outbox if outbox is not None else _open_outbox(cfg)
        # The chain continues where subscribers were left (a new epoch starts at 1).
        self.renderer = Renderer(
            self.topics, qos=cfg.mqtt.qos, epoch=self.outbox.epoch, chain=self.outbox.chain()
        )
        self.started_at = time.time()
        self.publisher = Publisher(
            cfg=cfg.mqtt,
            topics=self.topics,
            outbox=self.outbox,
            started_at=self.started_at,
            client_id=cfg.mqtt.client_id or f"vcpu-agent-{socket.gethostname()}",
        )
        self.host = HostState()
        self._events: asyncio.Queue[SourceEvent] = asyncio.Queue()
        self.source = LibvirtSource(
            uri=cfg.libvirt.uri,
            read_only=cfg.libvirt.read_only,
            call_timeout=cfg.libvirt.call_timeout,
            keepalive=(cfg.libvirt.keepalive_interval, cfg.libvirt.keepalive_count),
            on_event=self._on_source_event,
        )
        self.fast = SchedstatSource()
        # The ticker thread reads /proc and decides; the loop samples libvirt, handles
        # events and publishes. This lock guards what both touch: the host state,
        # the /proc source and its bases, and ``_decided``, the ticker's decisions
        # in the order they were made. The loop publishes only under it, after
        # what the ticker decided before: changes reach the outbox in decision order.
        self._lock = threading.Lock()
        self._decided: collections.deque[tuple[list[Change], frozenset[str]]] = collections.deque()
        self._ticker = Ticker(
            interval=cfg.sampling.interval,
            pace=self._pace,
            on_fast=self._tick,
            on_bulk=self._bulk_is_due,
            on_error=self._ticker_failed,
        )
        self._paced = Pace(fast=False, every=0.0)  # what the ticker was told last
        self._bulk_due = False
        self._wake = asyncio.Event()  # the loop has something to do
        # The last libvirt record of each domain the fast path serves: its structure
        # (domain state, online vCPUs) for records built from /proc between calls.
        self._bases: dict[str, DomainRecord] = {}
        self._proc_said: dict[str, str] = {}  # UUID -> last logged reason ("" = served)
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop
        self._ticker_error: asyncio.Future[None]
        self.resamples = Resamples(
            followup=cfg.sampling.event_followup, confirm_after=cfg.sampling.confirm_after
        )
        self._skipped: set[str] = set()  # UUIDs of domains whose names fit no topic
        self._busy = logs.LastingFault(log, "sample.skipped")
        self._stalled = logs.LastingFault(log, "sample.stalled")
        self._failed = logs.LastingFault(log, "sample.failed")
        self._ready = False
        self.samples = 0

    # -- lifecycle -----------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT (or ``request_stop``); return the exit status.

        ``handle_signals=False`` is for embedding (tests run the service on a
        thread, where asyncio cannot install signal handlers).
        """
        loop = self._loop = asyncio.get_running_loop()
        self._ticker_error = loop.create_future()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "agent.starting",
            version=__version__,
            host=self.topics.host,
            epoch=self.outbox.epoch,
            uri=self.cfg.libvirt.uri,
            brokers=[f"{host}:{port}" for host, port in self.cfg.mqtt.endpoints],
            interval=self.cfg.sampling.interval,
        )
        mqtt_task = asyncio.create_task(self.publisher.run(), name="mqtt")
        main = asyncio.create_task(self._main(), name="sampling")
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        ready = asyncio.create_task(self._ready_when_connected(), name="ready")
        try:
            # The ticker thread's error ends the agent like a failed task.
            waits: set[asyncio.Future[Any]] = {main, stop, mqtt_task, self._ticker_error}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in (main, mqtt_task, self._ticker_error):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.notifier.stopping()
            log.info("agent.stopping")
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            self._ticker.stop()
            with self._lock:
                self._publish_decided()
            await self.source.close()
            self.source.shutdown()
            self.fast.close()
            await self.publisher.stop(STOP_TIMEOUT)
            mqtt_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mqtt_task
            self.outbox.close()  # what the broker did not acknowledge stays in a spool
            stop.cancel()
            ready.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("agent.stopped", samples=self.samples)
        return 0

    async def _main(self) -> None:
        await self._connect_libvirt()
        self._ticker.start()
        while not self._stop.is_set():
            if self._bulk_due:
                self._bulk_due = False
                await self._sample_all()
                continue
            now = time.monotonic()
            due = self.resamples.take(now, stalled=self.source.stalled)
            if due:
                with self._lock:
                    fast = self._resample_fast(due & self._bases.keys())
                if due - fast:
                    await self._sample_some(due - fast)
                continue
            if not self._events.empty():
                await self._handle(self._events.get_nowait())
                continue
            self._wake.clear()
            resample_at = self.resamples.next_at()
            if resample_at is None:
                await self._wake.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, resample_at - now)):
                    await self._wake.wait()

    # -- the ticker thread -------------------------------------------------------------

    def _pace(self) -> Pace:
        """For the ticker: whether /proc serves some domain, and the bulk call's
        period now. It follows what /proc serves at each tick: a domain started or
        resumed since the last call (not on /proc yet) brings the call back from
        every PROC_LIBVIRT_EVERY s to every libvirt_interval at once."""
        with self._lock:
            self._paced = self._pace_now()
            return self._paced

    def _pace_now(self) -> Pace:
        """Under the lock."""
        sampling = self.cfg.sampling
        every = sampling.libvirt_longest if self._all_fast() else sampling.libvirt_every
        return Pace(bool(self._bases), every)

    def _repace(self) -> None:
        """After the loop changed what /proc serves: the ticker, which may be asleep
        until a bulk call 5 s away, looks at its pace again if that changed."""
        with self._lock:
            changed = self._pace_now() != self._paced
        if changed:
            self._ticker.nudge()

    def _tick(self) -> None:
        """A /proc tick, on the ticker thread. What it decides goes to the loop,
        which publishes it: the loop is woken only when something was decided."""
        with self._lock:
            if not self._bases:
                return
            records = self._read_fast(set(self._bases))
            if not records:
                return
            changes, suspects = self._decide(records, complete=False, whole=True)
            if not changes and not suspects:
                return
            self._decided.append((changes, suspects))
        self._loop.call_soon_threadsafe(self._take_decided)

    def _bulk_is_due(self) -> None:
        """On the ticker thread: the bulk call takes this tick's place."""
        self._loop.call_soon_threadsafe(self._request_bulk)

    def _request_bulk(self) -> None:
        self._bulk_due = True
        self._wake.set()

    def _ticker_failed(self, err: BaseException) -> None:
        """On the ticker thread, which is ending: the agent stops with ``err``."""
        self._loop.call_soon_threadsafe(self._ticker_error.set_exception, err)

    def _on_source_event(self, event: SourceEvent) -> None:
        self._events.put_nowait(event)
        self._wake.set()

    def _take_decided(self) -> None:
        """On the loop: publish what the ticker decided (under the lock, so nothing
        decided later is published before it) and schedule its re-samples."""
        with self._lock:
            self._publish_decided()
        self._wake.set()

    def _publish_decided(self) -> None:
        """Publish the ticker's decisions, oldest first. Under ``self._lock``."""
        while self._decided:
            changes, suspects = self._decided.popleft()
            self._publish(changes)
            if suspects:
                self.resamples.suspects(suspects, time.monotonic())

    # -- libvirt ---------------------------------------------------------------------

    async def _connect_libvirt(self) -> None:
        delay = self.cfg.libvirt.reconnect_min
        while not self._stop.is_set():
            try:
                await self.source.open()
            except SourceError as err:
                log.warning(
                    "libvirt.connect_failed",
                    uri=self.cfg.libvirt.uri,
                    reason=str(err),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.libvirt.reconnect_max)
            else:
                return

    async def _reconnect(self, reason: str) -> None:
        log.warning("libvirt.disconnected", uri=self.cfg.libvirt.uri, reason=reason)
        with self._lock:
            # The ticker pauses too: the decisions after the outage are all resyncs.
            self._bases.clear()
        self._repace()
        await self.source.close()
        await self._connect_libvirt()
        # Counters from before the outage are not a baseline for ratios: take a fresh
        # one, and mark what the next decisions find as observed after a resync.
        with self._lock:
            self.host = rebaseline(self.host)
        log.info("libvirt.reconnected", uri=self.cfg.libvirt.uri)

    async def _handle(self, event: SourceEvent) -> None:
        if isinstance(event, ConnectionLost):
            if event.generation == self.source.generation:
                await self._reconnect(event.reason)
            return
        self._on_lifecycle(event)

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        with self._lock:
            if not self._fits(event.uuid, event.name):
                return
        log.info(
            "domain.lifecycle",
            domain=event.name,
            uuid=event.uuid,
            lifecycle=event.event,
            detail=event.detail,
        )
        with self._lock:
            self._publish_decided()
            out = self.renderer.lifecycle(event)
            self.publisher.publish(out.message, out.told)
            # Its state changed: /proc cannot tell a paused vCPU from a halted one,
            # so the domain waits for libvirt's look before the fast path serves it.
            self._bases.pop(event.uuid, None)
        self._repace()
        self.resamples.lifecycle(event.uuid, time.monotonic())

    # -- samples ---------------------------------------------------------------------

    async def _ask(self, call: Awaitable[T], **context: object) -> T | None:
        """libvirt's answer to a sample call, or None once the fault is logged.

        The bulk call and a re-sample meet the same faults the same way: a frozen
        QEMU's monitor blocks whichever call reaches it first.
        """
        try:
            answer = await call
        except SourceBusyError as err:
            self._busy.hit(reason=str(err), **context)
            return None
        except SourceTimeoutError as err:
            # Most likely one domain's QEMU monitor hangs: the next NOWAIT sample
            # (on the spare worker thread) skips its job and sees everyone else.
            self._stalled.hit(reason=str(err), **context)
            return None
        except SourceError as err:
            self._failed.hit(reason=str(err), **context)
            if not await self.source.alive():
                await self._reconnect(str(err))
            return None
        for fault in (self._busy, self._stalled, self._failed):
            fault.clear()
        return answer

    async def _sample_all(self) -> None:
        records = await self._ask(self.source.sample())
        if records is None:
            return
        with self._lock:
            self.fast.retain(r.uuid for r in records)
            for uuid in self._proc_said.keys() - {r.uuid for r in records}:
                del self._proc_said[uuid]
            for uuid in [u for u in self._bases if u not in self.fast]:
                del self._bases[uuid]
            self._apply(self._from_proc(records), complete=True)
        self._repace()
        self.samples += 1
        self._after_sample()

    async def _sample_some(self, uuids: set[str]) -> None:
        answer = await self._ask(self.source.sample_domains(uuids), domains=len(uuids))
        if answer is None:
            return
        records, gone = answer
        with self._lock:
            self._apply(self._from_proc(records), complete=False)
            for uuid in gone:
                self.host, changes = retire(self.host, uuid)
                self._publish(changes)
        self._repace()

    def _from_proc(self, records: list[DomainRecord]) -> list[DomainRecord]:
        """libvirt's records, with the counters of every domain /proc serves read
        from /proc right now: one counter stream per domain, whichever the call."""
        out = []
        for record in records:
            fresh = None
            if self.fast.attach(record):
                fresh = self.fast.read(record, time.monotonic(), time.time())
            if fresh is None:
                self._bases.pop(record.uuid, None)
                out.append(record)
            else:
                self._bases[record.uuid] = record
                out.append(fresh)
            self._log_proc(record, fresh is not None)
        return out

    def _log_proc(self, record: DomainRecord, served: bool) -> None:
        """Say once per change which source a domain's counters come from, and why."""
        why = "" if served else self.fast.refused.get(record.uuid, "not running")
        if self._proc_said.get(record.uuid) == why:
            return
        self._proc_said[record.uuid] = why
        if served:
            log.info("schedstat.serving", domain=record.name, uuid=record.uuid)
        elif record.state.vcpus_active:
            log.info("schedstat.unavailable", domain=record.name, uuid=record.uuid, reason=why)

    def _all_fast(self) -> bool:
        """Whether /proc serves every running domain of the last libvirt sample."""
        return all(
            not d.state.vcpus_active or u in self._bases for u, d in self.host.domains.items()
        )

    def _read_fast(self, uuids: set[str]) -> list[DomainRecord]:
        """These domains' records with counters read from /proc now; a domain whose
        thread is gone leaves the fast path (libvirt looks at it next). Under the lock."""
        t_mono, t_wall = time.monotonic(), time.time()
        records = []
        for uuid in uuids:
            base = self._bases.get(uuid)
            record = None if base is None else self.fast.read(base, t_mono, t_wall)
            if record is None:
                self._bases.pop(uuid, None)
            else:
                records.append(record)
        return records

    def _resample_fast(self, uuids: set[str]) -> set[str]:
        """Re-sample these domains from /proc (between ticks: not a whole sample) and
        publish what that decides; return the ones it served. Under the lock."""
        if not uuids:
            return set()
        records = self._read_fast(uuids)
        if records:
            self._apply(records, complete=False, whole=False)
        return {r.uuid for r in records}

    def _decide(
        self, records: list[DomainRecord], *, complete: bool, whole: bool | None
    ) -> tuple[list[Change], frozenset[str]]:
        """Fold records into the host state: the changes, and the suspect domains.
        Under the lock."""
        records = [r for r in records if self._fits(r.uuid, r.name)]
        self.host, changes = advance(self.host, records, self.th, complete=complete, whole=whole)
        return changes, self.host.suspects

    def _apply(
        self, records: list[DomainRecord], *, complete: bool, whole: bool | None = None
    ) -> None:
        """Decide and publish, after what the ticker decided before. On the loop,
        under the lock."""
        self._publish_decided()
        changes, suspects = self._decide(records, complete=complete, whole=whole)
        self._publish(changes)
        if suspects:
            self.resamples.suspects(suspects, time.monotonic())

    def _fits(self, uuid: str, name: str) -> bool:
        """Whether a domain's name fits in a topic; one that does not is skipped,
        logged once, and never stops the agent (docs/topics.md, "Names")."""
        if self.topics.fits(name):
            self._skipped.discard(uuid)
            return True
        if uuid not in self._skipped:
            self._skipped.add(uuid)
            log.error(
                "domain.skipped",
                uuid=uuid,
                name=name[:80],
                name_bytes=len(name.encode()),
                reason="its name does not fit in an MQTT topic",
            )
        return False

    def _publish(self, changes: list[Change]) -> None:
        for change in changes:
            for out in self.renderer.change(change):
                if out.transition is not None:
                    t = out.transition
                    log.info(
                        "vcpu.transition",
                        domain=t.domain,
                        vcpu=t.vcpu,
                        before=t.from_state,
                        after=t.to_state,
                        source=t.source,
                        ratio=t.ratio,
                        seq=t.seq,
                        resync=t.resync,
                    )
                self.publisher.publish(out.message, out.told)

    def _after_sample(self) -> None:
        self.notifier.watchdog()
        self._maybe_ready()

    async def _ready_when_connected(self) -> None:
        """READY also when the broker answers (or stops being waited for) after the
        first sample: with a long interval, the next sample could be a minute away."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_MQTT_WAIT):
                await self.publisher.connected.wait()
        self._maybe_ready(waited_out=True)

    def _maybe_ready(self, *, waited_out: bool = False) -> None:
        """READY=1 once a sample is done and the broker connected (or was waited for
        ``READY_MQTT_WAIT`` s: the agent works, spooling, while the broker is down)."""
        if self._ready or self.samples == 0:
            return
        waited = waited_out or time.time() - self.started_at >= READY_MQTT_WAIT
        if self.publisher.connected.is_set() or waited:
            self._ready = True
            self.notifier.ready(f"watching {len(self.host.domains)} domains")
            log.info(
                "agent.ready",
                domains=len(self.host.domains),
                vcpus=sum(len(d.vcpus) for d in self.host.domains.values()),
                mqtt_connected=self.publisher.connected.is_set(),
            )


def _open_outbox(cfg: Config) -> Outbox:
    """The durable spool of ``[spool]``, or memory when ``path`` is empty.

    A spool that cannot be used raises ``SpoolError``: refusing to start is better
    than silently losing the guarantees a subscriber relies on (docs/reliability.md).
    """
    if not cfg.spool.path:
        log.warning(
            "spool.memory_only",
            max_events=cfg.spool.max_events,
            note="events survive broker outages, not agent restarts",
        )
        return MemoryOutbox(cfg.spool.max_events)
    spool = SqliteSpool(cfg.spool.path, cfg.spool.max_events, synchronous=cfg.spool.synchronous)
    log.info(
        "spool.opened",
        path=cfg.spool.path,
        epoch=spool.epoch,
        backlog=len(spool),
        dropped=spool.dropped,
    )
    return spool
