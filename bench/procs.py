"""CPU and memory of processes from /proc, to the nanosecond.

``/proc/<pid>/stat`` counts utime + stime in 10 ms ticks: over a 30 s window of a
tool that spends 1 ms per second that is 3 ticks, too coarse to compare tools.
``/proc/<pid>/task/<tid>/schedstat`` gives each thread's run time in ns (the
scheduler's ``sum_exec_runtime``), so a process's CPU is the sum over its threads.
A thread that exits inside a window takes its time with it: the tools measured
here keep their threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def thread_ns(pid: int) -> int:
    """Run time of every live thread of ``pid``, ns (0 if the process is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


def split_ns(pid: int) -> tuple[int, int]:
    """(run ns of QEMU's vCPU threads, run ns of its other threads): QMP work
    lands on the main loop and monitor threads, a vCPU kick on the vCPU threads."""
    vcpu = other = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0
    for tid in tids:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                run = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if comm.startswith("CPU "):
            vcpu += run
        else:
            other += run
    return vcpu, other


def cpu_ns(pids: Iterable[int]) -> int:
    return sum(thread_ns(pid) for pid in pids)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """``pid`` and all its descendants (a tool that forks helpers pays for them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def pids_named(comm: str) -> list[int]:
    """Every process whose ``comm`` is exactly ``comm``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                    found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return found


def qemu_pid(domain_name: str) -> int:
    """libvirt's pid file for a running QEMU domain (world-readable here)."""
    return int(Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text().strip())
