"""Make sure a libvirtd answers on qemu:///system, shared safely by lab sessions.

No systemd here: the daemons are started by hand (docs/platform.md, "Daemons
and the lab"): ``virtlogd`` first (without it ``virsh start`` fails with "Failed to
connect socket to '/run/libvirt/virtlogd-sock'"), then ``libvirtd``, both
``-d -p PIDFILE`` so we learn their PIDs. The first start after installing (or
after /dev/kvm changed) takes ~8-12 s because libvirtd probes the QEMU binary;
later ~0.1 s.

Several lab sessions may run at once on one machine (the lead's tests, a
benchmark, CI). Starting two libvirtds makes them steal each other's socket, and
stopping a daemon under another session's feet breaks its connection; stopping
virtlogd even silences the serial files of every running guest (virtlogd writes
them). So the lab keeps its state in ``/run/vcpu-agent-lab`` under an flock:

- ``users/``: one file per live ``Libvirtd`` object (pid, start time, token);
- ``libvirtd.json`` / ``virtlogd.json``: daemons a lab session started;
- ``kvm.json``: /dev/kvm's original mode and group, if a lab session changed it.

A daemon that answered before any lab session started it is never stopped. A
lab-started daemon is stopped, by PID, when the LAST lab user leaves, and only
then is /dev/kvm restored. ``restart_libvirtd`` (fault tests) refuses while other
lab users are registered.

Daemons we stop are not our children (``-d`` daemonizes), and PID 1 here may not
reap them, so "gone" means: no /proc entry, or a zombie. Stopping libvirtd leaves
running guests alive (QEMU processes survive a libvirtd restart).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from lab.kvm import KvmStatus, grant_kvm, probe_kvm, restore_kvm

URI = "qemu:///system"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
DEFAULT_STATE_DIR = Path("/run/vcpu-agent-lab")
DAEMONS = ("libvirtd", "virtlogd")  # stop order: libvirtd first


class DaemonError(RuntimeError):
    """A daemon did not start, did not answer in time, or would not stop."""


@dataclass(frozen=True, slots=True)
class StartedDaemon:
    """A daemon a lab session started: its name, PID and start time."""

    name: str
    pid: int
    start_ticks: int  # /proc/PID/stat field 22: guards against PID reuse

    def alive(self) -> bool:
        return _proc_start_ticks(self.pid) == self.start_ticks


def libvirtd_answers(uri: str = URI, timeout_s: float = 5.0) -> bool:
    """True when ``virsh -c URI version`` succeeds (the daemon serves the driver)."""
    try:
        proc = subprocess.run(
            ["virsh", "-c", uri, "version"], capture_output=True, timeout=timeout_s, check=False
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


class _SharedState:
    """The lab's cross-process state directory; every method runs under ``locked``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.users = root / "users"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.users.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def daemon(self, name: str) -> StartedDaemon | None:
        """The lab-started daemon ``name`` if it still runs (stale records dropped)."""
        path = self.root / f"{name}.json"
        try:
            daemon = StartedDaemon(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        if daemon.alive():
            return daemon
        path.unlink()
        return None

    def set_daemon(self, daemon: StartedDaemon | None, name: str) -> None:
        path = self.root / f"{name}.json"
        if daemon is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(asdict(daemon)))

    def register(self) -> str:
        ticks = _proc_start_ticks(os.getpid())
        user = f"{os.getpid()}.{ticks}.{secrets.token_hex(4)}"
        (self.users / user).touch()
        return user

    def unregister(self, user: str) -> None:
        (self.users / user).unlink(missing_ok=True)

    def live_users(self) -> list[str]:
        live = []
        for entry in self.users.iterdir():
            pid, ticks, _ = entry.name.split(".")
            if _proc_start_ticks(int(pid)) == int(ticks):
                live.append(entry.name)
            else:
                entry.unlink()  # a session that died without cleaning up
        return live

    def save_kvm(self, saved: tuple[int, int]) -> None:
        path = self.root / "kvm.json"
        if not path.exists():  # keep the first, truly original, mode
            path.write_text(json.dumps({"mode": saved[0], "gid": saved[1]}))

    def pop_kvm(self) -> tuple[int, int] | None:
        path = self.root / "kvm.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        path.unlink()
        return int(raw["mode"]), int(raw["gid"])


