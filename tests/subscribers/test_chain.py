"""The chain tracker against generated message sequences (no broker)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.chain import (
    ChainBroken,
    ChainTracker,
    EpochChanged,
    Event,
    Seed,
    SeqGap,
)
from agent.payloads import Payload, Transition
from tests.subscribers.messages import FakeAgent

U = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def feed_all(tracker: ChainTracker, bodies: Sequence[Payload]) -> list[Event]:
    out: list[Event] = []
    for body in bodies:
        out.extend(tracker.feed(body))
    return out


def transitions(events: list[Event]) -> list[Transition]:
    return [e for e in events if isinstance(e, Transition)]


def test_a_redelivered_transition_is_dropped_and_counted() -> None:
    agent = FakeAgent()
    _, t1 = agent.transition("web", U, 0)
    _, t2 = agent.transition("web", U, 0)
    tracker = ChainTracker()
    events = feed_all(tracker, [t1, t2, t2, t1])
    assert transitions(events) == [t1, t2]
    assert tracker.duplicates == 2


def test_a_skipped_seq_is_reported_before_the_transition_that_reveals_it() -> None:
    agent = FakeAgent()
    _, state = agent.vcpu_state("web", U, 0)
    sent = [agent.transition("web", U, 0)[1] for _ in range(5)]
    tracker = ChainTracker()
    events = feed_all(tracker, [state, sent[0], sent[3], sent[4]])
    gap = events[2]
    assert isinstance(gap, SeqGap)
    assert (gap.first, gap.last, gap.missing, gap.explained) == (2, 3, 2, False)
    assert events[3] == sent[3]
    assert tracker.missing == 2


def test_a_gap_after_the_hosts_overflow_marker_is_explained() -> None:
    agent = FakeAgent()
    _, state = agent.vcpu_state("web", U, 0)
    t1 = agent.transition("web", U, 0)[1]
    agent.transition("web", U, 0)  # dropped by the agent's spool
    _, marker = agent.gap(1)
    t3 = agent.transition("web", U, 0)[1]
    events = feed_all(ChainTracker(), [state, t1, marker, t3])
    gaps = [e for e in events if isinstance(e, SeqGap)]
    assert len(gaps) == 1
    assert gaps[0].explained


def test_a_transition_that_does_not_start_where_the_last_ended_breaks_the_chain() -> None:
    agent = FakeAgent()
    t1 = agent.transition("web", U, 0, "halted")[1]
    t2 = agent.transition("web", U, 0, "running")[1]
    lying = dataclasses.replace(t2, from_state="offline")
    events = feed_all(ChainTracker(), [t1, lying])
    broken = [e for e in events if isinstance(e, ChainBroken)]
    assert len(broken) == 1
    assert (broken[0].expected, broken[0].got, broken[0].seq) == ("halted", "offline", 2)
    assert events[-1] == lying  # still delivered: it did happen


def test_a_retained_state_seeds_the_chain_so_the_first_transition_is_checked() -> None:
    agent = FakeAgent()
    agent.transition("web", U, 0, "halted")
    _, state = agent.vcpu_state("web", U, 0)  # seq 1, halted
    t2 = agent.transition("web", U, 0, "running")[1]
    bad = dataclasses.replace(t2, from_state="blocked")
    assert not any(isinstance(e, ChainBroken) for e in feed_all(ChainTracker(), [state, t2]))
    assert any(isinstance(e, ChainBroken) for e in feed_all(ChainTracker(), [state, bad]))


def test_a_transition_arriving_after_the_state_it_entered_is_delivered_not_dropped() -> None:
    agent = FakeAgent()
    _, state0 = agent.vcpu_state("web", U, 0)
    tracker = ChainTracker()
    tracker.feed(state0)
    t1 = agent.transition("web", U, 0)[1]
    _, state1 = agent.vcpu_state("web", U, 0)
    events = feed_all(tracker, [state1, t1, t1])
    assert transitions(events) == [t1]
    assert tracker.duplicates == 1


def test_a_fresh_subscriber_whose_first_news_is_a_state_ahead_of_queued_transitions() -> None:
    agent = FakeAgent()
    sent = [agent.transition("web", U, 0)[1] for _ in range(3)]
    _, state3 = agent.vcpu_state("web", U, 0)
    tracker = ChainTracker()
    events = feed_all(tracker, [state3, *sent, *sent])
    assert transitions(events) == sent
    assert not [e for e in events if isinstance(e, SeqGap | ChainBroken)]


def test_an_epoch_change_is_announced_and_the_chain_starts_over_at_one() -> None:
    agent = FakeAgent()
    old = [agent.transition("web", U, 0)[1] for _ in range(4)]
    agent.new_epoch("e2")
    _, status = agent.status()
    new = [agent.transition("web", U, 0)[1] for _ in range(2)]
    tracker = ChainTracker()
    events = feed_all(tracker, [*old, status, new[1]])
    changed = [e for e in events if isinstance(e, EpochChanged)]
    assert changed == [EpochChanged(host="node1", old="e1", new="e2")]
    gaps = [e for e in events if isinstance(e, SeqGap)]
    assert [(g.first, g.last, g.epoch) for g in gaps] == [(1, 1, "e2")]  # seq 1 of e2 lost


def test_a_late_message_of_a_superseded_epoch_moves_no_chain() -> None:
    agent = FakeAgent()
    t_old = agent.transition("web", U, 0)[1]
    agent.new_epoch("e2")
    t_new = agent.transition("web", U, 0)[1]
    tracker = ChainTracker()
    events = feed_all(tracker, [t_old, t_new, t_old])
    assert transitions(events) == [t_old, t_new, t_old]
    assert tracker.stale == 1
    assert tracker.epoch_changes == 1
    t_new2 = agent.transition("web", U, 0)[1]
    assert not [e for e in tracker.feed(t_new2) if isinstance(e, SeqGap | ChainBroken)]


def test_a_ledger_seed_makes_redelivered_work_duplicates_across_a_restart() -> None:
    agent = FakeAgent()
    sent = [agent.transition("web", U, 0)[1] for _ in range(3)]
    seed = Seed(host="node1", uuid=U, vcpu=0, epoch="e1", seq=2, state=sent[1].to_state)
    tracker = ChainTracker([seed])
    assert transitions(feed_all(tracker, sent)) == [sent[2]]
    assert tracker.duplicates == 2


def test_a_ledger_seed_of_an_older_epoch_means_the_new_epoch_starts_at_seq_one() -> None:
    agent = FakeAgent()
    agent.new_epoch("e2")
    agent.transition("web", U, 0)  # lost while we were down
    t2 = agent.transition("web", U, 0)[1]
    seed = Seed(host="node1", uuid=U, vcpu=0, epoch="e1", seq=9, state="halted")
    events = feed_all(ChainTracker([seed]), [t2])
    assert isinstance(events[0], EpochChanged)
    assert isinstance(events[1], SeqGap)
    assert (events[1].first, events[1].last) == (1, 1)


def test_duplicate_lifecycle_events_are_dropped_by_their_per_domain_seq() -> None:
    agent = FakeAgent()
    _, first = agent.lifecycle("web", U)
    _, second = agent.lifecycle("web", U, "resumed")
    assert feed_all(ChainTracker(), [first, first, second, first]) == [first, second]


# -- generated sequences -----------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Payload], list[Transition], set[tuple[int, int]]]:
    """An honest agent's messages for a few vCPUs, then what the wire does to them.

    Returns (what arrives, every transition sent, the (vcpu, seq) lost). Order is kept
    within each topic (MQTT's promise); topics interleave arbitrarily; QoS 1 may deliver
    any message again; some transitions are lost.
    """
    agent = FakeAgent()
    vcpus = draw(st.integers(1, 3))
    per_topic: dict[str, list[Payload]] = {}
    sent: list[Transition] = []
    for n in range(vcpus):
        topic, state = agent.vcpu_state("web", U, n)
        per_topic.setdefault(topic, []).append(state)
    for n in draw(st.lists(st.integers(0, vcpus - 1), max_size=25)):
        topic, t = agent.transition("web", U, n)
        per_topic.setdefault(topic, []).append(t)
        sent.append(t)
        if draw(st.booleans()):  # the retained state follows, on its own topic
            state_topic, state = agent.vcpu_state("web", U, n)
            per_topic.setdefault(state_topic, []).append(state)
    lost = {
        (t.vcpu, t.seq)
        for t in sent
        if draw(st.integers(0, 9)) == 0 and t.seq < agent.seqs[(U, t.vcpu)]  # not the last
    }
    queues = {
        topic: [m for m in msgs if not (isinstance(m, Transition) and (m.vcpu, m.seq) in lost)]
        for topic, msgs in per_topic.items()
    }
    arrived: list[Payload] = []
    while any(queues.values()):
        topic = draw(st.sampled_from(sorted(t for t, q in queues.items() if q)))
        message = queues[topic].pop(0)
        arrived.append(message)
        if draw(st.integers(0, 5)) == 0:
            arrived.append(message)  # a QoS 1 redelivery
    return arrived, sent, lost


@settings(max_examples=300)
@given(scenarios())
def test_over_any_interleaving_each_sent_transition_is_delivered_once_and_each_loss_reported(
    scenario: tuple[list[Payload], list[Transition], set[tuple[int, int]]],
) -> None:
    arrived, sent, lost = scenario
    tracker = ChainTracker()
    events = feed_all(tracker, arrived)
    delivered = transitions(events)
    assert sorted((t.vcpu, t.seq) for t in delivered) == sorted(
        (t.vcpu, t.seq) for t in sent if (t.vcpu, t.seq) not in lost
    )
    for n in {t.vcpu for t in sent}:  # per vCPU, in seq order
        seqs = [t.seq for t in delivered if t.vcpu == n]
        assert seqs == sorted(seqs)
    reported = {
        (e.vcpu, s) for e in events if isinstance(e, SeqGap) for s in range(e.first, e.last + 1)
    }
    assert reported == lost
    assert not [e for e in events if isinstance(e, ChainBroken)]
    assert tracker.missing == len(lost)
