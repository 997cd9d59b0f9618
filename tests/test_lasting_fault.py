from __future__ import annotations

from structlog.testing import capture_logs

from agent import logs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_fault_hit_four_times_a_second_for_ten_minutes_logs_a_line_a_minute() -> None:
    clock = Clock()
    fault = logs.LastingFault(logs.get("t"), "sample.skipped", every=60.0, clock=clock)
    with capture_logs() as lines:
        for _ in range(4 * 600):
            fault.hit(reason="busy")
            clock.now += 0.25
        fault.clear()
    names = [(line["event"], line.get("ongoing", False)) for line in lines]
    assert names[0] == ("sample.skipped", False)
    assert names[-1] == ("sample.skipped.ended", False)
    reminders = [line for line in lines if line.get("ongoing")]
    assert len(reminders) == 9  # at 60 s, 120 s ... 540 s
    assert all(line["count"] == 240 for line in reminders)
    assert lines[-1]["count"] == 2400
    assert lines[-1]["lasted_s"] == 600.0  # cleared after the last 0.25 s step


def test_clear_without_a_fault_logs_nothing_and_a_new_fault_starts_over() -> None:
    clock = Clock()
    fault = logs.LastingFault(logs.get("t"), "spool.write_failed", clock=clock)
    with capture_logs() as lines:
        fault.clear()
        fault.hit()
        fault.clear()
        fault.hit()
    assert [line["event"] for line in lines] == [
        "spool.write_failed",
        "spool.write_failed.ended",
        "spool.write_failed",
    ]
    assert fault.active
