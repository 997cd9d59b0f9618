"""The ledger: what a durable subscriber handled, kept bounded."""

from __future__ import annotations

from pathlib import Path

from agent.ledger import Ledger
from tests.subscribers.messages import FakeAgent

U = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def test_the_ledger_forgets_finished_rows_past_retention_but_never_a_running_one(
    tmp_path: Path,
) -> None:
    agent = FakeAgent()
    old = [agent.transition("web", U, 0)[1] for _ in range(3)]
    book = Ledger(tmp_path / "l.db", retention=3600)
    book.start(old[0])  # a hook cut off long ago: kept for its rerun
    book.record(old[1])
    book.record(old[2], "failed", "exit 3")
    book.flush()
    book._db.execute("UPDATE handled SET updated = updated - 7200")  # two hours pass
    book.prune()
    assert book.counts() == {"running": 1}
    assert [i.transition for i in book.interrupted()] == [old[0]]
    assert [s.seq for s in book.seeds()] == [3]  # where the chain stood is kept
