"""The /proc schedstat source against real processes and the real kernel.

QEMU is stood in for by a small child process started with ``-uuid <uuid>`` on
its command line, whose threads name themselves ``CPU <n>/TCG`` with
prctl(PR_SET_NAME), as QEMU's do with debug-threads=on; each thread spins or
sleeps on command. The kernel's /proc and schedstat are the real thing; the
real-guest check against libvirt's own counters is tests/e2e/test_schedstat.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.classify import Thresholds
from agent.model import (
    DomainRecord,
    DomainState,
    RecordOrigin,
    Source,
    VcpuRecord,
    VcpuState,
)
from agent.schedstat import SchedstatSource, parse_schedstat, vcpu_of_thread
from agent.transitions import HostState, VcpuTransition, advance

FAKE_QEMU = r"""
import ctypes, sys, threading, time
libc = ctypes.CDLL(None)
mode = {}
stop = {}

def vcpu(name, named):
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME, as QEMU names vCPU threads
    named.set()
    while not stop.get(name):
        if mode.get(name) == "busy":
            t = time.monotonic()
            while time.monotonic() - t < 0.01:
                pass
        else:
            time.sleep(0.01)

threads = {}

def add(name):
    named = threading.Event()
    threads[name] = threading.Thread(target=vcpu, args=(name, named))
    threads[name].start()
    named.wait()

for n in sys.argv[3].split(","):
    add(n)
print("ready", flush=True)
for line in sys.stdin:  # "add <name>" or "<name> busy|idle|exit"
    if line.startswith("add "):
        add(line[4:].strip())
    else:
        name, what = line.strip().rsplit(" ", 1)
        if what == "exit":
            stop[name] = True
            threads[name].join()
        else:
            mode[name] = what
    print("ok", flush=True)
