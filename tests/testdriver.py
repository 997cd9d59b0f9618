"""Run the agent in-process against libvirt's test driver (``test:///default``).

The test driver lives in the process that opens it, so the agent runs on a
thread of the test process, on its own asyncio loop, and tests drive domains
through a second, writable connection to the same driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import threading
from dataclasses import dataclass

import libvirt

from agent.config import Config, parse
from agent.service import Service
from lab.mosquitto import Mosquitto


def agent_config(
    broker: Mosquitto, prefix: str, *, interval: float = 0.2, **extra: object
) -> Config:
    return parse(
        {
            "agent": {"host_id": "testhost"},
            "libvirt": {"uri": "test:///default"},
            "sampling": {"interval": interval, "libvirt_interval": interval, **extra},
            "mqtt": {
                "host": "127.0.0.1",
                "port": broker.port,
                "topic_prefix": prefix,
                "reconnect_min": 0.1,
                "reconnect_max": 0.5,
            },
            "spool": {"path": ""},
        }
    )


@dataclass
class RunningAgent:
    service: Service
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    result: list[int]

    def stop(self) -> int:
        self.loop.call_soon_threadsafe(self.service.request_stop)
        self.thread.join(10)
        if self.thread.is_alive():
            faulthandler.dump_traceback(all_threads=True)
        assert not self.thread.is_alive(), "the agent did not stop"
        return self.result[0]


def start_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    xml = (
        f"<domain type='test'><name>{escaped}</name><memory>65536</memory>"
        "<vcpu current='2'>4</vcpu><os><type>hvm</type></os></domain>"
    )
    return conn.createXML(xml, 0)


def with_cleanup(dom: libvirt.virDomain) -> None:
    """Destroy a test domain unless a test already did."""
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()


def start_agent(cfg: Config) -> RunningAgent:
    """Start ``Service(cfg)`` on a thread of its own; stop it with ``.stop()``."""
    loop = asyncio.new_event_loop()
    result: list[int] = []
    holder: dict[str, Service] = {}
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def go() -> int:
            holder["service"] = Service(cfg)
            ready.set()
            # Signal handlers need the main thread: we stop it directly instead.
            return await holder["service"].run(handle_signals=False)

        result.append(loop.run_until_complete(go()))
        loop.close()

    thread = threading.Thread(target=main, name="agent-under-test", daemon=True)
    thread.start()
    if not ready.wait(5):
        raise RuntimeError("the agent did not start")
    return RunningAgent(holder["service"], thread, loop, result)
