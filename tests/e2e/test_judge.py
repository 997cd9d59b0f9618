"""The referee of the truth tests (``lab.rig.judge``) catches what it must.

Pure: markers and transitions are built by hand, so these run without libvirt.
They show the truth tests can fail: a missed change, an extra (flapping)
transition, a wrong direction and a transition before the first marker are all
told apart.
"""

from __future__ import annotations

from agent.payloads import Transition, rfc3339
from agent.topics import ParsedTopic
from lab.rig import Arrival, Seen, judge
from lab.truth import Marker, Phase

T0 = 1_800_000_000.0


def _markers(*phases: Phase, every: float = 1.0) -> list[Marker]:
    return [Marker(T0 + i * every, i * every, p) for i, p in enumerate(phases)]


def _seen(at: float, src: str, dst: str, *, seq: int = 1) -> Seen:
    body = Transition(
        host="h",
        domain="d",
        uuid="u",
        vcpu=0,
        from_state=src,  # type: ignore[arg-type]
        to_state=dst,  # type: ignore[arg-type]
        source="cputime",
        ratio=0.9,
        at=rfc3339(T0 + at),
        changed_at=rfc3339(T0 + at - 0.1),
        previous_duration_s=1.0,
        seq=seq,
        epoch="e1",
        resync=False,
    )
    where = ParsedTopic(host="h", kind="vcpu_transition", domain="d", vcpu=0)
    arrival = Arrival(
        "p/h/d/vcpu/0/transition", body.encode(), 1, False, where, body, T0 + at + 0.01, at
    )
    return Seen(arrival, body, T0 + at, T0 + at - 0.1)


MARKERS = _markers("busy", "halted", "busy", "halted")


def test_one_right_transition_per_change_is_clean() -> None:
    seen = [_seen(1.3, "running", "halted"), _seen(2.3, "halted", "running")]
    verdict = judge(MARKERS, seen, end_wall=MARKERS[-1].t_wall)
    assert verdict.clean
    assert verdict.changes == 2
    assert [round(m.latency, 3) for m in verdict.matched] == [0.31, 0.31]
    assert [round(m.estimate_error, 3) for m in verdict.matched] == [0.2, 0.2]


def test_a_change_without_its_transition_is_missed() -> None:
    verdict = judge(MARKERS, [_seen(1.3, "running", "halted")], end_wall=MARKERS[-1].t_wall)
    assert not verdict.clean
    assert verdict.missed == [MARKERS[2]]


def test_a_flap_inside_a_phase_is_false() -> None:
    seen = [
        _seen(1.3, "running", "halted"),
        _seen(1.6, "halted", "running"),
        _seen(1.9, "running", "halted"),
        _seen(2.3, "halted", "running"),
    ]
    verdict = judge(MARKERS, seen, end_wall=MARKERS[-1].t_wall)
    assert not verdict.clean
    assert [round(s.at - T0, 3) for s in verdict.false] == [1.6, 1.9]


def test_a_transition_in_the_wrong_direction_is_false_and_the_change_missed() -> None:
    verdict = judge(MARKERS, [_seen(1.3, "halted", "running")], end_wall=T0 + 2.0)
    assert verdict.missed == [MARKERS[1]]
    assert len(verdict.false) == 1


def test_time_before_the_first_change_is_not_judged() -> None:
    seen = [_seen(0.2, "halted", "running"), _seen(1.3, "running", "halted")]
    verdict = judge(MARKERS, seen, end_wall=T0 + 2.0)
    assert verdict.clean