"""


class FakeQemu:
    """A real process with QEMU's command-line uuid and thread names."""

    def __init__(self, uuid: str, names: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_QEMU, "-uuid", uuid, ",".join(names)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def uuid() -> str:
    return str(uuidlib.uuid4())


@pytest.fixture
def qemu(uuid: str) -> Iterator[FakeQemu]:
    q = FakeQemu(uuid, ["CPU 0/TCG", "CPU 1/TCG"])
    yield q
    q.stop()


def record(uuid: str, *, current: int = 2, maximum: int = 2, t: float = 0.0) -> DomainRecord:
    return DomainRecord(
        name="guest",
        uuid=uuid,
        state=DomainState.RUNNING,
        reason=1,
        origin=RecordOrigin.BULK,
        vcpu_current=current,
        vcpu_maximum=maximum,
        vcpus=tuple(VcpuRecord(n, 1, 10_000_000 * n) for n in range(maximum)),
        t_mono=t,
        t_wall=t,
    )


def pidfile(run_dir: Path, pid: int) -> None:
    (run_dir / "guest.pid").write_text(f"{pid}\n")


def test_parses_run_and_wait_nanoseconds() -> None:
    assert parse_schedstat(b"5585074882 146298255 1760\n") == (5585074882, 146298255)
    with pytest.raises(ValueError, match="expected 3 fields"):
        parse_schedstat(b"12\n")


def test_knows_qemu_vcpu_thread_names_and_nothing_else() -> None:
    assert vcpu_of_thread("CPU 0/KVM\n") == 0
    assert vcpu_of_thread("CPU 13/TCG") == 13
    assert vcpu_of_thread("ALL CPUs/TCG") is None
    assert vcpu_of_thread("IO mon_iothread") is None
    assert vcpu_of_thread("qemu-system-x86") is None


def test_reads_each_vcpu_threads_counters_in_nanoseconds(
    run_dir: Path, uuid: str, qemu: FakeQemu
) -> None:
    pidfile(run_dir, qemu.pid)
    src = SchedstatSource(run_dir=run_dir)
    base = record(uuid)
    assert src.attach(base), src.refused
    qemu.say("CPU 0/TCG busy")
    a = src.read(base, time.monotonic(), time.time())
    time.sleep(0.5)
    b = src.read(base, time.monotonic(), time.time())
    assert a is not None
    assert b is not None
    assert b.origin is RecordOrigin.SCHEDSTAT
    assert b.state is DomainState.RUNNING
    run0 = (b.vcpus[0].time_ns or 0) - (a.vcpus[0].time_ns or 0)
    run1 = (b.vcpus[1].time_ns or 0) - (a.vcpus[1].time_ns or 0)
    dt = (b.t_mono - a.t_mono) * 1e9
    busy0 = (run0 + (b.vcpus[0].delay_ns or 0) - (a.vcpus[0].delay_ns or 0)) / dt
    assert busy0 > 0.5  # ran, or waited for a CPU on a loaded host
    assert run1 / dt < 0.2  # sleeps between 10 ms naps
    assert run1 % 10_000_000 != 0  # ns, not libvirt's 10 ms ticks
    src.close()


def test_refuses_a_pid_file_that_names_another_process(run_dir: Path, uuid: str) -> None:
    other = FakeQemu(str(uuidlib.uuid4()), ["CPU 0/TCG", "CPU 1/TCG"])
    try:
        pidfile(run_dir, other.pid)  # a stale pid file whose pid now runs something else
        src = SchedstatSource(run_dir=run_dir)
        assert not src.attach(record(uuid))
        assert "not the QEMU of domain" in src.refused[uuid]
    finally:
        other.stop()


def test_refuses_single_threaded_tcg(run_dir: Path, uuid: str) -> None:
    q = FakeQemu(uuid, ["ALL CPUs/TCG"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        assert not src.attach(record(uuid))
        assert "single-threaded" in src.refused[uuid]
    finally:
        q.stop()


def test_refuses_a_domain_without_a_pid_file_or_not_running(
    run_dir: Path, uuid: str, qemu: FakeQemu
) -> None:
    src = SchedstatSource(run_dir=run_dir)
    assert not src.attach(record(uuid))
    assert "guest.pid" in src.refused[uuid]
    pidfile(run_dir, qemu.pid)
    assert src.attach(record(uuid))
    paused = replace(record(uuid), state=DomainState.PAUSED)
    assert not src.attach(paused)
    assert uuid not in src


def test_a_thread_that_exits_drops_the_domain_until_attached_again(
    run_dir: Path, uuid: str, qemu: FakeQemu
) -> None:
    pidfile(run_dir, qemu.pid)
    src = SchedstatSource(run_dir=run_dir)
    base = record(uuid)
    assert src.attach(base)
    qemu.say("CPU 1/TCG exit")  # unplugged: QEMU ends the vCPU's thread
    assert src.read(base, 1.0, 1.0) is None
    assert uuid not in src
    assert not src.attach(base)  # libvirt still says 2 online: thread 1 is missing
    assert "no thread for vCPU(s) [1]" in src.refused[uuid]
    assert src.attach(record(uuid, current=1))  # libvirt caught up: vCPU 1 offline


def test_a_hot_plugged_vcpu_is_found_at_the_next_attach(run_dir: Path, uuid: str) -> None:
    q = FakeQemu(uuid, ["CPU 0/TCG"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        assert src.attach(record(uuid, current=1, maximum=2))
        q.say("add CPU 1/TCG")
        assert src.attach(record(uuid, current=2, maximum=2))
        fresh = src.read(record(uuid, current=2, maximum=2), 1.0, 1.0)
        assert fresh is not None
        assert all(v.time_ns is not None for v in fresh.vcpus)
    finally:
        q.stop()


def test_a_hot_plugged_vcpus_new_thread_hands_the_domain_back_to_libvirt_at_once(
    run_dir: Path, uuid: str
) -> None:
    q = FakeQemu(uuid, ["CPU 0/TCG"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        base = record(uuid, current=1, maximum=2)
        assert src.attach(base)
        q.say("add worker")  # other threads come and go: still served
        assert src.read(base, 1.0, 1.0) is not None
        q.say("add CPU 1/TCG")  # no libvirt event for a hot-plug, but a thread
        assert src.read(base, 2.0, 2.0) is None
        assert uuid not in src  # libvirt's next look sees vcpu.current = 2
    finally:
        q.stop()


def test_a_vcpu_thread_libvirt_does_not_count_yet_keeps_the_domain_with_libvirt(
    run_dir: Path, uuid: str, qemu: FakeQemu
) -> None:
    # Mid hot-plug QEMU runs the new thread before libvirt's vcpu.current follows.
    # Attached then, the thread would count as seen and the plug go unnoticed until
    # a later bulk call (CI saw 2.7 s): the domain waits until the two agree.
    pidfile(run_dir, qemu.pid)
    src = SchedstatSource(run_dir=run_dir)
    assert not src.attach(record(uuid, current=1, maximum=2))
    assert "[1]" in src.refused[uuid]
    assert src.attach(record(uuid, current=2, maximum=2))  # libvirt caught up
    assert uuid not in src.refused


def test_a_domain_at_its_vcpu_maximum_is_not_looked_at_for_new_threads(
    run_dir: Path, uuid: str
) -> None:
    # Nothing can be plugged into it, so a tick spares the fstat: a thread named
    # like a vCPU (whatever QEMU starts) does not hand it back to libvirt.
    q = FakeQemu(uuid, ["CPU 0/TCG", "CPU 1/TCG"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        base = record(uuid, current=2, maximum=2)
        assert src.attach(base)
        q.say("add CPU 2/TCG")
        assert src.read(base, 1.0, 1.0) is not None
    finally:
        q.stop()


def test_a_restarted_qemu_is_followed_to_its_new_pid(run_dir: Path, uuid: str) -> None:
    first = FakeQemu(uuid, ["CPU 0/TCG", "CPU 1/TCG"])
    pidfile(run_dir, first.pid)
    src = SchedstatSource(run_dir=run_dir)
    assert src.attach(record(uuid))
    first.stop()
    assert src.read(record(uuid), 1.0, 1.0) is None  # its threads are gone (ESRCH)
    second = FakeQemu(uuid, ["CPU 0/TCG", "CPU 1/TCG"])
    try:
        pidfile(run_dir, second.pid)
        assert src.attach(record(uuid))
        assert src.read(record(uuid), 1.0, 1.0) is not None
    finally:
        second.stop()


def test_offline_vcpus_keep_libvirts_record(run_dir: Path, uuid: str) -> None:
    q = FakeQemu(uuid, ["CPU 0/TCG"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        base = record(uuid, current=1, maximum=2)
        assert src.attach(base)
        fresh = src.read(base, 1.0, 1.0)
        assert fresh is not None
        assert fresh.vcpus[1] == VcpuRecord(1, 1)  # no counters: classified offline
    finally:
        q.stop()


def test_kvm_vcpus_stay_with_libvirt_unless_asked(run_dir: Path, uuid: str) -> None:
    q = FakeQemu(uuid, ["CPU 0/KVM", "CPU 1/KVM"])
    try:
        pidfile(run_dir, q.pid)
        src = SchedstatSource(run_dir=run_dir)
        assert not src.attach(record(uuid))
        assert "KVM" in src.refused[uuid]
        assert SchedstatSource(run_dir=run_dir, kvm=True).attach(record(uuid))
        src.proc = run_dir / "nowhere"  # the same refusal is not scanned again
        assert not src.attach(record(uuid))
        assert "KVM" in src.refused[uuid]
    finally:
        q.stop()


def test_s390s_halted_flag_stays_with_libvirt(run_dir: Path, uuid: str, qemu: FakeQemu) -> None:
    pidfile(run_dir, qemu.pid)
    base = record(uuid)
    s390 = replace(base, vcpus=tuple(v._replace(halted=False) for v in base.vcpus))
    src = SchedstatSource(run_dir=run_dir)
    assert not src.attach(s390)


def _kvm_record(uuid: str, t: float, busy_ns: int, halt_ns: int) -> DomainRecord:
    base = record(uuid, current=1, maximum=1, t=t)
    return replace(base, vcpus=(VcpuRecord(0, 1, busy_ns, None, halt_ns, 0),))


def test_a_kvm_domain_moved_to_proc_counters_is_not_called_unknown() -> None:
    """libvirt's KVM records, then /proc records without KVM's halt-wait: the
    missing key is not a stuck monitor, and the /proc counters decide."""
    uuid = str(uuidlib.uuid4())
    th = Thresholds()
    host = HostState()
    t, busy = 0.0, 0
    for _ in range(3):  # running under libvirt's KVM stats
        host, _ = advance(host, [_kvm_record(uuid, t, busy, 0)], th, complete=True)
        t, busy = t + 1.0, busy + 1_000_000_000
    seen = []
    for _ in range(6):  # now /proc: the vCPU halts (no run time)
        proc = replace(
            record(uuid, current=1, maximum=1, t=t),
            origin=RecordOrigin.SCHEDSTAT,
            vcpus=(VcpuRecord(0, 1, busy, None, None, 0),),
        )
        host, changes = advance(host, [proc], th, complete=True)
        seen += [c for c in changes if isinstance(c, VcpuTransition)]
        t += 1.0
    assert [(c.before.state, c.after.state, c.after.source) for c in seen] == [
        (VcpuState.RUNNING, VcpuState.HALTED, Source.CPUTIME)
    ]
