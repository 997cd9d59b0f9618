"""SerialTruth against a real file written by this process (no guest needed)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lab.truth import SerialTruth


def test_collects_markers_from_a_file_created_after_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    written: list[float] = []
    with SerialTruth(path) as truth:
        with path.open("ab", buffering=0) as f:
            for byte in b"BHB":
                written.append(time.monotonic())
                f.write(bytes([byte]))
                truth.wait_for(len(written), timeout_s=10)
        markers = truth.markers()
    assert [m.phase for m in markers] == ["busy", "halted", "busy"]
    # Each stamp is taken after its byte was written, and before the next one.
    for marker, t_write, t_next in zip(
        markers, written, [*written[1:], time.monotonic()], strict=True
    ):
        assert t_write <= marker.t_mono <= t_next
    assert truth.stats().coalesced == 0


def test_ignores_bytes_other_than_markers(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"boot noise\r\n")
    with SerialTruth(path) as truth:
        with path.open("ab") as f:
            f.write(b"xHy")
        truth.wait_for(1, timeout_s=10)
    assert [m.phase for m in truth.markers()] == ["halted"]
    assert truth.stats().ignored_bytes == len(b"boot noise\r\n") + 2


def test_markers_arriving_together_share_one_stamp_and_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    with SerialTruth(path) as truth:
        path.write_bytes(b"BHBH")
        markers = truth.wait_for(4, timeout_s=10)
    assert len({m.t_mono for m in markers}) == 1
    assert truth.stats().coalesced == 3


def test_wait_for_times_out_when_nothing_arrives(tmp_path: Path) -> None:
    with SerialTruth(tmp_path / "serial.log") as truth, pytest.raises(TimeoutError):
        truth.wait_for(1, timeout_s=0.2)


def test_wakes_waiters_from_another_thread(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    with SerialTruth(path) as truth:
        writer = threading.Thread(target=path.write_bytes, args=(b"B",))
        writer.start()
        assert [m.phase for m in truth.wait_for(1, timeout_s=10)] == ["busy"]
        writer.join()
