"""vCPU counters straight from the kernel: /proc/<qemu pid>/task/<tid>/schedstat.

QEMU names each vCPU thread ``CPU <n>/KVM`` or ``CPU <n>/TCG`` (libvirt starts
it with ``-name ...,debug-threads=on``), and the kernel keeps, per thread, the
time it ran and the time it waited runnable for a host CPU, both in ns:
``/proc/<pid>/task/<tid>/schedstat`` is ``<run ns> <run-queue wait ns> <slices>``.
libvirt's own ``vcpu.<n>.time`` is the same thread's utime + stime in 10 ms
ticks, and its ``vcpu.<n>.delay`` is the same wait field (docs/platform.md has
the measurement), so these records continue a libvirt stream of the same
domain. Reading them asks nothing of libvirtd or QEMU: no RPC, no monitor
command, no vCPU kicked out of the guest.

Finding the threads (docs/platform.md, "The schedstat source"):

- the pid from libvirt's ``/run/libvirt/qemu/<name>.pid``, accepted only if that
  process's command line carries ``-uuid <the domain's UUID>`` (a stale pid file,
  or a pid reused by another process, is refused);
- the vCPU threads by name in ``/proc/<pid>/task/*/comm``. Single-threaded TCG
  runs every vCPU in one thread, ``ALL CPUs/TCG``: no per-vCPU counters there, so
  such a domain stays with libvirt;
- a new vCPU thread (a hot-plug) is looked for at every read of a domain below
  its ``vcpu.maximum``, by the link count of ``/proc/<pid>/task`` (one fstat):
  the domain then goes back to libvirt;
- each thread's schedstat file is opened once and re-read with ``pread`` at
  offset 0. An open /proc file is bound to that very task: a thread that exits
  (unplug, QEMU stopped) makes the read fail with ESRCH, and a recycled pid or tid
  can never be read through it. A failed read drops the domain's threads; the next
  libvirt sample finds them again (a restart, a hot-plugged vCPU).

Nothing here blocks: /proc reads take no lock QEMU or libvirtd holds, so they
run on the event loop.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.model import DomainRecord, RecordOrigin, VcpuRecord, VcpuRunState

RUN_DIR = Path("/run/libvirt/qemu")
PROC = Path("/proc")
_VCPU_THREAD = re.compile(r"CPU (\d+)/(KVM|TCG|HVF|WHPX|NVMM)")
SINGLE_THREADED = "ALL CPUs/TCG"  # QEMU's round-robin TCG: one thread for all vCPUs


class UnavailableError(Exception):
    """This domain's vCPU threads cannot be read from /proc; ``str()`` says why."""


@dataclass(slots=True)
class _Threads:
    """One domain's QEMU process and the open schedstat file of each vCPU thread."""

    pid: int
    fds: dict[int, int]  # vCPU number -> fd of its thread's schedstat
    task: str = ""  # /proc/<pid>/task
    # st_nlink of /proc/<pid>/task is 2 + the number of threads, computed when asked:
    # one fstat of the open directory per read tells whether a thread came or went
    # (a hot-plugged vCPU starts a thread). fstat, not stat: no path walk.
    task_fd: int = -1
    nlink: int = 0
    known: frozenset[str] = frozenset()  # the tids seen when nlink was taken

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.task_fd >= 0:
            os.close(self.task_fd)
            self.task_fd = -1


def parse_schedstat(raw: bytes) -> tuple[int, int]:
    """``b"<run ns> <wait ns> <slices>\\n"`` -> (run ns, wait ns)."""
    fields = raw.split()
    if len(fields) < 2:
        raise ValueError(f"schedstat: expected 3 fields, got {raw!r}")
    return int(fields[0]), int(fields[1])


def vcpu_of_thread(comm: str) -> int | None:
    """``CPU 3/KVM`` -> 3; any other thread name -> None."""
    m = _VCPU_THREAD.fullmatch(comm.strip())
    return int(m.group(1)) if m else None


