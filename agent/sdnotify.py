"""systemd's notify protocol: a few datagrams on $NOTIFY_SOCKET (sd_notify(3)).

No dependency for it: the protocol is ``KEY=VALUE`` lines in one datagram to a
Unix socket, whose name starts with ``@`` for the abstract namespace. Without
``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket

from agent import logs

log = logs.get("agent.sdnotify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> None:
        if self._sock is None:
            return
        data = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(data, self._address)
        except OSError as err:  # systemd gone or socket full: never fatal
            log.warning("sdnotify.failed", reason=str(err))

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def set_watchdog(self, usec: int) -> None:
        """Change systemd's watchdog timeout for this service (sd_notify(3),
        ``WATCHDOG_USEC=``; systemd 236 or later), and what ``watchdog_usec`` says."""
        self.notify(watchdog_usec=usec)
        os.environ["WATCHDOG_USEC"] = str(usec)

    def stopping(self) -> None:
        self.notify(stopping=1, status="stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_usec() -> int | None:
    """systemd's WatchdogSec in microseconds (``$WATCHDOG_USEC``), if it is ours to
    feed (``$WATCHDOG_PID`` absent or our pid), as sd_watchdog_enabled(3) reads it."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, in seconds, if it is ours to feed."""
    usec = watchdog_usec()
    return None if usec is None else usec / 2e6