class Libvirtd:
    """Context manager: borrow the running libvirtd, or start one for the lab.

    ``kvm`` says which virt type guests should use. With ``prepare_kvm``,
    /dev/kvm is made ``kvm:0660`` before libvirtd starts, and restored when the
    last lab user leaves.
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
        self._state = _SharedState(state_dir)
        self._timeout_s = start_timeout_s
        self._prepare_kvm = prepare_kvm
        self._user: str | None = None
        self.kvm = KvmStatus(False, "KVM not probed (prepare_kvm=False)")
        self.startup_s: float | None = None  # set when THIS object started libvirtd

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

    @property
    def owns_libvirtd(self) -> bool:
        """True when the running libvirtd was started by a lab session (maybe another)."""
        with self._state.locked():
            return self._state.daemon("libvirtd") is not None

    @property
    def libvirtd_pid(self) -> int | None:
        with self._state.locked():
            daemon = self._state.daemon("libvirtd")
        return daemon.pid if daemon else None

    def other_users(self) -> int:
        """How many other live lab sessions share the daemons right now."""
        with self._state.locked():
            return len([u for u in self._state.live_users() if u != self._user])

    def start(self) -> None:
        with self._state.locked():
            if self._user is None:
                self._user = self._state.register()
            if self._prepare_kvm:
                saved = grant_kvm()
                if saved is not None:
                    self._state.save_kvm(saved)
                self.kvm = probe_kvm()
            # virtlogd even when libvirtd answers: without it no guest starts
            # ("Failed to connect socket to '/run/libvirt/virtlogd-sock'").
            if not _virtlogd_answers():
                self._state.set_daemon(self._spawn("virtlogd"), "virtlogd")
                self._wait_until(_virtlogd_answers, "virtlogd socket")
            if libvirtd_answers(self.uri):
                return  # lab-started or not, it is shared: never start a second one
            self._start_libvirtd_locked()

    def stop(self) -> None:
        """Leave; the last lab user stops the lab-started daemons and restores /dev/kvm."""
        if self._user is None:
            return
        with self._state.locked():
            self._state.unregister(self._user)
            self._user = None
            if self._state.live_users():
                return  # other sessions still rely on the daemons
            for name in DAEMONS:
                daemon = self._state.daemon(name)
                if daemon is not None:
                    self._terminate(daemon, signal.SIGTERM)
                    self._state.set_daemon(None, name)
            saved = self._state.pop_kvm()
            if saved is not None:
                restore_kvm(saved)

    def stop_libvirtd(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the lab's libvirtd (SIGKILL simulates a crash). Guests survive."""
        with self._state.locked():
            daemon = self._restartable_locked()
            self._terminate(daemon, sig)
            self._state.set_daemon(None, "libvirtd")

    def start_libvirtd(self) -> None:
        """Start libvirtd again after ``stop_libvirtd``; waits until it answers.

        If a lab session arriving meanwhile already started one, that one is kept.
        """
        with self._state.locked():
            if not libvirtd_answers(self.uri):
                self._start_libvirtd_locked()

    def restart_libvirtd(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop and start libvirtd under one lock hold: nobody sneaks in between."""
        with self._state.locked():
            self._terminate(self._restartable_locked(), sig)
            self._state.set_daemon(None, "libvirtd")
            self._start_libvirtd_locked()

    def _restartable_locked(self) -> StartedDaemon:
        daemon = self._state.daemon("libvirtd")
        if daemon is None:
            raise DaemonError("refusing to stop a libvirtd the lab did not start")
        others = [u for u in self._state.live_users() if u != self._user]
        if others:
            raise DaemonError(f"refusing to stop libvirtd: {len(others)} other lab user(s)")
        return daemon

    def _start_libvirtd_locked(self) -> None:
        t0 = time.monotonic()
        self._state.set_daemon(self._spawn("libvirtd"), "libvirtd")
        self._wait_until(lambda: libvirtd_answers(self.uri), "libvirtd")
        self.startup_s = time.monotonic() - t0

    def _spawn(self, name: str) -> StartedDaemon:
        pidfile = self._state.root / f"{name}.pid"
        pidfile.unlink(missing_ok=True)  # safe: we hold the lock, and none answers
        # -d: the parent returns once the child has daemonized and written PIDFILE.
        argv = [name, "-d", "-p", str(pidfile)]
        if name == "libvirtd":
            argv += ["-f", str(self._libvirtd_conf())]
        proc = subprocess.run(
            argv,
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

    def _libvirtd_conf(self) -> Path:
        """The system's libvirtd.conf, plus ``auth_unix_ro = "none"``: without a
        system bus here, polkit cannot answer whether a non-root client may use the
        read-only socket, and docs/install.md prescribes exactly this for such a
        host. The unprivileged tests then run the agent as it is deployed."""
        system = Path("/etc/libvirt/libvirtd.conf")
        base = system.read_text() if system.exists() else ""
        conf = self._state.root / "libvirtd.conf"
        conf.write_text(base + '\n# vcpu-agent lab: no system bus\nauth_unix_ro = "none"\n')
        return conf

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise DaemonError(f"{what} did not answer within {self._timeout_s} s")
            time.sleep(0.05)

    @staticmethod
    def _terminate(daemon: StartedDaemon, sig: signal.Signals) -> None:
        if not daemon.alive():
            return
        os.kill(daemon.pid, sig)
        deadline = time.monotonic() + 30.0
        killed = sig == signal.SIGKILL
        while daemon.alive():
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
