"""``vcpu-agent metrics``: what the bus says, as Prometheus metrics (``prometheus_client``).

One instance can cover the fleet: it subscribes like any subscriber (retained
tree first, chains checked) and serves ``/metrics``. Counters start at zero when
it starts (Prometheus' ``rate``/``increase`` handle the reset); ``vcpu_state`` is
exact from the first scrape after the retained tree arrived.

| metric | type | labels |
| --- | --- | --- |
| ``vcpu_state`` | gauge, 1 for the current state, 0 for the others | host, domain, vcpu, state |
| ``vcpu_transitions_total`` | counter | host, domain, from, to |
| ``vcpu_state_seconds_total`` | counter (previous_duration_s) | host, domain, vcpu, state |
| ``vcpu_host_online`` | gauge: 1 online, 0 offline | host |
| ``vcpu_host_last_event_age_seconds`` | gauge, computed at scrape time | host |
| ``vcpu_seq_gaps_total`` / ``vcpu_missing_transitions_total`` | counter | host, explained |
| ``vcpu_agent_dropped_events_total`` | counter: the agents' own ``gap`` markers | host |
| ``vcpu_chain_breaks_total`` / ``vcpu_epoch_changes_total`` | counter | host |
| ``vcpu_bad_messages_total`` | counter | reason |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.chain import (
    BadMessage,
    ChainBroken,
    EpochChanged,
    Event,
    SeqGap,
    VcpuCleared,
)
from agent.payloads import Gap, Lifecycle, Status, Transition, VcpuStatePayload

STATES = ("offline", "running", "blocked", "halted", "unknown", "n/a")


class _LastEventAge(Collector):
    def __init__(self, last: dict[str, float], clock: Callable[[], float]) -> None:
        self._last = last
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "vcpu_host_last_event_age_seconds",
            "Seconds since the last message from the host's agent reached this bridge",
            labels=["host"],
        )
        now = self._clock()
        for host, at in sorted(self._last.items()):
            family.add_metric([host], max(0.0, now - at))
        yield family


class Bridge:
    """Events in, metrics out; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.state = Gauge(
            "vcpu_state",
            "1 for the vCPU's current state, 0 for the other states",
            ["host", "domain", "vcpu", "state"],
            registry=r,
        )
        self.transitions = Counter(
            "vcpu_transitions",
            "vCPU state transitions",
            ["host", "domain", "from", "to"],
            registry=r,
        )
        self.seconds = Counter(
            "vcpu_state_seconds",
            "Seconds vCPUs spent in each state, from transitions' previous_duration_s",
            ["host", "domain", "vcpu", "state"],
            registry=r,
        )
        self.online = Gauge(
            "vcpu_host_online", "1 when the host's agent is online", ["host"], registry=r
        )
        self.gaps = Counter(
            "vcpu_seq_gaps",
            "Skipped seq ranges seen in vCPU chains",
            ["host", "explained"],
            registry=r,
        )
        self.missing = Counter(
            "vcpu_missing_transitions",
            "Transitions never received (sum of the gaps' lengths)",
            ["host", "explained"],
            registry=r,
        )
        self.dropped = Counter(
            "vcpu_agent_dropped_events",
            "Events the agents dropped when their spool overflowed (their gap markers)",
            ["host"],
            registry=r,
        )
        self.broken = Counter(
            "vcpu_chain_breaks",
            "Transitions whose from was not the previous to",
            ["host"],
            registry=r,
        )
        self.epochs = Counter(
            "vcpu_epoch_changes",
            "Times a host's agent started a new seq epoch",
            ["host"],
            registry=r,
        )
        self.bad = Counter(
            "vcpu_bad_messages",
            "Messages that were not valid vcpu-agent messages",
            ["reason"],
            registry=r,
        )
        self._last: dict[str, float] = {}
        self._clock = clock
        r.register(_LastEventAge(self._last, clock))

    def _set_state(self, host: str, domain: str, vcpu: int, state: str) -> None:
        n = str(vcpu)
        for s in STATES:
            self.state.labels(host, domain, n, s).set(1.0 if s == state else 0.0)

    def apply(self, event: Event) -> None:  # noqa: PLR0912 - one branch per event type
        host = getattr(event, "host", None)
        if isinstance(host, str):
            self._last[host] = self._clock()
        if isinstance(event, Transition):
            self.transitions.labels(
                event.host, event.domain, event.from_state, event.to_state
            ).inc()
            self.seconds.labels(event.host, event.domain, str(event.vcpu), event.from_state).inc(
                max(0.0, event.previous_duration_s)
            )
            self._set_state(event.host, event.domain, event.vcpu, event.to_state)
        elif isinstance(event, VcpuStatePayload):
            self._set_state(event.host, event.domain, event.vcpu, event.state)
        elif isinstance(event, VcpuCleared):
            for s in STATES:
                try:
                    self.state.remove(event.host, event.domain, str(event.vcpu), s)
                except KeyError:
                    continue
        elif isinstance(event, Status):
            self.online.labels(event.host).set(1.0 if event.status == "online" else 0.0)
        elif isinstance(event, SeqGap):
            explained = "true" if event.explained else "false"
            self.gaps.labels(event.host, explained).inc()
            self.missing.labels(event.host, explained).inc(event.missing)
        elif isinstance(event, Gap):
            self.dropped.labels(event.host).inc(event.dropped)
        elif isinstance(event, ChainBroken):
            self.broken.labels(event.host).inc()
        elif isinstance(event, EpochChanged):
            self.epochs.labels(event.host).inc()
        elif isinstance(event, BadMessage):
            self.bad.labels(event.reason).inc()
        elif isinstance(event, Lifecycle):
            pass  # counted in the last-event age only


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:9847`` or ``[::1]:9847`` -> (address, port)."""
    address, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r}: expected ADDRESS:PORT")
    return address.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only when asked
