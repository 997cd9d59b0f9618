from __future__ import annotations

from agent.schedule import Resamples


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
