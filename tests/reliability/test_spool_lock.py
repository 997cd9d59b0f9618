"""One agent per spool file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.outbox import Message
from agent.spool import SpoolError, SqliteSpool


def test_a_second_agent_cannot_open_a_spool_in_use(tmp_path: Path) -> None:
    first = SqliteSpool(tmp_path / "spool.sqlite3", 10)
    try:
        with pytest.raises(SpoolError, match="in use by another vcpu-agent"):
            SqliteSpool(tmp_path / "spool.sqlite3", 10)
    finally:
        first.close()
    # Released on close: the next run opens it and finds what was left.
    again = SqliteSpool(tmp_path / "spool.sqlite3", 10)
    again.close()


def test_the_lock_does_not_survive_the_process(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from agent.spool import SqliteSpool\n"
        "from agent.outbox import Message\n"
        f"s = SqliteSpool({str(tmp_path / 'spool.sqlite3')!r}, 10)\n"
        "s.put(Message('t', b'x', 1, False)); s.flush()\n"
        "os._exit(0)\n"  # no close: as if killed
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    spool = SqliteSpool(tmp_path / "spool.sqlite3", 10)
    try:
        assert [m for _, m in spool.pending(0, 10)] == [Message("t", b"x", 1, False)]
    finally:
        spool.close()
