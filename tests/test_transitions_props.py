"""Invariants of the pure core over arbitrary, often malformed, record sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.classify import Thresholds
from agent.model import DomainRecord, VcpuState
from agent.records import domain_record
from agent.transitions import (
    Change,
    DomainRemoved,
    HostState,
    VcpuRemoved,
    VcpuStateSet,
    VcpuTransition,
    advance,
)

UUIDS = ["00000000-0000-4000-8000-00000000000a", "00000000-0000-4000-8000-00000000000b"]
junk = st.one_of(st.text(max_size=3), st.booleans(), st.floats(), st.integers(-5, 5), st.none())
counter = st.one_of(st.integers(0, 10**12), junk)


@st.composite
def stats(draw: st.DrawFn) -> dict[str, object]:
    out: dict[str, object] = {
        "state.state": draw(st.one_of(st.sampled_from([1, 1, 1, 3, 5, 4, 7, 0, 42]), junk)),
        "state.reason": draw(st.integers(0, 5)),
    }
    if draw(st.booleans()):
        out["vcpu.current"] = draw(st.one_of(st.integers(0, 3), junk))
        out["vcpu.maximum"] = draw(st.one_of(st.integers(0, 4), junk))
        for n in range(4):
            for key in ("state", "time", "halted", "halt_wait_ns.sum"):
                if draw(st.integers(0, 3)) > 0:
                    value = draw(
                        st.sampled_from([0, 1, 2])
                        if key == "state"
                        else st.booleans()
                        if key == "halted"
                        else counter
                    )
                    out[f"vcpu.{n}.{key}"] = value
    return out


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[list[DomainRecord], bool]]:
    t = 0.0
    out = []
    for _ in range(draw(st.integers(1, 12))):
        t += draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 7.0]))
        records = [
            domain_record(name=f"vm{i}", uuid=uuid, stats=draw(stats()), t_mono=t, t_wall=t)
            for i, uuid in enumerate(UUIDS)
            if draw(st.integers(0, 4)) > 0
        ]
        out.append((records, draw(st.booleans())))
    return out


def check_stream(changes: list[Change], published: dict[tuple[str, int], VcpuState]) -> None:
    """Every transition starts where the last published state ended."""
    for i, change in enumerate(changes):
        if isinstance(change, VcpuTransition):
            key = (change.uuid, change.vcpu)
            assert published.get(key) is change.before.state
            assert change.before.state is not change.after.state
            follow = changes[i + 1]
            assert isinstance(follow, VcpuStateSet)
            assert (follow.uuid, follow.vcpu, follow.view) == (*key, change.after)
        elif isinstance(change, VcpuStateSet):
            published[(change.uuid, change.vcpu)] = change.view.state
        elif isinstance(change, VcpuRemoved):
            published.pop((change.uuid, change.vcpu), None)
        elif isinstance(change, DomainRemoved):
            assert not [k for k in published if k[0] == change.uuid]


@settings(max_examples=120, deadline=None)
@given(batches(), st.builds(Thresholds, min_samples=st.integers(1, 3)))
def test_every_transition_starts_where_the_previous_one_ended(
    steps: list[tuple[list[DomainRecord], bool]], th: Thresholds
) -> None:
    host = HostState()
    published: dict[tuple[str, int], VcpuState] = {}
    for records, complete in steps:
        host, changes = advance(host, records, th, complete=complete)
        check_stream(changes, published)


@settings(max_examples=120, deadline=None)
@given(batches())
def test_replaying_a_snapshot_yields_no_transition(
    steps: list[tuple[list[DomainRecord], bool]],
) -> None:
    host = HostState()
    for records, complete in steps:
        host, _ = advance(host, records, Thresholds(), complete=complete)
        again, changes = advance(host, records, Thresholds(), complete=complete)
        assert [c for c in changes if isinstance(c, VcpuTransition | VcpuRemoved)] == []
        assert {u: {n: t.view for n, t in d.vcpus.items()} for u, d in again.domains.items()} == {
            u: {n: t.view for n, t in d.vcpus.items()} for u, d in host.domains.items()
        }


@settings(max_examples=80, deadline=None)
@given(batches())
def test_a_complete_sample_forgets_vanished_domains_and_clears_them(
    steps: list[tuple[list[DomainRecord], bool]],
) -> None:
    host = HostState()
    for records, _complete in steps:
        before = set(host.domains)
        host, changes = advance(host, records, Thresholds(), complete=True)
        assert set(host.domains) == {r.uuid for r in records}
        removed = {c.uuid for c in changes if isinstance(c, DomainRemoved)}
        assert removed == before - set(host.domains)
