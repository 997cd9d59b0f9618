"""A durable ``Outbox``: QoS 1 events in SQLite until the broker acknowledges them.

Events are written (committed) before they are handed to the broker and deleted
on PUBACK, so an agent restart, even a SIGKILL, during a broker outage loses
nothing that was committed. The same database keeps:

- the ``Sequencer`` counters (table ``seqs``), written in the *same transaction*
  as the events that used them, so after a restart seq numbers continue where the
  spooled events left off and a subscriber can still spot gaps and duplicates;
- the overflow ledger (table ``meta``): how many events were dropped for lack of
  room over the spool's life, and how many of those a ``gap`` marker has already
  announced, so a gap is announced once even across restarts.

Batching: ``put``/``ack``/``save_seq`` only append to in-memory buffers; one
transaction writes them at the end of the current loop iteration (``call_soon``),
or at once when ``pending`` is called, so everything ``pending`` returns is
already committed. One transaction per loop iteration instead of one per event
is what keeps throughput above 20,000 events/s (``bench/spool.py``).

Durability: WAL with ``synchronous=NORMAL``: a commit survives a crash or SIGKILL
of the agent (the WAL is in the kernel's page cache); a power cut may lose the
last commits before a checkpoint but never corrupts the file. ``FULL`` (an fsync
per commit) is available as ``synchronous="full"`` and costs what
``bench/spool.py`` shows; docs/reliability.md has the figures and the reasoning.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sqlite3
from pathlib import Path
from typing import Literal

from agent import logs
from agent.outbox import Message
from agent.render import SeqKey

log = logs.get("agent.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seqs (
    uuid  TEXT    NOT NULL,
    vcpu  INTEGER NOT NULL,  -- -1: the domain's lifecycle counter
    value INTEGER NOT NULL,
    PRIMARY KEY (uuid, vcpu)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""
_DOMAIN = -1  # the ``vcpu`` column of a domain (lifecycle) counter


class SpoolError(Exception):
    """The spool database cannot be opened or written."""


class SqliteSpool:
    """An ``Outbox`` in one SQLite file; also the ``Sequencer``'s memory."""

    def __init__(
        self,
        path: str | Path,
        capacity: int,
        *,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = Path(path)
        self.capacity = capacity
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One agent per spool: a second one would resend (and ack) the first
            # one's events. The lock dies with the process, SIGKILL included.
            self._lock = self.path.with_name(self.path.name + ".lock").open("a")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                self._lock.close()
                raise SpoolError(
                    f"spool {str(self.path)!r} is in use by another vcpu-agent"
                ) from err
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT COUNT(*), COALESCE(MAX(id), 0) FROM events").fetchone()
        except (OSError, sqlite3.Error) as err:
            raise SpoolError(f"cannot open spool {str(self.path)!r}: {err}") from err
        self._count: int = row[0]
        self._next_id: int = row[1] + 1
        self._dropped = self._meta("dropped")
        self._gap_reported = self._meta("gap_reported")
        self._saved_gap = self._gap_reported
        self._new: list[tuple[int, Message]] = []
        self._acks: list[int] = []
        self._seqs: dict[SeqKey, int] = {}
        self._flush_scheduled = False
        self._closed = False
        self.commits = 0

    # -- the Outbox protocol ------------------------------------------------------

    def put(self, message: Message) -> int:
        event_id = self._next_id
        self._next_id += 1
        self._new.append((event_id, message))
        self._schedule_flush()
        return event_id

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        self.flush()  # whatever we hand out for sending must be on disk first
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM events WHERE id > ? ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(r[0], Message(r[1], bytes(r[2]), r[3], bool(r[4]))) for r in rows]

    def ack(self, event_id: int) -> None:
        self._acks.append(event_id)
        self._schedule_flush()

    def __len__(self) -> int:
        self.flush()
        return self._count

    @property
    def dropped(self) -> int:
        """Events dropped for lack of room over the spool file's whole life."""
        self.flush()
        return self._dropped

    # -- the gap ledger (see agent.mqtt.GapLedger) ----------------------------------

    @property
    def gap_reported(self) -> int:
        """How many of ``dropped`` a gap marker acknowledged by the broker announced."""
        return self._gap_reported

    def record_gap_reported(self, total: int) -> None:
        self._gap_reported = max(self._gap_reported, total)
        self._schedule_flush()

    # -- sequence numbers -----------------------------------------------------------

    def load_seqs(self) -> dict[SeqKey, int]:
        rows = self._db.execute("SELECT uuid, vcpu, value FROM seqs").fetchall()
        return {(r[0], None if r[1] == _DOMAIN else r[1]): r[2] for r in rows}

    def save_seq(self, key: SeqKey, value: int) -> None:
        """Remember a counter; written in the same transaction as the event using it."""
        self._seqs[key] = value
        self._schedule_flush()

    # -- writing --------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): write at once
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        try:
            self.flush()
        except SpoolError as err:
            # Keep the buffers: the next flush retries. Events still reach the broker.
            log.error(  # noqa: TRY400 - the reason names the cause; no traceback needed
                "spool.write_failed", path=str(self.path), reason=str(err)
            )

    def flush(self) -> None:
        """Write every buffered event, ack and counter in one transaction."""
        gap_dirty = self._gap_reported != self._saved_gap
        if self._closed or not (self._new or self._acks or self._seqs or gap_dirty):
            return
        new, acks, seqs = self._new, self._acks, self._seqs
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            if new:
                db.executemany(
                    "INSERT INTO events (id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                    [(i, m.topic, m.payload, m.qos, int(m.retain)) for i, m in new],
                )
            if seqs:
                db.executemany(
                    "INSERT INTO seqs (uuid, vcpu, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (uuid, vcpu) DO UPDATE SET value = excluded.value",
                    [(u, _DOMAIN if v is None else v, n) for (u, v), n in seqs.items()],
                )
            removed = 0
            if acks:
                removed = db.executemany(
                    "DELETE FROM events WHERE id = ?", [(i,) for i in acks]
                ).rowcount
            count = self._count + len(new) - removed
            dropped = self._dropped
            if count > self.capacity:
                excess = count - self.capacity
                db.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                    (excess,),
                )
                count -= excess
                dropped += excess
            db.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("dropped", dropped), ("gap_reported", self._gap_reported)],
            )
            db.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise SpoolError(f"cannot write spool {str(self.path)!r}: {err}") from err
        if dropped > self._dropped:
            log.warning(
                "spool.overflow",
                dropped=dropped - self._dropped,
                dropped_total=dropped,
                capacity=self.capacity,
            )
        self._new, self._acks, self._seqs = [], [], {}
        self._count, self._dropped = count, dropped
        self._saved_gap = self._gap_reported
        self.commits += 1

    def close(self) -> None:
        """Write what is buffered and close the file (a clean stop)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._db.close()
            self._lock.close()  # releases the flock

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0
