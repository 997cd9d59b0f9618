"""libvirt at the edge: the event thread, the connection, and bulk samples.

Concurrency (docs/design.md has the whole picture):

- libvirt's own event loop (``virEventRegisterDefaultImpl``) runs in one daemon
  thread, ``libvirt-events``. Its callbacks only translate codes into a frozen
  ``LifecycleEvent`` and hand it to the asyncio loop with ``call_soon_threadsafe``.
  We do not use ``libvirtaio``: its handle updates call ``loop.add_reader`` from
  whatever thread is inside libvirt, and our blocking calls run in a worker
  thread, which would make that cross-thread.
- Every blocking libvirt call runs in ONE worker thread (``libvirt-call``) under a
  timeout. A call still running when the next is due is not queued behind it: the
  caller gets ``SourceBusyError`` and skips that sample, so a hung libvirtd cannot pile
  up work. Bulk samples pass NOWAIT so a domain stuck in a job cannot stall others.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from agent import logs
from agent.lifecycle import REBOOTED, detail_name, event_name
from agent.model import DomainRecord, LifecycleEvent
from agent.records import domain_record, vcpuinfo_record

log = logs.get("agent.source")
T = TypeVar("T")

STATS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_VCPU
STATS_FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


class SourceError(Exception):
    """A libvirt call failed; ``str()`` says which call and why."""


class SourceBusyError(SourceError):
    """The previous libvirt call has not returned yet: skip, do not queue."""


class SourceTimeoutError(SourceError):
    """A libvirt call took longer than ``call_timeout``."""


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """libvirt closed the connection (daemon restart, keepalive timeout, EOF)."""

    reason: str
    generation: int  # which connection: a late report about an old one is ignored


SourceEvent = LifecycleEvent | ConnectionLost

_CLOSE_REASONS = {0: "error", 1: "eof", 2: "keepalive", 3: "client"}
_event_thread: threading.Thread | None = None
_event_lock = threading.Lock()


def _run_events() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover - libvirt broke
            log.error("libvirt.event_loop_failed")
            time.sleep(1)


def start_event_thread() -> None:
    """Register libvirt's default event loop and run it; once per process.

    Must happen before the first connection is opened (docs/platform.md).
    """
    global _event_thread  # noqa: PLW0603 - libvirt's event impl is process-global too
    with _event_lock:
        if _event_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error on stderr unless a handler takes them; errors
        # reach us as exceptions anyway, so debug-log the raw lines.
        libvirt.registerErrorHandler(_libvirt_error_line, None)
        _event_thread = threading.Thread(target=_run_events, name="libvirt-events", daemon=True)
        _event_thread.start()


def _libvirt_error_line(_ctx: object, err: tuple[Any, ...]) -> None:
    log.debug("libvirt.error", code=err[0], message=err[2] if len(err) > 2 else None)


class LibvirtSource:
    """One libvirt connection: lifecycle events in, domain records out."""

    def __init__(
        self,
        *,
        uri: str,
        read_only: bool,
        call_timeout: float,
        keepalive: tuple[int, int],
        on_event: Callable[[SourceEvent], None],
    ) -> None:
        self.uri = uri
        self.read_only = read_only
        self.call_timeout = call_timeout
        self.keepalive = keepalive
        self._on_event = on_event
        # Two threads: one for the current call, one that a stalled call may keep.
        self._worker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="libvirt-call")
        self._busy: Future[Any] | None = None
        self._stalled: Future[Any] | None = None
        self._stalled_what = ""
        self.generation = 0  # +1 per connection: ConnectionLost of an old one is stale
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._vcpu_group: bool | None = None  # learnt: does the driver fill VCPU stats?

    # -- calls in the worker ------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the worker under ``call_timeout``.

        A call that times out keeps its thread (Python cannot cancel it) and is
        parked as *stalled*; the next call gets the second thread. That matters:
        the first bulk call after a QEMU freezes blocks inside libvirt on the
        domain's monitor, while a second NOWAIT call skips that domain's busy job
        and returns (docs/platform.md, "The stats the agent reads"). With both
        threads taken, calls are refused (``SourceBusyError``) rather than queued,
        until one returns.
        """
        if self._stalled is not None and self._stalled.done():
            log.info("libvirt.call_recovered", call=self._stalled_what)
            self._stalled = None
        if self._busy is not None and not self._busy.done():
            raise SourceBusyError(f"{what}: the previous libvirt call is still running")
        future = self._worker.submit(fn)
        self._busy = future
        try:
            async with asyncio.timeout(self.call_timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError as err:
            if self._stalled is None:
                self._stalled, self._stalled_what, self._busy = future, what, None
            raise SourceTimeoutError(
                f"{what}: no answer from libvirt in {self.call_timeout} s"
            ) from err
        except libvirt.libvirtError as err:
            raise SourceError(f"{what}: {err.get_error_message() or err}") from err

    @property
    def stalled(self) -> bool:
        """A timed-out call still holds a worker thread (see ``_call``)."""
        return self._stalled is not None and not self._stalled.done()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        """Connect, register every callback, set keepalive. Safe to call again."""
        loop = asyncio.get_running_loop()
        start_event_thread()
        generation = self.generation + 1
        self._conn = await self._call("open " + self.uri, lambda: self._open(loop, generation))
        self.generation = generation
        log.info("libvirt.connected", uri=self.uri, read_only=self.read_only)

    def _open(self, loop: asyncio.AbstractEventLoop, generation: int) -> libvirt.virConnect:
        conn = libvirt.openReadOnly(self.uri) if self.read_only else libvirt.open(self.uri)
        on_event = self._on_event

        def emit(event: SourceEvent) -> None:
            # Runs on libvirt's event thread: hand over, never raise (libvirt would
            # print and swallow it). An event dispatched after the service stopped
            # finds the loop closed: nobody is left to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_event, event)

        def lifecycle(
            _c: object, dom: libvirt.virDomain, event: int, detail: int, _o: object
        ) -> None:
            ev = LifecycleEvent(
                uuid=dom.UUIDString(),
                name=dom.name(),
                event=event_name(event),
                detail=detail_name(event, detail),
                t_wall=time.time(),
            )
            emit(ev)

        def reboot(_c: object, dom: libvirt.virDomain, _o: object) -> None:
            ev = LifecycleEvent(
                uuid=dom.UUIDString(),
                name=dom.name(),
                event=REBOOTED,
                detail="",
                t_wall=time.time(),
            )
            emit(ev)

        def closed(_c: object, reason: int, _o: object) -> None:
            reason_text = _CLOSE_REASONS.get(reason, f"reason-{reason}")
            emit(ConnectionLost(reason_text, generation))

        try:
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
                ),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot, None),
            ]
            conn.registerCloseCallback(closed, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        try:
            conn.setKeepAlive(*self.keepalive)
        except libvirt.libvirtError as err:
            # In-process drivers (test:///, qemu:///embed) have no keepalive; the
            # close callback still covers a remote daemon that goes away.
            log.debug("libvirt.keepalive_unsupported", uri=self.uri, reason=str(err))
        self._vcpu_group = None
        return conn

    async def close(self) -> None:
        """Deregister every callback and close; tolerate a connection already dead."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        ids, self._callback_ids = self._callback_ids, []

        def _close() -> None:
            for cid in ids:
                # The connection may already be gone: nothing left to deregister then.
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cid)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

        try:
            await self._call("close", _close)
        except SourceError as err:
            log.warning("libvirt.close_failed", reason=str(err))

    async def alive(self) -> bool:
        """Whether the connection still works (after a failed call: error or death?)."""
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(await self._call("isAlive", conn.isAlive))
        except SourceError:
            return False

    def shutdown(self) -> None:
        """Stop the worker thread without waiting for a hung call."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- samples ------------------------------------------------------------------

    async def sample(self) -> list[DomainRecord]:
        """One bulk sample of every domain."""
        conn = self._require()

        def _sample() -> list[DomainRecord]:
            started = time.monotonic()
            return self._records(conn, conn.getAllDomainStats(STATS, STATS_FLAGS), started)

        return await self._call("getAllDomainStats", _sample)

    async def sample_domains(self, uuids: Iterable[str]) -> tuple[list[DomainRecord], set[str]]:
        """Re-sample some domains; also return the UUIDs that no longer exist."""
        conn = self._require()
        wanted = sorted(set(uuids))

        def _sample() -> tuple[list[DomainRecord], set[str]]:
            doms, gone = [], set()
            for uuid in wanted:
                try:
                    doms.append(conn.lookupByUUIDString(uuid))
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    gone.add(uuid)
            if not doms:
                return [], gone
            started = time.monotonic()
            stats = conn.domainListGetStats(doms, STATS, STATS_FLAGS)
            found = self._records(conn, stats, started)
            gone |= set(wanted) - gone - {r.uuid for r in found}
            return found, gone

        return await self._call("domainListGetStats", _sample)

    def _require(self) -> libvirt.virConnect:
        if self._conn is None:
            raise SourceError("not connected to libvirt")
        return self._conn

    def _records(
        self,
        conn: libvirt.virConnect,
        stats: list[tuple[libvirt.virDomain, dict[str, Any]]],
        started: float,
    ) -> list[DomainRecord]:
        t_mono, t_wall = time.monotonic(), time.time()
        took = t_mono - started
        records = []
        for dom, values in stats:
            record = domain_record(
                name=dom.name(),
                uuid=dom.UUIDString(),
                stats=values,
                t_mono=t_mono,
                t_wall=t_wall,
                took=took,
            )
            if record.state.vcpus_active and record.vcpu_current is not None:
                self._vcpu_group = True
            elif record.state.vcpus_active and not self._vcpu_group:
                record = self._vcpuinfo(dom, record) or record
            records.append(record)
        return records

    @staticmethod
    def _vcpuinfo(dom: libvirt.virDomain, record: DomainRecord) -> DomainRecord | None:
        """Fallback for drivers whose bulk stats have no VCPU group (test, libxl)."""
        try:
            info, _maps = dom.vcpus()
            maximum = dom.maxVcpus()
        except libvirt.libvirtError as err:
            log.debug("libvirt.vcpuinfo_failed", domain=record.name, reason=str(err))
            return None
        return vcpuinfo_record(
            name=record.name,
            uuid=record.uuid,
            state=record.state,
            reason=record.reason,
            vcpu_info=info,
            maximum=maximum,
            t_mono=record.t_mono,
            t_wall=record.t_wall,
            took=record.took,
        )
