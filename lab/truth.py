"""Ground truth: phase markers read from a guest's serial file as they arrive.

The toggler writes 'B' to COM1 when a busy phase starts and 'H' when a halted
phase starts. QEMU passes the byte to virtlogd (libvirt's default for
``<serial type='file'>``), which appends it to the file. A background thread
blocks in poll() on an inotify descriptor watching the file's DIRECTORY (so the
watch can be set before QEMU/virtlogd creates the file) and timestamps each
wake-up before reading the new bytes: the timestamp is that of the wake-up, not
of the read.

Precision (docs/lab.md has the numbers): the delay from a write() to our
timestamp is tens of microseconds; the guest-to-file path (PIT tick -> QEMU
serial -> virtlogd pipe -> file) adds more, measured from the spread of
inter-marker intervals, which are exact multiples of 10 ms in the guest. If
several markers arrive in one wake-up they share its timestamp;
``stats().coalesced`` counts such markers (it stays 0 with phases >= 10 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

Phase = Literal["busy", "halted"]
PHASE_OF_BYTE: dict[int, Phase] = {ord("B"): "busy", ord("H"): "halted"}

# <sys/inotify.h>
_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Marker:
    """One phase start seen on the serial port, stamped when its byte arrived."""

    t_wall: float  # time.time()
    t_mono: float  # time.monotonic(): compare with samples taken in this process
    phase: Phase


@dataclass(frozen=True, slots=True)
class TruthStats:
    wakeups: int  # inotify wake-ups that found new bytes
    coalesced: int  # markers that shared a wake-up with an earlier marker
    ignored_bytes: int  # bytes that are not 'B'/'H' (nothing else should write COM1)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class SerialTruth:
    """Watch ``path`` (which may not exist yet) and collect markers in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._markers: list[Marker] = []
        self._wakeups = self._coalesced = self._ignored = 0
        self._offset = 0
        self._inode = -1
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe()
        libc = _libc()
        self._ifd = _check(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        # Watch the directory: the file may not exist yet (virtlogd creates it).
        _check(
            libc.inotify_add_watch(
                self._ifd, os.fsencode(path.parent), ctypes.c_uint32(_IN_MODIFY)
            ),
            f"inotify_add_watch({path.parent})",
        )
        self._error: BaseException | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        # Bytes already there are stamped now: they predate the watch.
        self._read_new(time.monotonic(), time.time())
        self._thread = threading.Thread(
            target=self._run, name=f"truth:{self.path.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; bytes it has not seen yet are not turned into markers."""
        if self._ifd < 0:
            return  # stopped already
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._ifd, self._stop_r, self._stop_w):
            os.close(fd)
        self._ifd = self._stop_r = self._stop_w = -1

    def markers(self) -> list[Marker]:
        with self._cond:
            return list(self._markers)

    def stats(self) -> TruthStats:
        with self._cond:
            return TruthStats(self._wakeups, self._coalesced, self._ignored)

    def wait_for(self, count: int, timeout_s: float) -> list[Marker]:
        """Block until at least ``count`` markers exist; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._markers) < count:
                if self._error is not None:
                    raise RuntimeError(f"truth watcher for {self.path} died") from self._error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.path}: {len(self._markers)} of {count} markers after {timeout_s} s"
                    )
                self._cond.wait(left)
            return list(self._markers)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._ifd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                # Stamp first: everything after this line is our own latency.
                t_mono, t_wall = time.monotonic(), time.time()
                if self._stop_r in ready:
                    return
                if self._drain_inotify():
                    self._read_new(t_mono, t_wall)
        except BaseException as exc:  # surfaced to waiters, not lost in a thread
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            raise

    def _drain_inotify(self) -> bool:
        """Consume queued events; True if one says our file was written to.

        Only IN_MODIFY means "bytes arrived after the event was queued, so after
        nothing earlier than our stamp". Reading on IN_CREATE alone could find a
        byte written after the stamp and give it a stamp earlier than its write.
        """
        modified = False
        name = os.fsencode(self.path.name)
        while True:
            try:
                buf = os.read(self._ifd, 65536)
            except BlockingIOError:
                return modified
            if not buf:
                return modified
            pos = 0
            while pos < len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                event_name = buf[pos + 16 : pos + 16 + length].rstrip(b"\0")
                pos += 16 + length
                if event_name != name:
                    continue
                if mask & _IN_MODIFY:
                    modified = True

    def _read_new(self, t_mono: float, t_wall: float) -> None:
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    # A new or truncated file (re-created serial log): start over.
                    self._inode, self._offset = st.st_ino, 0
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self._offset += len(data)
        found = [PHASE_OF_BYTE[b] for b in data if b in PHASE_OF_BYTE]
        with self._cond:
            self._wakeups += 1
            self._ignored += len(data) - len(found)
            self._coalesced += max(0, len(found) - 1)
            self._markers.extend(Marker(t_wall, t_mono, phase) for phase in found)
            self._cond.notify_all()
