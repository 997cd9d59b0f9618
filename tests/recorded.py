"""Load the real bulk-stats recordings in tests/data (made by ``python -m lab.record``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.model import DomainRecord
from agent.records import domain_record

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Recording:
    meta: dict[str, object]
    samples: list[list[DomainRecord]]
    markers: list[tuple[float, str]]  # (t_wall, "busy" | "halted") of the toggler guest
    toggler: str  # the domain whose markers these are

    @property
    def interval(self) -> float:
        """The recording's sample interval, seconds."""
        value = self.meta["interval_s"]
        assert isinstance(value, int | float)
        return float(value)

    def markers_of(self, domain: str) -> list[tuple[float, str]]:
        return self._by_domain[domain]

    @property
    def _by_domain(self) -> dict[str, list[tuple[float, str]]]:
        raw = self.meta["_markers_by_domain"]
        assert isinstance(raw, dict)
        return raw


def load(name: str) -> Recording:
    return from_doc(json.loads((DATA / name).read_text()))


def from_doc(doc: dict[str, Any]) -> Recording:
    samples = [
        [
            domain_record(
                name=d["name"],
                uuid=d["uuid"],
                stats=d["stats"],
                t_mono=s["t_mono"],
                t_wall=s["t_wall"],
            )
            for d in s["domains"]
        ]
        for s in doc["samples"]
    ]
    meta = dict(doc["meta"])
    meta["_markers_by_domain"] = {
        dom: [(m["t_wall"], m["phase"]) for m in ms]
        for dom, ms in doc.get("markers_by_domain", {}).items()
    }
    return Recording(
        meta=meta,
        samples=samples,
        markers=[(m["t_wall"], m["phase"]) for m in doc["markers"]],
        toggler=str(doc["meta"]["markers_domain"]),
    )


def synthetic_s390_from(name: str) -> Recording:
    """FAKE s390 records: a real x86 recording with ``vcpu.<n>.halted`` added.

    No s390 guest can run here. The QEMU driver fills ``vcpu.<n>.halted`` (a
    boolean, libvirt >= 2.4, documented in virConnectGetAllDomainStats) for s390
    guests only, from QEMU's ``cpu-state``: an instantaneous flag. We add it to the
    real records as the guest's own markers say it was at each sample: halted in
    a halted phase and for the parked vCPU, not halted while busy or booting.
    """
    doc = json.loads((DATA / name).read_text())
    by_domain = doc["markers_by_domain"]
    for sample in doc["samples"]:
        for d in sample["domains"]:
            markers = [m for m in by_domain.get(d["name"], []) if m["t_wall"] <= sample["t_wall"]]
            phase = markers[-1]["phase"] if markers else "busy"
            stats = d["stats"]
            for n in range(int(stats.get("vcpu.current", 0))):
                stats[f"vcpu.{n}.halted"] = phase == "halted" if n == 0 else True
    return from_doc(doc)
