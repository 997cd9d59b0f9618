"""The regular samples' clock, on a thread of its own with blocking waits.

A tick (every ``sampling.interval``, 0.25 s by default) reads a few /proc files
and folds them into the host state: work that never blocks and, on a quiet host,
decides nothing. On the asyncio loop every wake-up runs the loop's timer heap,
selector and task machinery too, which measured about as much as the tick's
reads (bench/tick.py; docs/benchmarks.md, "Where the agent's own CPU per sample goes").
So the clock runs here: a plain thread that sleeps in ``poll(2)``, runs
``on_fast`` for a /proc tick, and calls ``on_bulk`` when the libvirt bulk call
takes a tick's place (the caller hands that one to its loop). The loop wakes only
when a tick decided something, for the bulk call, and for real I/O.

``pace()`` is asked before every wait: whether /proc serves some domain, and the
bulk call's period now (``agent.schedule.Ticks`` decides from both). ``nudge``
makes the thread ask again at once (a domain came onto /proc while it slept
until the next bulk call); ``stop`` ends it. An exception in a callback ends the
thread and is handed to ``on_error``: the agent stops rather than sample no more.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from agent.schedule import Due, Ticks


class Pace(NamedTuple):
    fast: bool  # /proc serves some domain: ticks have something to read
    every: float  # seconds between bulk calls now


class Ticker:
    def __init__(
        self,
        *,
        interval: float,
        pace: Callable[[], Pace],
        on_fast: Callable[[], None],
        on_bulk: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._interval = interval
        self._pace = pace
        self._on_fast = on_fast
        self._on_bulk = on_bulk
        self._on_error = on_error
        self._stopping = False
        self._thread: threading.Thread | None = None
        # A self-pipe: poll(2) on its read end is the thread's timed sleep, and a
        # byte written to it wakes the thread early (measured as cheap as a timed
        # lock or Event wait, and it never blocks the writer: O_NONBLOCK).
        self._rfd = self._wfd = -1
        self._poll = select.poll()

    def start(self) -> None:
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll.register(self._rfd, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """Make the thread look at ``pace()`` again now (from any thread)."""
        if self._wfd < 0:
            return
        with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
            os.write(self._wfd, b"\0")

    def stop(self) -> None:
        """Stop the thread and wait for it (a tick in progress finishes)."""
        if self._thread is None:
            return
        self._stopping = True
        self.nudge()
        self._thread.join()
        self._thread = None
        self._poll.unregister(self._rfd)
        for fd in (self._rfd, self._wfd):
            os.close(fd)
        self._rfd = self._wfd = -1

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # handed to the agent, which stops
            self._on_error(err)

    def _loop(self) -> None:
        ticks = Ticks(self._interval, start=time.monotonic())
        pace: Pace | None = None
        while not self._stopping:
            # The pace is asked again after a sample or a nudge, the only times it
            # can change; a sleep that ran its course keeps it.
            if pace is None:
                pace = self._pace()
            due = ticks.due(time.monotonic(), fast=pace.fast, every=pace.every)
            if due is Due.FAST:
                self._on_fast()
                pace = None
            elif due is Due.BULK:
                self._on_bulk()
                pace = None
            elif self._nudged_before(due):
                pace = None

    def _nudged_before(self, at: float) -> bool:
        """Sleep until ``at`` (monotonic); True if a nudge woke the thread first."""
        wait_ms = max(0, int((at - time.monotonic()) * 1000) + 1)
        if not self._poll.poll(wait_ms):
            return False
        with contextlib.suppress(BlockingIOError):
            os.read(self._rfd, 64)
        return True
