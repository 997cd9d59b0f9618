from __future__ import annotations

from agent.schedule import Due, Resamples, Ticks


def test_a_lifecycle_event_is_looked_at_now_and_again_after_the_followup() -> None:
    r = Resamples(followup=0.25, confirm_after=0.1)
    r.lifecycle("a", now=10.0)
    assert r.take(10.0) == {"a"}
    assert r.next_at() == 10.25
    assert r.take(10.2) == set()
    assert r.take(10.25) == {"a"}
    assert r.next_at() is None


def test_no_followup_means_one_look() -> None:
    r = Resamples(followup=0.0, confirm_after=0.1)
    r.lifecycle("a", now=1.0)
    assert r.take(1.0) == {"a"}
    assert r.next_at() is None


def test_a_suspect_domain_is_confirmed_once_until_its_confirmation_ran() -> None:
    r = Resamples(followup=0.25, confirm_after=0.1)
    r.suspects({"a", "b"}, now=5.0)
    r.suspects({"a"}, now=5.05)  # still queued: not queued again
    assert r.take(5.1) == {"a", "b"}
    assert r.next_at() is None
    r.suspects({"a"}, now=5.2)  # ran: may be queued again
    assert r.take(5.3) == {"a"}


def test_confirmations_off_queue_nothing() -> None:
    r = Resamples(followup=0.25, confirm_after=0.0)
    r.suspects({"a"}, now=1.0)
    assert r.next_at() is None


def test_due_resamples_are_dropped_while_a_call_is_stalled() -> None:
    r = Resamples(followup=0.25, confirm_after=0.1)
    r.lifecycle("a", now=1.0)
    r.suspects({"b"}, now=1.0)
    assert r.take(1.2, stalled=True) == set()
    assert r.next_at() == 1.25  # the follow-up of "a" is still to come
    r.suspects({"b"}, now=1.2)  # its dropped confirmation no longer blocks a new one
    assert r.take(1.3) == {"a", "b"}


def test_ticks_come_every_interval_and_the_bulk_call_takes_one_every_period() -> None:
    t = Ticks(0.25, start=100.0)
    seen = []
    now = 100.0
    while now < 102.1:
        due = t.due(now, fast=True, every=1.0)
        if isinstance(due, float):
            now = due
        else:
            seen.append((round(now, 2), due))
    assert seen[:6] == [
        (100.0, Due.BULK),
        (100.25, Due.FAST),
        (100.5, Due.FAST),
        (100.75, Due.FAST),
        # Due at 101.0; half a tick of slack keeps it from slipping to 101.25.
        (101.0, Due.BULK),
        (101.25, Due.FAST),
    ]
    assert [at for at, due in seen if due is Due.BULK] == [100.0, 101.0, 102.0]


def test_with_nothing_on_proc_the_clock_waits_for_the_bulk_call() -> None:
    t = Ticks(0.25, start=100.0)
    assert t.due(100.0, fast=False, every=5.0) is Due.BULK
    assert t.due(100.1, fast=False, every=5.0) == 104.875  # not the tick at 100.25
    assert t.due(104.9, fast=False, every=5.0) is Due.BULK
    # A domain came onto /proc: the next tick is at once what the clock waits for.
    assert t.due(105.0, fast=True, every=5.0) == 105.15


def test_a_late_clock_does_not_burst_to_catch_up() -> None:
    t = Ticks(0.25, start=100.0)
    assert t.due(100.0, fast=True, every=60.0) is Due.BULK
    assert t.due(103.0, fast=True, every=60.0) is Due.FAST  # 11 ticks late: one tick
    assert t.due(103.01, fast=True, every=60.0) == 103.25
