"""The ticker thread: calls back on its clock, wakes when nudged, hands errors on."""

from __future__ import annotations

import threading
from collections.abc import Callable

from agent.ticker import Pace, Ticker

WAIT = 10.0  # generous: these wait on events, and a hang is the failure


class Calls:
    """What a Ticker called, each kind with an Event set on its n-th call."""

    def __init__(self) -> None:
        self.fast = 0
        self.bulk = 0
        self.errors: list[BaseException] = []
        self.changed = threading.Condition()

    def count(self, kind: str) -> Callable[[], None]:
        def call() -> None:
            with self.changed:
                setattr(self, kind, getattr(self, kind) + 1)
                self.changed.notify_all()

        return call

    def error(self, err: BaseException) -> None:
        with self.changed:
            self.errors.append(err)
            self.changed.notify_all()

    def wait(self, condition: Callable[[], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, WAIT)


def ticker(calls: Calls, pace: Callable[[], Pace], *, interval: float = 0.02) -> Ticker:
    return Ticker(
        interval=interval,
        pace=pace,
        on_fast=calls.count("fast"),
        on_bulk=calls.count("bulk"),
        on_error=calls.error,
    )


def test_ticks_read_proc_and_the_bulk_call_takes_its_turns() -> None:
    calls = Calls()
    t = ticker(calls, lambda: Pace(fast=True, every=0.1))
    t.start()
    try:
        assert calls.wait(lambda: calls.bulk >= 3 and calls.fast >= 6)
    finally:
        t.stop()
    assert calls.errors == []


def test_with_nothing_on_proc_only_the_bulk_call_is_due() -> None:
    calls = Calls()
    t = ticker(calls, lambda: Pace(fast=False, every=0.05))
    t.start()
    try:
        assert calls.wait(lambda: calls.bulk >= 3)
    finally:
        t.stop()
    assert calls.fast == 0


def test_a_nudge_makes_a_sleeping_ticker_look_at_its_pace_again() -> None:
    calls = Calls()
    pace = [Pace(fast=False, every=3600.0)]  # asleep for an hour after the first call
    t = ticker(calls, lambda: pace[0])
    t.start()
    try:
        assert calls.wait(lambda: calls.bulk == 1)
        pace[0] = Pace(fast=True, every=3600.0)  # a domain came onto /proc
        t.nudge()
        assert calls.wait(lambda: calls.fast >= 1)
    finally:
        t.stop()


def test_stop_wakes_a_sleeping_ticker_and_ends_its_thread() -> None:
    calls = Calls()
    t = ticker(calls, lambda: Pace(fast=False, every=3600.0))
    t.start()
    assert calls.wait(lambda: calls.bulk == 1)
    stopper = threading.Thread(target=t.stop)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert not any(th.name == "ticker" for th in threading.enumerate())
    t.stop()  # twice is harmless
    t.nudge()  # and so is a nudge after it


def test_an_error_in_a_tick_ends_the_thread_and_reaches_on_error() -> None:
    calls = Calls()
    boom = RuntimeError("boom")

    def fail() -> None:
        raise boom

    t = Ticker(
        interval=0.01,
        pace=lambda: Pace(fast=True, every=3600.0),
        on_fast=fail,
        on_bulk=calls.count("bulk"),
        on_error=calls.error,
    )
    t.start()
    try:
        assert calls.wait(lambda: calls.errors == [boom])
    finally:
        t.stop()
