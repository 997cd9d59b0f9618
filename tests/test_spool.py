"""The durable outbox on real SQLite files: restarts, the chain, faults at start
and while running (a real full filesystem, a real unprivileged user)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.delivery import Message, Told
from agent.spool import FORMAT, SpoolError, SqliteSpool

ROOT = Path(__file__).parents[1]


def event(n: int, topic: str = "h/d/vcpu/0/transition") -> Message:
    return Message(topic, f'{{"seq":{n}}}'.encode(), 1, False)


def state(n: int, topic: str = "h/d/vcpu/0/state") -> Message:
    return Message(topic, f'{{"seq":{n}}}'.encode(), 1, True)


@contextlib.contextmanager
def opened(path: Path, capacity: int = 100) -> Iterator[SqliteSpool]:
    spool = SqliteSpool(path, capacity)
    try:
        yield spool
    finally:
        spool.close()


def test_a_reopened_spool_has_the_queue_the_chain_and_the_epoch_of_the_last_run(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.sqlite3"
    with opened(path) as spool:
        epoch = spool.epoch
        first = spool.put(event(1), (("u", 0), Told(1, "halted", 10.0)))
        spool.put(state(1))
        spool.put(event(2), (("u", None), Told(2)))
        spool.ack(first)
        assert spool.flush()
    with opened(path) as spool:
        assert spool.epoch == epoch
        assert [m for _, m in spool.pending(0, 10)] == [state(1), event(2)]
        assert spool.chain() == {("u", 0): Told(1, "halted", 10.0), ("u", None): Told(2)}


def test_a_newer_retained_state_replaces_a_queued_one_and_goes_to_the_back(
    tmp_path: Path,
) -> None:
    with opened(tmp_path / "s.sqlite3") as spool:
        spool.put(state(1))
        spool.put(event(2))
        spool.put(state(2))
        assert [m for _, m in spool.pending(0, 10)] == [event(2), state(2)]
        spool.flush()
    with opened(tmp_path / "s.sqlite3") as spool:
        assert [m for _, m in spool.pending(0, 10)] == [event(2), state(2)]


def test_overflow_drops_the_oldest_and_the_count_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with opened(path, capacity=3) as spool:
        for n in range(1, 6):
            spool.put(event(n))
        assert [m for _, m in spool.pending(0, 10)] == [event(3), event(4), event(5)]
        assert spool.dropped == 2
        spool.record_gap_reported(2)
    with opened(path, capacity=3) as spool:
        assert (spool.dropped, spool.gap_reported) == (2, 2)
        assert len(spool) == 3


def test_an_entry_the_broker_can_never_take_is_dropped_and_counted(tmp_path: Path) -> None:
    with opened(tmp_path / "s.sqlite3") as spool:
        big = spool.put(event(1))
        spool.put(event(2))
        spool.drop(big)
        assert [m for _, m in spool.pending(0, 10)] == [event(2)]
        assert spool.dropped == 1


def test_a_spool_in_use_by_another_agent_is_refused(tmp_path: Path) -> None:
    with (
        opened(tmp_path / "s.sqlite3"),
        pytest.raises(SpoolError, match="in use by another vcpu-agent"),
    ):
        SqliteSpool(tmp_path / "s.sqlite3", 10)
    with opened(tmp_path / "s.sqlite3"):  # released on close
        pass


def test_the_lock_and_every_flushed_entry_survive_a_killed_process(tmp_path: Path) -> None:
    code = (
        "import os\n"
        "from agent.spool import SqliteSpool\n"
        "from agent.delivery import Message\n"
        f"s = SqliteSpool({str(tmp_path / 's.sqlite3')!r}, 10)\n"
        "s.put(Message('t', b'x', 1, False)); s.flush()\n"
        "s.put(Message('t', b'not flushed', 1, False))\n"
        "os._exit(0)\n"  # no close: as if killed
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with opened(tmp_path / "s.sqlite3") as spool:
        assert [m for _, m in spool.pending(0, 10)] == [Message("t", b"x", 1, False)]


def test_a_corrupt_spool_is_moved_aside_and_a_new_epoch_starts(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with opened(path) as spool:
        old_epoch = spool.epoch
        spool.put(event(1), (("u", 0), Told(1, "running", 1.0)))
    path.write_bytes(b"this is not SQLite " * 300)
    with capture_logs() as logs, opened(path) as spool:
        assert spool.epoch != old_epoch
        assert spool.chain() == {}
        assert len(spool) == 0
    (line,) = [entry for entry in logs if entry["event"] == "spool.corrupt"]
    aside = Path(str(line["moved_to"]))
    assert aside.read_bytes().startswith(b"this is not SQLite")
    assert aside.parent == tmp_path


def test_a_spool_of_another_format_is_moved_aside_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE events (id INTEGER PRIMARY KEY); PRAGMA user_version = 1;")
    db.close()
    with capture_logs() as logs, opened(path) as spool:
        assert len(spool) == 0
    assert [entry["reason"] for entry in logs if entry["event"] == "spool.corrupt"] == [
        f"spool format 1, this agent writes {FORMAT}"
    ]


def test_a_spool_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.sqlite3").mkdir()
    with pytest.raises(SpoolError, match="not a regular file"):
        SqliteSpool(tmp_path / "s.sqlite3", 10)


def test_a_spool_file_the_agent_user_cannot_write_is_refused_at_start(tmp_path: Path) -> None:
    # The unit runs the agent unprivileged; root would write a 0444 file anyway.
    # The directory is writable (the lock and WAL files can be made), the file not.
    where = Path(tempfile.mkdtemp(prefix="vcpu-agent-ro-", dir="/tmp"))
    os.chown(where, 65534, 65534)
    path = where / "s.sqlite3"
    with opened(path):
        pass
    for name in os.listdir(where):
        os.chown(where / name, 65534, 65534)
    path.chmod(0o444)
    code = (
        "from agent.spool import SqliteSpool, SpoolError\n"
        "try:\n"
        f"    SqliteSpool({str(path)!r}, 10)\n"
        "except SpoolError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(where)
    assert "cannot write spool" in out.stdout
    assert "readonly" in out.stdout


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def fill(fs: Path) -> Path:
    filler = fs / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as out:
        while True:
            out.write(b"\0" * 4096)
    return filler


def test_a_disk_that_fills_while_running_keeps_events_in_memory_and_writes_them_later(
    small_fs: Path,
) -> None:
    ticks = [0.0]
    path = small_fs / "s.sqlite3"
    spool = SqliteSpool(path, 1000, clock=lambda: ticks[0])
    try:
        spool.put(event(0))
        assert spool.flush()
        filler = fill(small_fs)
        big = b"x" * 1000
        with capture_logs() as logs:
            for n in range(1, 101):
                spool.put(Message("h/d/vcpu/0/transition", big + str(n).encode(), 1, False))
                ticks[0] += 0.01
                assert not spool.flush() or n < 5  # a little room may be left at first
            # Every event is still there to deliver, in order, from memory.
            sent = spool.pending(0, 1000)
            assert len(sent) == 101
            assert [m.payload[-3:] for _, m in sent[-2:]] == [b"x99", b"100"]
            filler.unlink()
            ticks[0] += 60.0  # past the retry backoff
            assert spool.flush()
        failures = [e for e in logs if e["event"] == "spool.write_failed"]
        assert 1 <= len(failures) <= 2  # one when it starts, at most one reminder
        assert [e["event"] for e in logs if e["event"] == "spool.write_failed.ended"] == [
            "spool.write_failed.ended"
        ]
    finally:
        spool.close()
    with opened(path, 1000) as again:
        assert len(again) == 101


def test_a_run_killed_while_its_disk_was_full_makes_the_next_run_start_a_new_epoch(
    small_fs: Path,
) -> None:
    # Messages sent while the disk was full were never written: had the next run
    # kept the epoch, it would give new transitions the seqs subscribers already hold.
    path = small_fs / "s.sqlite3"
    code = (
        "import contextlib, os, sys\n"
        "from agent.delivery import Message, Told\n"
        "from agent.spool import SqliteSpool\n"
        f"s = SqliteSpool({str(path)!r}, 1000)\n"
        "s.put(Message('t', b'x', 1, False), (('u', 0), Told(1, 'halted', 1.0)))\n"
        "assert s.flush()\n"
        "print(s.epoch, flush=True)\n"
        f"with contextlib.suppress(OSError), open({str(small_fs / 'filler')!r}, 'wb', 0) as f:\n"
        "    while True: f.write(bytes(4096))\n"
        "s.put(Message('t', b'y' * 2000, 1, False), (('u', 0), Told(2, 'running', 2.0)))\n"
        "assert not s.flush()  # what the publisher then sends is not on disk\n"
        "os._exit(0)\n"  # killed before the disk had room again
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    first_epoch = out.stdout.splitlines()[0]  # then its (unconfigured) log lines
    (small_fs / "filler").unlink()
    with capture_logs() as logs, opened(path, 1000) as spool:
        assert spool.epoch != first_epoch
        assert spool.chain() == {}  # seqs start at 1 in the new epoch
        assert [m for _, m in spool.pending(0, 10)] == [Message("t", b"x", 1, False)]
    assert [e["old"] for e in logs if e["event"] == "spool.epoch_reset"] == [first_epoch]
    with opened(path, 1000) as again:  # the marker was cleared: no second reset
        assert again.epoch == spool.epoch


def test_a_run_killed_with_everything_written_keeps_its_epoch(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    code = (
        "import os\n"
        "from agent.spool import SqliteSpool\n"
        f"s = SqliteSpool({str(path)!r}, 10)\n"
        "print(s.epoch, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    with opened(path) as spool:
        assert spool.epoch == out.stdout.strip()


def test_acks_alone_are_written_in_batches_and_once_the_queue_drains(tmp_path: Path) -> None:
    with opened(tmp_path / "s.sqlite3", 10_000) as spool:
        ids = [spool.put(event(n)) for n in range(600)]
        assert spool.flush()
        before = spool.commits
        for entry_id in ids[:10]:
            spool.ack(entry_id)
        assert spool.flush()
        assert spool.commits == before  # ten deletes can wait for more
        for entry_id in ids[10:]:
            spool.ack(entry_id)
        assert spool.flush()
        assert spool.commits == before + 1  # a batch, and the queue is empty now
    with opened(tmp_path / "s.sqlite3", 10_000) as again:
        assert len(again) == 0
