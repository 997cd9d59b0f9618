"""Fixtures for lab tests: a real libvirtd, a connection, guests, images.

The session-scoped ``lab_daemon`` borrows a running libvirtd or starts one (and
stops only that). Connections are module-scoped so that a test restarting
libvirtd (tests/lab/test_libvirtd.py) cannot leave later modules with a dead one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from lab.domains import GuestPool
from lab.kvm import VirtType
from lab.libvirtd import Libvirtd

VIRT_TYPES = [
    pytest.param("qemu", id="tcg"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.kvm),
]


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("toggler-images")


@pytest.fixture(scope="session")
def lab_daemon(libvirtd: Libvirtd) -> Libvirtd:
    """The session's one libvirtd (tests/conftest.py): a second lab registration
    in this process would make restart tests refuse, seeing "another user"."""
    return libvirtd


@pytest.fixture(scope="module")
def lab_conn(lab_daemon: Libvirtd) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(lab_daemon.uri)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def guest_pool(lab_conn: libvirt.virConnect) -> Iterator[GuestPool]:
    with GuestPool(lab_conn) as pool:
        yield pool


@pytest.fixture(scope="module", params=VIRT_TYPES)
def virt_type(request: pytest.FixtureRequest, lab_daemon: Libvirtd) -> VirtType:
    """Each guest test runs under TCG, and under KVM when /dev/kvm is usable."""
    vt: VirtType = request.param
    if vt == "kvm" and not lab_daemon.kvm.usable:
        pytest.skip(f"KVM unusable: {lab_daemon.kvm.reason}")
    return vt
