"""The real agent (``agent.cli.main``) plus a thread that drives its domains.

    python -m tests.reliability.driven_agent CONFIG CYCLES

libvirt's ``test:///default`` is private to one process, so a subprocess agent
can only see domains change if the changes happen in its own process: a second,
read-write connection here suspends/resumes the ``test`` domain and unplugs and
replugs its vCPU 1, ``CYCLES`` times, one second after start. It then prints
``{"event": "driver.done", "cycles": N}`` on stdout, among the agent's JSON logs.
Everything else is the production entry point, signals and exit status included.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import libvirt

from agent.cli import main
from agent.source import start_event_thread

PAUSE = 0.3  # longer than the test configs' sampling.interval: a sample sees each step


def drive(cycles: int) -> None:
    time.sleep(1.0)  # the agent has connected and taken its first samples
    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    for _ in range(cycles):
        dom.suspend()
        time.sleep(0.05)
        dom.resume()
        time.sleep(0.05)
        dom.setVcpusFlags(1, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        time.sleep(PAUSE)
        dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        time.sleep(PAUSE)
    print(json.dumps({"event": "driver.done", "cycles": cycles}), flush=True)


if __name__ == "__main__":
    start_event_thread()  # before any connection, once per process
    threading.Thread(target=drive, args=(int(sys.argv[2]),), daemon=True).start()
    sys.exit(main(["run", "--config", sys.argv[1]]))
