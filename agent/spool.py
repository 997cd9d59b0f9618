"""The durable ``Outbox``: the queue and the chain in one SQLite file.

The queue lives in memory (``delivery.Queue``) and is mirrored to the file by a
write-behind journal: ``put``/``ack``/``drop`` change the queue at once and note
the change; ``flush`` (called by the publisher before it hands entries to the
broker) writes every noted change, and the chain records that came with them,
in one transaction. So what reaches the broker was on disk first, and a chain
record is never on disk without the message that told it.

Tables: ``entries`` (the queue), ``chain`` (per vCPU the state subscribers were
told and its seq; per domain the lifecycle seq, ``vcpu = -1``) and ``meta``
(``epoch``, ``dropped``, ``gap_reported``). ``PRAGMA user_version`` names the
format.

Faults (docs/reliability.md, "Spool"):
- at start, a spool held by another agent, or one that cannot be opened or
  written, raises ``SpoolError``: the agent refuses to start (exit 73) rather than
  silently change its delivery guarantees;
- a corrupt file, or one of another format, is moved aside (kept for inspection)
  and a fresh spool starts in a new epoch;
- a write that fails while running (a full disk) keeps every change in memory
  (the queue is bounded by ``capacity`` either way), is retried with backoff, and
  is logged as one lasting fault: delivery goes on from memory.

Durability: WAL with ``synchronous=NORMAL`` survives a crash or SIGKILL of the
agent; ``FULL`` (an fsync per commit) also a power cut (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal

from agent import logs
from agent.delivery import ChainUpdate, Message, Queue, SeqKey, Told, new_epoch

log = logs.get("agent.spool")

FORMAT = 2  # PRAGMA user_version of the file layout below
_TABLES = """
CREATE TABLE entries (
    id      INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL
);
CREATE TABLE chain (
    uuid  TEXT    NOT NULL,
    vcpu  INTEGER NOT NULL,  -- -1: the domain's lifecycle counter
    seq   INTEGER NOT NULL,
    state TEXT,
    since REAL    NOT NULL,
    PRIMARY KEY (uuid, vcpu)
) WITHOUT ROWID;
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""
_DOMAIN = -1  # the ``vcpu`` column of a domain's lifecycle counter
# sqlite3 primary result codes that mean "this file is not a sound database".
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
RETRY_MIN, RETRY_MAX = 1.0, 30.0  # seconds between write attempts after a failure
# Acks alone are written in batches: an acked entry still on disk after a crash is
# only sent once more (a duplicate subscribers drop by seq), so deleting it can
# wait; a commit per broker window would cap replay throughput (bench/spool.py).
ACK_BATCH = 512


class SpoolError(Exception):
    """The spool cannot be used: held by another agent, or not openable/writable."""


class _CorruptError(Exception):
    """The file is not a sound spool of our format (moved aside, then recreated)."""


