"""The agent: wires libvirt, the pure core and MQTT together on one asyncio loop.

One task runs the sampling loop below; the publisher runs its own connection
task. libvirt callbacks arrive as ``SourceEvent``s on ``self._events``.

    tick (every sampling.interval)  -> bulk sample  -> advance -> publish
    lifecycle event                 -> publish it, re-sample that domain now and
                                       again after sampling.event_followup
    connection lost                 -> reconnect with backoff, resync from a full
                                       sample (first decisions marked resync)

The systemd watchdog is fed after each *completed* sample, never by a timer, so a
hung libvirt stops the pings and systemd restarts us.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import signal
import socket
import time
from collections.abc import Iterable

from agent import __version__, logs
from agent.config import Config
from agent.model import DomainRecord, LifecycleEvent
from agent.mqtt import Publisher
from agent.outbox import MemoryOutbox, Outbox
from agent.render import Renderer, Sequencer
from agent.sdnotify import Notifier
from agent.source import (
    ConnectionLost,
    LibvirtSource,
    SourceBusyError,
    SourceError,
    SourceEvent,
    SourceTimeoutError,
)
from agent.spool import SpoolError, SqliteSpool
from agent.topics import Topics
from agent.transitions import Change, HostState, VcpuTransition, advance, rebaseline, retire

log = logs.get("agent.service")

STOP_TIMEOUT = 3.0  # seconds to flush the broker on SIGTERM (the unit allows 5 s)
READY_MQTT_WAIT = 10.0  # how long READY waits for the broker before going ahead


class Service:
    def __init__(
        self, cfg: Config, *, notifier: Notifier | None = None, outbox: Outbox | None = None
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.th = cfg.sampling.thresholds()
        self.topics = Topics(prefix=cfg.mqtt.topic_prefix, host=cfg.host_id)
        outbox = outbox if outbox is not None else _open_outbox(cfg)
        # With a durable spool, seqs continue where the last run left them.
        self.spool = outbox if isinstance(outbox, SqliteSpool) else None
        seqs = (
            Sequencer(counters=self.spool.load_seqs(), on_next=self.spool.save_seq)
            if self.spool is not None
            else Sequencer()
        )
        self.renderer = Renderer(self.topics, qos=cfg.mqtt.qos, seqs=seqs)
        self.started_at = time.time()
        self.publisher = Publisher(
            cfg=cfg.mqtt,
            topics=self.topics,
            outbox=outbox,
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
            on_event=self._events.put_nowait,
        )
        self._stop = asyncio.Event()
        self._resamples: list[tuple[float, str]] = []  # heap of (monotonic due, UUID)
        self._confirming: set[str] = set()  # UUIDs with a confirmation re-sample queued
        self._resync_samples = 0  # full samples still to mark as resync
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
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        log.info(
            "agent.starting",
            version=__version__,
            host=self.topics.host,
            uri=self.cfg.libvirt.uri,
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
            interval=self.cfg.sampling.interval,
        )
        mqtt_task = asyncio.create_task(self.publisher.run(), name="mqtt")
        main = asyncio.create_task(self._main(), name="sampling")
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            await asyncio.wait({main, stop, mqtt_task}, return_when=asyncio.FIRST_COMPLETED)
            for task in (main, mqtt_task):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.notifier.stopping()
            log.info("agent.stopping")
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            await self.source.close()
            self.source.shutdown()
            await self.publisher.stop(STOP_TIMEOUT)
            mqtt_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mqtt_task
            if self.spool is not None:
                self.spool.close()  # what the broker did not acknowledge stays in it
            stop.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
            log.info("agent.stopped", samples=self.samples)
        return 0

    async def _main(self) -> None:
        await self._connect_libvirt()
        interval = self.cfg.sampling.interval
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                await self._sample_all()
                next_tick += interval
                if next_tick < time.monotonic():  # fell behind: do not burst to catch up
                    next_tick = time.monotonic() + interval
                continue
            due: set[str] = set()
            while self._resamples and self._resamples[0][0] <= now:
                due.add(heapq.heappop(self._resamples)[1])
            self._confirming -= due
            if due and self.source.stalled:
                # Only the spare worker thread is left: keep it for the bulk sample,
                # which covers these domains too (a per-domain call was seen to
                # block behind a frozen QEMU's monitor where the bulk call did not).
                log.debug("sample.deferred", domains=len(due))
            elif due:
                await self._sample_some(due)
                continue
            wake = min(next_tick, self._resamples[0][0]) if self._resamples else next_tick
            try:
                async with asyncio.timeout(max(0.0, wake - now)):
                    event = await self._events.get()
            except TimeoutError:
                continue
            await self._handle(event)

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
        await self.source.close()
        await self._connect_libvirt()
        # Counters from before the outage are not a baseline for ratios: take a fresh
        # one, and mark what the next decisions find as observed after a resync.
        self.host = rebaseline(self.host)
        self._resync_samples = 2
        log.info("libvirt.reconnected", uri=self.cfg.libvirt.uri)

    async def _handle(self, event: SourceEvent) -> None:
        if isinstance(event, ConnectionLost):
            if event.generation == self.source.generation:
                await self._reconnect(event.reason)
            return
        self._on_lifecycle(event)

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        log.info(
            "domain.lifecycle",
            domain=event.name,
            uuid=event.uuid,
            lifecycle=event.event,
            detail=event.detail,
        )
        self.publisher.publish_event(self.renderer.lifecycle(event))
        now = time.monotonic()
        heapq.heappush(self._resamples, (now, event.uuid))
        # A second look once counters have moved: the first re-sample after a start
        # or resume can only take a baseline.
        followup = self.cfg.sampling.event_followup
        if followup > 0:
            heapq.heappush(self._resamples, (now + followup, event.uuid))

    # -- samples ---------------------------------------------------------------------

    async def _sample_all(self) -> None:
        try:
            records = await self.source.sample()
        except SourceBusyError as err:
            log.warning("sample.skipped", reason=str(err))
            return
        except SourceTimeoutError as err:
            # Most likely one domain's QEMU monitor hangs: the next NOWAIT sample
            # (on the spare worker thread) skips its job and sees everyone else.
            log.warning("sample.stalled", reason=str(err))
            return
        except SourceError as err:
            log.warning("sample.failed", reason=str(err))
            if not await self.source.alive():
                await self._reconnect(str(err))
            return
        resync = self._resync_samples > 0
        self._resync_samples = max(0, self._resync_samples - 1)
        self._apply(records, complete=True, resync=resync)
        self.samples += 1
        self._after_sample()

    async def _sample_some(self, uuids: Iterable[str]) -> None:
        try:
            records, gone = await self.source.sample_domains(uuids)
        except SourceError as err:
            log.warning("sample.failed", reason=str(err), domains=sorted(uuids))
            return
        self._apply(records, complete=False, resync=False)
        for uuid in gone:
            self.host, changes = retire(self.host, uuid)
            self._publish(changes)

    def _apply(self, records: list[DomainRecord], *, complete: bool, resync: bool) -> None:
        self.host, changes = advance(self.host, records, self.th, complete=complete, resync=resync)
        self._publish(changes)
        # A vCPU whose share moved toward the other state without deciding it: look
        # again soon instead of a whole interval later (docs/design.md, "Latency").
        confirm = self.cfg.sampling.confirm_after
        if confirm > 0 and self.host.suspects:
            due = time.monotonic() + confirm
            for uuid in self.host.suspects - self._confirming:
                self._confirming.add(uuid)
                heapq.heappush(self._resamples, (due, uuid))

    def _publish(self, changes: list[Change]) -> None:
        for change in changes:
            if isinstance(change, VcpuTransition):
                log.info(
                    "vcpu.transition",
                    domain=change.domain,
                    vcpu=change.vcpu,
                    before=change.before.state.value,
                    after=change.after.state.value,
                    source=change.after.source.value,
                    ratio=change.after.ratio,
                    resync=change.resync,
                )
            route, message = self.renderer.change(change)
            if route == "event":
                self.publisher.publish_event(message)
            else:
                self.publisher.publish_state(message)

    def _after_sample(self) -> None:
        self.notifier.watchdog()
        if self._ready:
            return
        waited = time.time() - self.started_at
        if self.publisher.connected.is_set() or waited > READY_MQTT_WAIT:
            self._ready = True
            self.notifier.ready(f"watching {len(self.host.domains)} domains")
            log.info(
                "agent.ready",
                domains=len(self.host.domains),
                vcpus=sum(len(d.vcpus) for d in self.host.domains.values()),
                mqtt_connected=self.publisher.connected.is_set(),
            )


def _open_outbox(cfg: Config) -> Outbox:
    """The durable spool of ``[spool]``, or memory when it is off or unusable."""
    if not cfg.spool.path:
        return MemoryOutbox(cfg.spool.max_events)
    try:
        spool = SqliteSpool(cfg.spool.path, cfg.spool.max_events, synchronous=cfg.spool.synchronous)
    except SpoolError as err:
        # Running without durability beats not running: events still survive broker
        # outages in memory. Loud, because an agent restart would now lose them.
        log.error(  # noqa: TRY400 - the reason says it all; a traceback would not help
            "spool.unavailable", path=cfg.spool.path, reason=str(err), fallback="memory"
        )
        return MemoryOutbox(cfg.spool.max_events)
    log.info("spool.opened", path=cfg.spool.path, backlog=len(spool), dropped=spool.dropped)
    return spool
