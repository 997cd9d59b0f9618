#!/usr/bin/env bash
# Run every check: lint, types, then the test suite (real mosquitto, libvirt test
# driver, and a real libvirtd with QEMU guests, all started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
