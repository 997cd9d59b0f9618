"""What a durable subscriber has handled, in SQLite: the memory that makes it exactly-once.

One row per transition ever handed to the subscriber's code, keyed by the
transition's identity (host, domain UUID, vCPU, epoch, seq), with its status:

- ``running``: a hook was started for it (committed *before* the hook starts, so a
  crash mid-hook leaves a trace and the hook is rerun once after the restart);
- ``done`` / ``failed``: finished; never run again, whatever the broker redelivers.

``chains`` keeps where each vCPU's chain stood, so after a restart the chain
tracker (``agent.chain.Seed``) knows redelivered transitions for duplicates and
a seq jump across the downtime for a gap. The broker only ever sees a PUBACK for
a transition after the row recording it is committed (``agent.client``).

Durability: WAL with ``synchronous=FULL``: a committed row survives a power cut,
not only a crash of the process. Rows that finished more than ``retention``
seconds ago (14 days: longer than any broker session, so no redelivery can
outlive its row) are pruned at open and every 10,000 writes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.chain import Seed
from agent.payloads import Transition, decode

Status = Literal["running", "done", "failed"]
PRUNE_EVERY = 10_000
Key = tuple[str, str, int, str, int]  # host, uuid, vcpu, epoch, seq
# A whole-domain condition's episode (agent.conditions): host, uuid, condition, and the
# epoch, vCPU and seq of the transition that completed it.
ConditionKey = tuple[str, str, str, str, int, int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (
    host TEXT NOT NULL, uuid TEXT NOT NULL, vcpu INTEGER NOT NULL,
    epoch TEXT NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL, outcome TEXT NOT NULL,
    body BLOB NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (host, uuid, vcpu, epoch, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conditions (
    host TEXT NOT NULL, uuid TEXT NOT NULL, condition TEXT NOT NULL,
    epoch TEXT NOT NULL, vcpu INTEGER NOT NULL, seq INTEGER NOT NULL,
    status TEXT NOT NULL, outcome TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (host, uuid, condition, epoch, vcpu, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chains (
    host TEXT NOT NULL, uuid TEXT NOT NULL, vcpu INTEGER NOT NULL,
    epoch TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (host, uuid, vcpu)
) WITHOUT ROWID;
"""


def key_of(t: Transition) -> Key:
    return (t.host, t.uuid, t.vcpu, t.epoch, t.seq)


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A transition whose hook was running when the process stopped."""

    transition: Transition
    attempts: int  # how many times a run was started (1: the interrupted run only)


class Ledger:
    """One SQLite file, one writer (the subscriber's own thread or loop)."""

    def __init__(self, path: Path | str, *, retention: float = 14 * 86400.0) -> None:
        self.path = Path(path)
        # isolation_level=None: we open transactions ourselves (BEGIN ... COMMIT).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._in_tx = False
        self.retention = retention
        self._since_prune = 0
        self.prune()

    def prune(self) -> None:
        """Forget finished rows older than ``retention`` (at open, then every
        ``PRUNE_EVERY`` writes: a long-running subscriber's file stays bounded)."""
        self._since_prune = 0
        for table in ("handled", "conditions"):
            self._db.execute(
                f"DELETE FROM {table} WHERE status != 'running' AND updated < ?",  # noqa: S608
                (time.time() - self.retention,),
            )

    def close(self) -> None:
        self.flush()
        self._db.close()

    def _begin(self) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True

    def flush(self) -> None:
        """Commit what ``record`` wrote; after this, acknowledging it is safe."""
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False

    def status(self, t: Transition) -> Status | None:
        row = self._db.execute(
            "SELECT status FROM handled WHERE host=? AND uuid=? AND vcpu=? AND epoch=? AND seq=?",
            key_of(t),
        ).fetchone()
        return None if row is None else row[0]

    def _put(self, t: Transition, status: Status, outcome: str, *, started: bool) -> None:
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self.prune()
        self._db.execute(
            "INSERT INTO handled VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET status=excluded.status, outcome=excluded.outcome,"
            " updated=excluded.updated, attempts=attempts + ?",
            (*key_of(t), status, 1 if started else 0, outcome, t.encode(), time.time(), started),
        )
        self._db.execute(
            "INSERT INTO chains VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " epoch=excluded.epoch, seq=excluded.seq, state=excluded.state"
            " WHERE chains.epoch != excluded.epoch OR chains.seq < excluded.seq",
            (t.host, t.uuid, t.vcpu, t.epoch, t.seq, t.to_state),
        )

    def record(self, t: Transition, status: Status = "done", outcome: str = "") -> None:
        """Write a finished transition; durable after the next ``flush``."""
        self._begin()
        self._put(t, status, outcome, started=False)

    def start(self, t: Transition) -> None:
        """Mark a hook as started, committed at once (a crash after this reruns it)."""
        self._begin()
        self._put(t, "running", "", started=True)
        self.flush()

    def finish(self, t: Transition, status: Status, outcome: str) -> None:
        self._begin()
        self._put(t, status, outcome, started=False)
        self.flush()

    def condition_status(self, key: ConditionKey) -> Status | None:
        row = self._db.execute(
            "SELECT status FROM conditions WHERE host=? AND uuid=? AND condition=?"
            " AND epoch=? AND vcpu=? AND seq=?",
            key,
        ).fetchone()
        return None if row is None else row[0]

    def condition_mark(self, key: ConditionKey, status: Status, outcome: str = "") -> None:
        """Committed at once: ``running`` before the hook starts, then its end."""
        self._begin()
        self._db.execute(
            "INSERT INTO conditions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
            " SET status=excluded.status, outcome=excluded.outcome, updated=excluded.updated",
            (*key, status, outcome, time.time()),
        )
        self.flush()

    def interrupted(self) -> list[Interrupted]:
        rows = self._db.execute(
            "SELECT body, attempts FROM handled WHERE status='running' ORDER BY updated"
        ).fetchall()
        found = []
        for body, attempts in rows:
            t = decode(body)
            assert isinstance(t, Transition)
            found.append(Interrupted(t, attempts))
        return found

    def seeds(self) -> Iterator[Seed]:
        for host, uuid, vcpu, epoch, seq, state in self._db.execute(
            "SELECT host, uuid, vcpu, epoch, seq, state FROM chains"
        ):
            yield Seed(host=host, uuid=uuid, vcpu=vcpu, epoch=epoch, seq=seq, state=state)

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, count(*) FROM handled GROUP BY status"))
