"""The libvirt worker: a stalled call is parked, never queued behind."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.source import LibvirtSource, SourceBusyError, SourceTimeoutError


def source(timeout: float) -> LibvirtSource:
    return LibvirtSource(
        uri="test:///default",
        read_only=True,
        call_timeout=timeout,
        keepalive=(5, 3),
        on_event=lambda _e: None,
    )


def test_a_stalled_call_leaves_the_spare_thread_for_the_next_one() -> None:
    release = threading.Event()
    src = source(0.2)

    async def scenario() -> list[str]:
        seen = []
        with pytest.raises(SourceTimeoutError):
            await src._call("hangs", lambda: release.wait(10))
        # The stalled call still holds its thread; the next call runs anyway.
        seen.append(await src._call("next", lambda: "answered"))
        # A second stall takes the spare thread too: now calls are refused, not queued.
        with pytest.raises(SourceTimeoutError):
            await src._call("hangs too", lambda: release.wait(10))
        with pytest.raises(SourceBusyError):
            await src._call("refused", lambda: "never runs")
        release.set()
        await asyncio.sleep(0.1)
        seen.append(await src._call("after", lambda: "recovered"))
        return seen

    try:
        assert asyncio.run(scenario()) == ["answered", "recovered"]
    finally:
        release.set()
        src.shutdown()