def _is_corrupt(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _unsound(db: sqlite3.Connection) -> str | None:
    """Why an opened file is not a usable spool of our format (None: it is; a new,
    empty file is given our tables)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
    if version == 0 and tables == 0:
        db.executescript(f"BEGIN; {_TABLES} PRAGMA user_version = {FORMAT}; COMMIT;")
        return None
    if version != FORMAT:
        return f"spool format {version}, this agent writes {FORMAT}"
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    return None if check == "ok" else f"integrity check: {check}"


class SqliteSpool:
    """An ``agent.delivery.Outbox`` in one SQLite file."""

    def __init__(
        self,
        path: str | Path,
        capacity: int,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = self._take_lock()
        try:
            try:
                self._db = self._open(synchronous)
            except _CorruptError as why:
                aside = self._move_aside()
                log.error(  # noqa: TRY400 - the reason says it all; a traceback would not help
                    "spool.corrupt", path=str(self.path), reason=str(why), moved_to=aside
                )
                self._db = self._open(synchronous)
        except BaseException:
            self._lock.close()
            raise
        try:
            self._queue = Queue(capacity)
            self._chain: dict[SeqKey, Told] = {}
            self._load()
            reset = self._lost_writes()
            if reset:
                self._new_epoch()
            self._probe_write(reset=reset)
            self._mark_unwritten(False)
        except BaseException:
            self._db.close()
            self._lock.close()
            raise
        # The journal: changes made in memory and not yet written.
        self._puts: dict[int, Message] = {}
        self._deletes: set[int] = set()
        self._told: dict[SeqKey, Told] = {}
        self._meta_dirty = False
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN
        self._marked = False  # the lock file's marker says "sent but unwritten"
        self._failing = logs.LastingFault(log, "spool.write_failed")
        self._overflowing = logs.LastingFault(log, "spool.overflow")
        self._closed = False
        self.commits = 0

    # -- opening ----------------------------------------------------------------------

    def _take_lock(self) -> IO[bytes]:
        # One agent per spool: a second one would resend (and ack) the first one's
        # entries and number its own seqs in the same epoch. The lock dies with the
        # process, SIGKILL included. Its first byte is the "unwritten" marker.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
            lock = os.fdopen(fd, "r+b", buffering=0)
        except OSError as err:
            raise SpoolError(f"cannot open spool {str(self.path)!r}: {err}") from err
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            lock.close()
            raise SpoolError(f"spool {str(self.path)!r} is in use by another vcpu-agent") from err
        return lock

    def _open(self, synchronous: str) -> sqlite3.Connection:
        if self.path.exists() and not self.path.is_file():
            raise SpoolError(f"spool {str(self.path)!r} is not a regular file")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per flush.
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as err:
            raise SpoolError(f"cannot open spool {str(self.path)!r}: {err}") from err
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            unsound = _unsound(db)
        except sqlite3.Error as err:
            db.close()
            if _is_corrupt(err):
                raise _CorruptError(str(err)) from err
            raise SpoolError(f"cannot open spool {str(self.path)!r}: {err}") from err
        if unsound is not None:
            db.close()
            raise _CorruptError(unsound)
        return db

    def _move_aside(self) -> str:
        """Keep a bad spool for inspection: ``<name>.corrupt-<UTC time>`` (+ WAL, SHM)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = self.path.with_name(self.path.name + suffix)
                if src.exists():
                    src.rename(aside.with_name(aside.name + suffix))
        except OSError as err:
            raise SpoolError(
                f"spool {str(self.path)!r} is corrupt and cannot be moved aside: {err}"
            ) from err
        return str(aside)

    def _load(self) -> None:
        db = self._db
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute("SELECT id, topic, payload, qos, retain FROM entries ORDER BY id")
            for row in rows:
                self._queue.load(row[0], Message(row[1], bytes(row[2]), row[3], bool(row[4])))
            for uuid, vcpu, seq, state, since in db.execute(
                "SELECT uuid, vcpu, seq, state, since FROM chain"
            ):
                key: SeqKey = (uuid, None if vcpu == _DOMAIN else vcpu)
                self._chain[key] = Told(seq, state, since)
        except sqlite3.Error as err:
            raise SpoolError(f"cannot read spool {str(self.path)!r}: {err}") from err
        epoch = meta.get("epoch")
        self._epoch = epoch if isinstance(epoch, str) and epoch else new_epoch()
        self._dropped = int(meta.get("dropped") or 0)
        self._gap_reported = int(meta.get("gap_reported") or 0)
        # Entries beyond the capacity (it was lowered): drop the oldest now.
        while len(self._queue.entries) > self._queue.capacity:
            self._queue.entries.popitem(last=False)
            self._dropped += 1

    def _probe_write(self, *, reset: bool) -> None:
        """Write once at start, so a spool we could never write refuses to start."""
        try:
            with self._transaction():
                if reset:
                    self._db.execute("DELETE FROM chain")
                self._write_meta()
        except sqlite3.Error as err:
            raise SpoolError(f"cannot write spool {str(self.path)!r}: {err}") from err

    # -- the "sent but unwritten" marker ---------------------------------------------------
    #
    # While writes fail (a full disk), messages are still delivered from memory. If
    # the agent then dies, the next run would number new transitions with seqs that
    # subscribers already received: a silent reuse. So the first failed write sets a
    # marker, one byte in the lock file overwritten in place (no new block, so it
    # works on a full disk), and the next successful write clears it. A run that
    # finds it set starts a new epoch: subscribers see a reset, never a reuse.

    def _lost_writes(self) -> bool:
        return os.pread(self._lock.fileno(), 1, 0) == b"1"

    def _mark_unwritten(self, flag: bool) -> None:
        try:
            os.pwrite(self._lock.fileno(), b"1" if flag else b"0", 0)
        except OSError as err:
            if not flag:
                raise SpoolError(f"cannot write spool lock {str(self.path)!r}: {err}") from err
            log.error(  # noqa: TRY400 - the reason says it all
                "spool.mark_failed", path=str(self.path), reason=str(err)
            )
            return
        self._marked = flag

    def _new_epoch(self) -> None:
        old = self._epoch
        self._epoch = new_epoch()
        self._chain.clear()
        self._dropped = self._gap_reported = 0
        log.warning(
            "spool.epoch_reset",
            path=str(self.path),
            old=old,
            new=self._epoch,
            reason="the last run sent messages it could not write, then stopped",
        )

    # -- the Outbox protocol ------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self._epoch

    def chain(self) -> dict[SeqKey, Told]:
        return dict(self._chain)

    def put(self, message: Message, told: ChainUpdate | None = None) -> int:
        done = self._queue.put(message)
        self._puts[done.entry_id] = message
        if done.superseded is not None:
            self._forget(done.superseded)
        if done.dropped:
            for entry_id in done.dropped:
                self._forget(entry_id)
            self._count_dropped(len(done.dropped))
        if told is not None:
            self._chain[told[0]] = told[1]
            self._told[told[0]] = told[1]
        return done.entry_id

    def pending(self, after: int, limit: int) -> list[tuple[int, Message]]:
        return self._queue.pending(after, limit)

    def ack(self, entry_id: int) -> None:
        if self._queue.ack(entry_id):
            self._forget(entry_id)
            if self._overflowing.active and len(self._queue.entries) < self._queue.capacity:
                self._overflowing.clear(dropped_total=self._dropped)

    def drop(self, entry_id: int) -> None:
        if self._queue.ack(entry_id):
            self._forget(entry_id)
            self._count_dropped(1)

    def __len__(self) -> int:
        return len(self._queue.entries)

    @property
    def dropped(self) -> int:
        """Entries dropped (overflow, or too large for the broker) in this epoch."""
        return self._dropped

    @property
    def gap_reported(self) -> int:
        return self._gap_reported

    def record_gap_reported(self, total: int) -> None:
        if total > self._gap_reported:
            self._gap_reported = total
            self._meta_dirty = True

    @property
    def durable(self) -> bool:
        """Whether everything queued so far is on disk (False during a write fault)."""
        return not (self._puts or self._deletes or self._told or self._meta_dirty)

    def flush(self) -> bool:
        if self._closed:
            return False
        if self.durable:
            return True
        if (
            not (self._puts or self._told or self._meta_dirty)
            and len(self._deletes) < ACK_BATCH
            and self._queue.entries
        ):
            return True  # only acks to write, few, and more to come: later
        now = self._clock()
        if now < self._retry_at:
            return False
        try:
            with self._transaction():
                self._write_journal()
        except sqlite3.Error as err:
            if not self._marked:
                self._mark_unwritten(True)
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            self._failing.hit(
                path=str(self.path),
                reason=str(err),
                unwritten=len(self._puts),
                retry_in=self._retry_delay,
            )
            return False
        self._puts, self._deletes, self._told = {}, set(), {}
        self._meta_dirty = False
        self._retry_delay = RETRY_MIN
        if self._marked:
            self._mark_unwritten(False)
        self._failing.clear(path=str(self.path))
        self.commits += 1
        return True

    def close(self) -> None:
        """Write what is buffered (if the disk lets us) and close the file."""
        if self._closed:
            return
        try:
            self._retry_at = 0.0
            self.flush()
        finally:
            self._closed = True
            self._db.close()
            self._lock.close()  # releases the flock

    # -- the journal ----------------------------------------------------------------------

    def _forget(self, entry_id: int) -> None:
        """An entry left the queue: unwritten, it never needs writing; else delete it."""
        if self._puts.pop(entry_id, None) is None:
            self._deletes.add(entry_id)

    def _count_dropped(self, n: int) -> None:
        self._dropped += n
        self._meta_dirty = True
        self._overflowing.hit(dropped_total=self._dropped, capacity=self._queue.capacity)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _write_journal(self) -> None:
        db = self._db
        if self._puts:
            db.executemany(
                "INSERT INTO entries (id, topic, payload, qos, retain) VALUES (?, ?, ?, ?, ?)",
                [(i, m.topic, m.payload, m.qos, int(m.retain)) for i, m in self._puts.items()],
            )
        if self._deletes:
            db.executemany("DELETE FROM entries WHERE id = ?", [(i,) for i in self._deletes])
        if self._told:
            db.executemany(
                "INSERT OR REPLACE INTO chain (uuid, vcpu, seq, state, since) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (uuid, _DOMAIN if vcpu is None else vcpu, t.seq, t.state, t.since)
                    for (uuid, vcpu), t in self._told.items()
                ],
            )
        self._write_meta()

    def _write_meta(self) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("epoch", self._epoch),
                ("dropped", self._dropped),
                ("gap_reported", self._gap_reported),
            ],
        )