class SchedstatSource:
    """Per-vCPU run and wait counters of running QEMU domains, read from /proc.

    ``attach`` (after each libvirt sample) finds or checks a domain's threads;
    ``read`` builds a fresh record from a libvirt record's structure (domain state,
    online vCPUs, run states) and the threads' counters now.
    """

    def __init__(self, *, run_dir: Path = RUN_DIR, proc: Path = PROC, kvm: bool = False) -> None:
        self.run_dir = run_dir
        self.proc = proc
        # KVM vCPUs stay with libvirt by default: against the truth guests at 0.2 s,
        # CPU time from /proc missed 1 and invented 11 of 93 changes where KVM's
        # halt-wait (libvirt's bulk call) got every one (docs/benchmarks.md).
        self.kvm = kvm
        self._domains: dict[str, _Threads] = {}  # UUID -> threads
        self.refused: dict[str, str] = {}  # UUID -> why it stays with libvirt
        # UUID -> (pid, online vCPUs) of the last refusal: the same process with the
        # same vCPUs is not scanned again on every libvirt sample.
        self._refused_key: dict[str, tuple[int, frozenset[int]]] = {}

    def __contains__(self, uuid: str) -> bool:
        return uuid in self._domains

    def attach(self, record: DomainRecord) -> bool:
        """Make sure ``record``'s domain is served; False (reason in ``refused``) if not.

        Only a running domain whose every online vCPU has a thread of its own is
        served. Cheap when nothing changed: no file is read.
        """
        uuid = record.uuid
        if not record.state.vcpus_active or record.vcpu_current is None:
            self.forget(uuid)
            return False
        if any(v.halted is not None for v in record.vcpus):
            # s390: libvirt's halted flag is a fact /proc cannot tell.
            self._refuse(uuid, "libvirt reports vcpu.<n>.halted (s390)")
            return False
        wanted = {v.vcpu for v in record.vcpus[: record.vcpu_current]}
        wanted -= {v.vcpu for v in record.vcpus if v.state == VcpuRunState.OFFLINE}
        have = self._domains.get(uuid)
        if have is not None and wanted <= have.fds.keys():
            # Served already, every wanted vCPU's file open: those files are bound to
            # that very process (a read fails once it exits, and the domain is
            # forgotten), so its pid file need not be read again.
            return True
        try:
            pid = self._pid(record.name)
            if self._refused_key.get(uuid) == (pid, frozenset(wanted)):
                return False
            self.forget(uuid)  # a vCPU was plugged: open them all again
            try:
                self._domains[uuid] = self._open(pid, uuid, wanted)
            except UnavailableError:
                self._refused_key[uuid] = (pid, frozenset(wanted))
                raise
        except UnavailableError as err:
            self._refuse(uuid, str(err))
            return False
        self.refused.pop(uuid, None)
        self._refused_key.pop(uuid, None)
        return True

    def read(self, base: DomainRecord, t_mono: float, t_wall: float) -> DomainRecord | None:
        """``base`` with every served vCPU's counters read now; None if a thread is gone."""
        threads = self._domains.get(base.uuid)
        if threads is None:
            return None
        pluggable = base.vcpu_maximum is None or (base.vcpu_current or 0) < base.vcpu_maximum
        if pluggable and self._new_vcpu_thread(threads):
            # Hot-plugged: libvirt has no event for it, but QEMU started a thread.
            # Hand the domain back to libvirt, which learns vcpu.current at once.
            # (A domain at its vcpu.maximum has no vCPU to plug: no look, no fstat.)
            self.forget(base.uuid)
            return None
        fds = threads.fds
        vcpus = []
        try:
            for v in base.vcpus:
                fd = fds.get(v.vcpu)
                if fd is None:
                    vcpus.append(VcpuRecord(v.vcpu, v.state))
                    continue
                run, wait = parse_schedstat(os.pread(fd, 96, 0))
                vcpus.append(VcpuRecord(v.vcpu, v.state, run, None, None, wait))
        except (OSError, ValueError):
            # ESRCH: the thread exited (unplug, QEMU gone). Drop the domain: the
            # next libvirt sample attaches again or says why not.
            self.forget(base.uuid)
            return None
        # Positional: dataclasses.replace cost as much as reading every counter.
        return DomainRecord(
            base.name,
            base.uuid,
            base.state,
            base.reason,
            RecordOrigin.SCHEDSTAT,
            base.vcpu_current,
            base.vcpu_maximum,
            tuple(vcpus),
            t_mono,
            t_wall,
            0.0,
        )

    def forget(self, uuid: str) -> None:
        threads = self._domains.pop(uuid, None)
        if threads is not None:
            threads.close()

    def retain(self, uuids: Iterable[str]) -> None:
        """Forget every domain not in ``uuids`` (after a complete libvirt sample)."""
        keep = set(uuids)
        for uuid in [u for u in self._domains if u not in keep]:
            self.forget(uuid)
        for uuid in [u for u in self.refused if u not in keep]:
            del self.refused[uuid]
            self._refused_key.pop(uuid, None)

    def close(self) -> None:
        for uuid in list(self._domains):
            self.forget(uuid)

    # -- discovery ------------------------------------------------------------------

    def _refuse(self, uuid: str, why: str) -> None:
        self.forget(uuid)
        self.refused[uuid] = why

    def _pid(self, name: str) -> int:
        # Read on every libvirt sample of a domain /proc does not serve (to see a
        # restarted QEMU): plain os calls, pathlib's cost as much as the read.
        path = f"{self.run_dir}/{name}.pid"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return int(os.read(fd, 32))
            finally:
                os.close(fd)
        except (OSError, ValueError) as err:
            raise UnavailableError(f"{path}: {err}") from err

    def _start_time(self, pid: int) -> int:
        raw = (self.proc / str(pid) / "stat").read_text()
        return int(raw[raw.rindex(")") + 2 :].split()[19])  # field 22: starttime

    def _open(self, pid: int, uuid: str, wanted: set[int]) -> _Threads:
        base = self.proc / str(pid)
        try:
            start = self._start_time(pid)
            self._check_uuid(base, uuid)
            tids = os.listdir(base / "task")
        except (OSError, ValueError, IndexError) as err:
            # ProtectProc=invisible hides other users' processes: ENOENT here.
            raise UnavailableError(f"{base}: {err}") from err
        threads = _Threads(pid, {}, str(base / "task"))
        try:
            try:
                threads.task_fd = os.open(threads.task, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                threads.nlink = os.fstat(threads.task_fd).st_nlink
            except OSError as err:  # QEMU exited since the listing
                raise UnavailableError(f"{threads.task}: {err}") from err
            threads.known = frozenset(tids)
            self._open_vcpus(base, tids, wanted, threads.fds, kvm=self.kvm)
            self._same_process(pid, start)
        except BaseException:
            threads.close()
            raise
        return threads

    @staticmethod
    def _new_vcpu_thread(threads: _Threads) -> bool:
        """Whether a vCPU thread not served yet has appeared since the last look."""
        try:
            nlink = os.fstat(threads.task_fd).st_nlink
            if nlink == threads.nlink:
                return False
            tids = frozenset(os.listdir(threads.task))
        except OSError:
            return True  # QEMU is gone: the read would fail too
        new = tids - threads.known
        threads.nlink, threads.known = nlink, tids
        for tid in new:
            try:
                with open(f"{threads.task}/{tid}/comm") as comm:
                    n = vcpu_of_thread(comm.read())
            except OSError:
                continue  # a short-lived worker thread, gone already
            if n is not None and n not in threads.fds:
                return True
        return False

    def _same_process(self, pid: int, start: int) -> None:
        """The pid may have died and been reused between the checks and the opens:
        the same start time after opening means the files belong to the process."""
        try:
            same = self._start_time(pid) == start
        except (OSError, ValueError, IndexError) as err:
            raise UnavailableError(f"pid {pid}: {err}") from err
        if not same:
            raise UnavailableError(f"pid {pid} was replaced while its threads were opened")

    @staticmethod
    def _open_vcpus(
        base: Path, tids: list[str], wanted: set[int], fds: dict[int, int], *, kvm: bool
    ) -> None:
        """Open the schedstat file of each wanted vCPU's thread into ``fds``.

        Refused while QEMU runs a vCPU thread libvirt does not count online: during
        a hot-plug QEMU starts the thread some ms before libvirt's vcpu.current
        follows (2 to 32 ms on a quiet host, docs/platform.md), and a domain attached
        then would take that thread as already seen and miss the plug until a
        later bulk call. Refused, it stays with libvirt until the two agree.
        """
        unwanted = set()
        for tid in tids:
            try:
                comm = (base / "task" / tid / "comm").read_text()
            except OSError:
                continue  # the thread exited meanwhile
            if comm.strip() == SINGLE_THREADED:
                raise UnavailableError("single-threaded TCG: one thread runs every vCPU")
            n = vcpu_of_thread(comm)
            if n is not None and not kvm and comm.strip().endswith("/KVM"):
                raise UnavailableError("KVM: its halt-wait counter (libvirt) decides better")
            if n is not None and n not in wanted:
                unwanted.add(n)
            elif n is not None and n not in fds:
                path = base / "task" / tid / "schedstat"
                try:
                    fds[n] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as err:
                    raise UnavailableError(f"{path}: {err}") from err
        missing = wanted - fds.keys()
        if missing:
            raise UnavailableError(f"{base}: no thread for vCPU(s) {sorted(missing)}")
        if unwanted:
            raise UnavailableError(
                f"{base}: vCPU thread(s) {sorted(unwanted)} run, but libvirt does not"
                " report them online (yet: a hot-plug in progress)"
            )

    @staticmethod
    def _check_uuid(base: Path, uuid: str) -> None:
        args = (base / "cmdline").read_bytes().split(b"\0")
        want = uuid.lower().encode()
        for flag, value in itertools.pairwise(args):
            if flag == b"-uuid" and value.lower() == want:
                return
        raise UnavailableError(f"{base}: not the QEMU of domain {uuid} (no -uuid {uuid})")
