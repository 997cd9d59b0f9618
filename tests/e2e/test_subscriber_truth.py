"""The subscriber library against the real agent on a real guest.

A toggler guest changes phase every 2 s; the agent publishes through a mosquitto
with persistence; a durable ``agent.client.Subscriber`` (persistent session and
ledger) follows vCPU 0. It is stopped while the guest changes twice, and the
broker is restarted while the guest changes again. The chain the library
reports must equal the guest's truth: one transition per phase change, in
order, seq +1, no gap, no broken chain, nothing reported twice. And every live
message fits its JSON Schema.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from agent.chain import ChainBroken, SeqGap
from agent.client import Subscriber
from agent.config import load
from agent.ledger import Ledger
from agent.payloads import PAYLOADS, Transition, parse_rfc3339
from agent.schema import schema_of
from lab.domains import GuestPool, GuestSpec
from lab.guest import build_toggler_image
from lab.mosquitto import Mosquitto
from lab.rig import STATE_OF_PHASE, AgentProcess, Feed

pytestmark = pytest.mark.libvirt
INTERVAL = 0.25
PHASE_S = 2.0


class Follower:
    """A durable subscriber following one vCPU, committing what it handles."""

    def __init__(self, agent: AgentProcess, ledger: Path, client_id: str, domain: str) -> None:
        assert agent.config_path is not None
        self.sub = Subscriber(
            load(agent.config_path).mqtt, client_id=client_id, ledger=Ledger(ledger)
        ).connect()
        self.domain = domain
        self.transitions: list[Transition] = []
        self.problems: list[object] = []

    def follow(self, until: Callable[[list[Transition]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until(self.transitions):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {[(t.seq, t.to_state) for t in self.transitions]}"
            event = self.sub.get(timeout=min(left, 0.5))
            if isinstance(event, SeqGap | ChainBroken) and event.domain == self.domain:
                self.problems.append(event)
            if isinstance(event, Transition):
                if event.domain == self.domain and event.vcpu == 0:
                    self.transitions.append(event)
                self.sub.commit(event)
        self.sub.flush()

    def close(self) -> None:
        self.sub.flush()
        self.sub.close()


def test_the_library_reports_the_guests_truth_across_a_subscriber_and_a_broker_restart(
    tmp_path: Path,
    prefix: str,
    pool: GuestPool,
    make_broker: Callable[..., Mosquitto],
) -> None:
    broker = make_broker("autosave_interval 1\n", persistent=True)
    image = build_toggler_image(busy_s=PHASE_S, halted_s=PHASE_S, cache_dir=tmp_path)
    guest = pool.start(GuestSpec(image=image, virt_type="qemu"))
    agent = AgentProcess.lab(
        workdir=tmp_path / "agent",
        broker_port=broker.port,
        prefix=prefix,
        host_id=f"sub-{secrets.token_hex(3)}",
        interval=INTERVAL,
        libvirt_keys={"reconnect_min": 0.2, "reconnect_max": 1.0},
    ).start()
    client_id = f"e2e-sub-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger.sqlite3"
    got: list[Transition] = []
    problems: list[object] = []
    try:
        agent.wait_log("mqtt.connected", timeout=30)
        follower = Follower(agent, ledger, client_id, guest.name)
        follower.follow(lambda ts: len(ts) >= 2, timeout=30)
        follower.close()  # away while the guest changes twice
        got += follower.transitions
        problems += follower.problems
        guest.truth.wait_for(len(guest.truth.markers()) + 2, timeout_s=15)

        follower = Follower(agent, ledger, client_id, guest.name)
        follower.follow(lambda ts: len(ts) >= 2, timeout=30)  # the two it missed
        broker.stop()  # the guest changes while the broker is down
        guest.truth.wait_for(len(guest.truth.markers()) + 1, timeout_s=15)
        broker.start()
        follower.follow(lambda ts: len(ts) >= 5, timeout=40)
        follower.close()
        got += follower.transitions
        problems += follower.problems
    finally:
        assert agent.stop() == 0, agent.log_tail()

    assert problems == []
    seqs = [t.seq for t in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "each once, in order, no gap"
    for before, after in itertools.pairwise(got):
        assert after.from_state == before.to_state
    # One transition per phase change: line them up with the guest's markers.
    markers = guest.truth.markers()
    first = min(range(len(markers)), key=lambda i: abs(markers[i].t_wall - _t(got[0])))
    for k, t in enumerate(got):
        marker = markers[first + k]
        assert t.to_state == STATE_OF_PHASE[marker.phase], (k, t, marker)
        assert abs(_t(t) - marker.t_wall) < PHASE_S / 2, (k, t, marker)


def _t(t: Transition) -> float:
    return parse_rfc3339(t.changed_at)


def test_every_message_of_a_real_agent_fits_its_json_schema(
    tmp_path: Path, prefix: str, pool: GuestPool, make_broker: Callable[..., Mosquitto]
) -> None:
    broker = make_broker()
    image = build_toggler_image(busy_s=1.0, halted_s=1.0, cache_dir=tmp_path)
    guest = pool.start(GuestSpec(image=image, virt_type="qemu"))
    agent = AgentProcess.lab(
        workdir=tmp_path / "agent",
        broker_port=broker.port,
        prefix=prefix,
        host_id="schema-host",
        interval=INTERVAL,
    ).start()
    feed = Feed(port=broker.port, prefix=prefix)
    try:
        feed.wait_all(
            lambda a: isinstance(a.body, Transition) and a.body.domain == guest.name,
            count=2,
            timeout=30,
        )
    finally:
        assert agent.stop() == 0
        feed.close()
    kinds = set()
    for arrival in feed.snapshot():
        if not arrival.payload:
            continue
        body = json.loads(arrival.payload)
        jsonschema.validate(body, schema_of(PAYLOADS[body["kind"]]))
        kinds.add(body["kind"])
    assert {"status", "domain_state", "vcpu_state", "transition"} <= kinds
    assert not feed.errors
