"""Make sure a libvirtd answers on qemu:///system; stop only what we started.

No systemd here: the daemons are started by hand, as the shared NOTES found
necessary: ``virtlogd`` first (without it ``virsh start`` fails with "Failed to
connect socket to '/run/libvirt/virtlogd-sock'"), then ``libvirtd``, both
``-d -p PIDFILE`` so we learn their PIDs. A daemon that already answers is used
as it is and never stopped. The first start after installing (or after /dev/kvm
changed) takes ~12 s because libvirtd probes the QEMU binary; later ~0.1 s.

Daemons we stop are not our children (``-d`` daemonizes), and PID 1 here may not
reap them, so "gone" means: no /proc entry, or a zombie.

Stopping libvirtd leaves running guests alive (QEMU processes survive a libvirtd
restart), which is what the "restart libvirtd" fault tests rely on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from lab.kvm import KvmAccess, KvmStatus

URI = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
DEFAULT_STATE_DIR = Path("/run/vcpu-agent-lab")


class DaemonError(RuntimeError):
    """A daemon did not start, did not answer in time, or would not stop."""


@dataclass(frozen=True, slots=True)
class StartedDaemon:
    """A daemon this process started: its name (as /proc/PID/comm shows it) and PID."""

    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: guards against PID reuse


def libvirtd_answers(uri: str = URI, timeout_s: float = 5.0) -> bool:
    """True when ``virsh -c URI version`` succeeds (the daemon serves the driver)."""
    try:
        proc = subprocess.run(
            ["virsh", "-c", uri, "version"],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _virtlogd_answers() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(VIRTLOGD_SOCKET))
        except OSError:
            return False
    return True


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of PID in clock ticks, or None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    state, start = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start


def _is_alive(d: StartedDaemon) -> bool:
    return _proc_start_ticks(d.pid) == d.start_ticks


class Libvirtd:
    """Context manager owning (or merely borrowing) virtlogd + libvirtd.

    ``kvm`` tells which virt type guests should use; with ``prepare_kvm`` the
    /dev/kvm permissions are fixed before libvirtd starts and restored after it
    stops. Use ``restart_libvirtd()`` for fault tests; it refuses to touch a
    libvirtd that this object did not start.
    """

    def __init__(
        self,
        *,
        uri: str = URI,
        state_dir: Path = DEFAULT_STATE_DIR,
        start_timeout_s: float = 180.0,
        prepare_kvm: bool = True,
    ) -> None:
        self.uri = uri
        self._state_dir = state_dir
        self._timeout_s = start_timeout_s
        self._kvm_access = KvmAccess() if prepare_kvm else None
        self._virtlogd: StartedDaemon | None = None
        self._libvirtd: StartedDaemon | None = None
        self.kvm = KvmStatus(False, "KVM not probed (prepare_kvm=False)")
        self.startup_s: float | None = None  # how long our libvirtd took to answer

    @property
    def owns_libvirtd(self) -> bool:
        return self._libvirtd is not None

    @property
    def libvirtd_pid(self) -> int | None:
        return self._libvirtd.pid if self._libvirtd else None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._kvm_access is not None:
            self.kvm = self._kvm_access.__enter__().status
        if libvirtd_answers(self.uri):
            return  # somebody else's daemon: use it, never stop it
        self._state_dir.mkdir(parents=True, exist_ok=True)
        if not _virtlogd_answers():
            self._virtlogd = self._spawn("virtlogd")
            self._wait_until(_virtlogd_answers, "virtlogd socket")
        self.start_libvirtd()

    def start_libvirtd(self) -> None:
        """Start libvirtd (again) and wait until it answers; records ``startup_s``."""
        if self._libvirtd is not None and _is_alive(self._libvirtd):
            raise DaemonError(f"libvirtd {self._libvirtd.pid} is still running")
        t0 = time.monotonic()
        try:
            self._libvirtd = self._spawn("libvirtd")
        except DaemonError:
            # Lost a race with another test session starting its own: borrow it.
            if libvirtd_answers(self.uri):
                return
            raise
        self._wait_until(lambda: libvirtd_answers(self.uri), "libvirtd")
        self.startup_s = time.monotonic() - t0

    def stop_libvirtd(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the libvirtd we started (SIGKILL simulates a crash). Guests survive."""
        if self._libvirtd is None:
            raise DaemonError("refusing to stop a libvirtd this harness did not start")
        self._terminate(self._libvirtd, sig)
        self._libvirtd = None

    def restart_libvirtd(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.stop_libvirtd(sig)
        self.start_libvirtd()

    def stop(self) -> None:
        """Stop exactly the daemons we started, libvirtd first; restore /dev/kvm."""
        try:
            for daemon in (self._libvirtd, self._virtlogd):
                if daemon is not None:
                    self._terminate(daemon, signal.SIGTERM)
        finally:
            self._libvirtd = self._virtlogd = None
            if self._kvm_access is not None:
                self._kvm_access.restore()

    def _spawn(self, name: str) -> StartedDaemon:
        pidfile = self._state_dir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        # -d: the parent returns once the child has daemonized and written PIDFILE.
        proc = subprocess.run(
            [name, "-d", "-p", str(pidfile)],
            capture_output=True,
            text=True,
            timeout=self._timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise DaemonError(f"{name} -d failed ({proc.returncode}): {proc.stderr.strip()}")
        pid = int(pidfile.read_text().strip())
        ticks = _proc_start_ticks(pid)
        if ticks is None:
            raise DaemonError(f"{name} (pid {pid}) exited right after starting")
        return StartedDaemon(name=name, pid=pid, start_ticks=ticks)

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise DaemonError(f"{what} did not answer within {self._timeout_s} s")
            time.sleep(0.05)

    def _terminate(self, daemon: StartedDaemon, sig: signal.Signals) -> None:
        if not _is_alive(daemon):
            return
        os.kill(daemon.pid, sig)
        deadline = time.monotonic() + 30.0
        killed = sig == signal.SIGKILL
        while _is_alive(daemon):
            if time.monotonic() > deadline:
                if killed:
                    raise DaemonError(f"{daemon.name} (pid {daemon.pid}) survived SIGKILL")
                os.kill(daemon.pid, signal.SIGKILL)
                killed, deadline = True, time.monotonic() + 10.0
            time.sleep(0.02)


@contextlib.contextmanager
def ensure_libvirtd(
    *, uri: str = URI, state_dir: Path = DEFAULT_STATE_DIR, prepare_kvm: bool = True
) -> Iterator[Libvirtd]:
    """``with ensure_libvirtd() as daemon:`` -- borrow or start libvirtd for a block."""
    with Libvirtd(uri=uri, state_dir=state_dir, prepare_kvm=prepare_kvm) as daemon:
        yield daemon
