"""A TCP relay on loopback that drops a client's connection right after a send.

A failing cluster node, or a broker that will not take a packet and (MQTT 3.1.1)
does not say why, closes a publisher's connection right after it sent something.
``CuttingRelay`` does that on demand between a client and a real broker: bytes
from the client that contain ``marker`` are not relayed, both sockets are closed
instead, ``times`` times (None: every time); everything else passes both ways.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Self

from lab.mosquitto import free_port


class CuttingRelay:
    def __init__(self, upstream_port: int, *, marker: bytes, times: int | None) -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.times = times
        self.port = free_port()
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        self._spawn(self._accept)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                _close(sock)
        for thread in self._threads:
            thread.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._open += [client, upstream]
            self._spawn(self._relay, client, upstream, True)
            self._spawn(self._relay, upstream, client, False)

    def _relay(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        tail = b""
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            if from_client and self.marker in tail + chunk and self._cut_now():
                break
            tail = chunk[-len(self.marker) :]
            try:
                dst.sendall(chunk)
            except OSError:
                break
        _close(src)
        _close(dst)

    def _cut_now(self) -> bool:
        with self._lock:
            if self.times is not None and self.cuts >= self.times:
                return False
            self.cuts += 1
            return True


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
