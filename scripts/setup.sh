#!/usr/bin/env bash
# Set up everything on a fresh Debian 12 machine, as root (or with sudo):
# the Debian packages (libvirt + QEMU for the real-guest tests, mosquitto, what
# libvirt-python needs to build), then .venv with the project and its dev tools.
# Idempotent: run it again any time.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  # libvirt-python builds from source against the system libvirt
  libvirt-dev pkg-config gcc python3-dev python3-venv
  # a real libvirtd with QEMU for the truth tests; only the x86 emulator: every
  # extra emulator makes libvirtd's first capability probe minutes longer
  # (docs/platform.md)
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils seabios ipxe-qemu
  # the truth guest is assembled from source
  binutils
  # a real broker for the tests and the demo; openssl makes the TLS test CA
  mosquitto mosquitto-clients openssl
  # a real clustered broker (JetStream + MQTT 3.1.1) for tests/cluster and
  # bench/fleet.py; the tests start their own nodes by PID (docs/scale.md)
  nats-server
  # systemd-analyze verifies the unit file
  systemd
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# The agent as the unit runs it (ExecStart=/opt/vcpu-agent/bin/vcpu-agent), with
# Debian's python3: the tests that run the agent as an unprivileged user use it
# (.venv's interpreter may live in root's home, which no other user can enter).
# Rerun this script after changing the code; the test says so if it is stale.
DEPLOY=/opt/vcpu-agent
if [ ! -x "$DEPLOY/bin/python" ]; then
  $SUDO /usr/bin/python3 -m venv "$DEPLOY"
fi
$SUDO "$DEPLOY/bin/python" -m pip install -q --upgrade pip
$SUDO "$DEPLOY/bin/python" -m pip install -q --force-reinstall --no-deps .
$SUDO "$DEPLOY/bin/python" -m pip install -q .
echo "setup: done ($(.venv/bin/vcpu-agent --version))"
