"""The fault table of docs/reliability.md: events produced / delivered / duplicated.

    .venv/bin/python -m bench.faults

Runs the broker-fault tests (tests/reliability/test_broker_faults.py: a real
mosquitto stopped and restarted, the real agent SIGKILLed and restarted, a spool
overflowing) with ``VCPU_FAULT_FIGURES`` set, so each scenario appends its figures
to a file, then prints them as the Markdown table the docs record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = dict(os.environ, VCPU_FAULT_FIGURES=str(figures))
        test = "tests/reliability/test_broker_faults.py"
        status = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            cwd=ROOT,
            env=env,
            check=False,
        ).returncode
        rows = [json.loads(line) for line in figures.read_text().splitlines()]
    print()
    print("| fault | produced | delivered | duplicates | note |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['fault']} | {r['produced']} | {r['delivered']} | {r['duplicates']} "
            f"| {r['note']} |"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
