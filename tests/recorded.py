"""Load the real bulk-stats recordings in tests/data (made by ``python -m lab.record``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agent.model import DomainRecord
from agent.records import domain_record

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Recording:
    meta: dict[str, object]
    samples: list[list[DomainRecord]]
    markers: list[tuple[float, str]]  # (t_wall, "busy" | "halted") of the toggler guest
    toggler: str  # the domain whose markers these are

    def markers_of(self, domain: str) -> list[tuple[float, str]]:
        return self._by_domain[domain]

    @property
    def _by_domain(self) -> dict[str, list[tuple[float, str]]]:
        raw = self.meta["_markers_by_domain"]
        assert isinstance(raw, dict)
        return raw


def load(name: str) -> Recording:
    doc = json.loads((DATA / name).read_text())
    samples = [
        [
            domain_record(name=d["name"], uuid=d["uuid"], stats=d["stats"],
                          t_mono=s["t_mono"], t_wall=s["t_wall"])
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
