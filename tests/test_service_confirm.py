"""The service looks again soon at a suspect domain (docs/design.md, "Latency")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import parse
from agent.service import Service
from tests.builders import UUID, busy


@pytest.mark.parametrize(("confirm_after", "queued"), [(0.1, True), (0.0, False)])
def test_a_suspect_domain_gets_a_second_look_after_confirm_after(
    tmp_path: Path, confirm_after: float, queued: bool
) -> None:
    cfg = parse({"sampling": {"confirm_after": confirm_after}, "spool": {"path": ""}})

    async def scenario() -> set[str]:
        service = Service(cfg)
        try:
            for record in [busy(0, 0), busy(1, 1), busy(2, 2)]:
                service._apply([record], complete=True)
            assert service.resamples.next_at() is None  # steady: nothing to confirm
            service._apply([busy(3, 2.6)], complete=True)  # 40 % halted
            return service.resamples.take(float("inf"))
        finally:
            service.source.shutdown()

    assert asyncio.run(scenario()) == ({UUID} if queued else set())
