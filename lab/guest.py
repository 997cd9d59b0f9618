"""Build the toggler boot sector (lab/guests/toggler.S) into a bootable raw disk.

The guest's vCPU 0 alternates BUSY and HALTED phases whose lengths are counted in
ticks of a 100 Hz PIT that the boot sector programs itself, so a phase length is
quantised to 10 ms. The lengths are fixed at assembly time with ``--defsym`` and
also stored after a "TOGL" magic at a fixed offset, which ``read_toggler_params``
reads back to check an image without booting it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("guests") / "toggler.S"
TICK_HZ = 100  # PIT rate programmed by toggler.S (divisor 11932)
SECTOR_SIZE = 512
IMAGE_SIZE = 1 << 20  # SeaBIOS is happy with a tiny disk; 1 MiB looks like a disk
PARAMS_OFFSET = 0x1F0
PARAMS_MAGIC = b"TOGL"
# The boot sector compares elapsed ticks with unsigned 16-bit arithmetic.
MAX_TICKS = 0xFFFF


class ImageBuildError(RuntimeError):
    """binutils failed, or produced something that is not a 512-byte boot sector."""


@dataclass(frozen=True, slots=True)
class TogglerParams:
    """Phase lengths as the guest sees them: whole 100 Hz ticks."""

    busy_ticks: int
    halt_ticks: int

    @property
    def busy_s(self) -> float:
        return self.busy_ticks / TICK_HZ

    @property
    def halted_s(self) -> float:
        return self.halt_ticks / TICK_HZ


def seconds_to_ticks(seconds: float) -> int:
    ticks = round(seconds * TICK_HZ)
    if not 1 <= ticks <= MAX_TICKS:
        raise ValueError(
            f"phase of {seconds} s is {ticks} ticks at {TICK_HZ} Hz; need 1..{MAX_TICKS}"
        )
    return ticks


def build_toggler_image(*, busy_s: float, halted_s: float, cache_dir: Path) -> Path:
    """Return a raw disk image booting the toggler; built once per parameters.

    The cache key includes the source's hash, so editing toggler.S rebuilds.
    Safe to call from concurrent processes: the image appears by atomic rename.
    """
    params = TogglerParams(seconds_to_ticks(busy_s), seconds_to_ticks(halted_s))
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    cache_dir.mkdir(parents=True, exist_ok=True)
    image = cache_dir / f"toggler-b{params.busy_ticks}-h{params.halt_ticks}-{digest}.img"
    if image.exists():
        return image

    with tempfile.TemporaryDirectory(prefix="toggler-build-", dir=cache_dir) as tmp:
        boot_sector = _assemble(params, Path(tmp))
        staged = Path(tmp) / "disk.img"
        with staged.open("wb") as f:
            f.write(boot_sector)
            f.truncate(IMAGE_SIZE)
        # QEMU runs as libvirt-qemu: the image must be world-readable before
        # libvirt copies it (lab/domains.py gives each guest its own copy).
        staged.chmod(0o644)
        os.replace(staged, image)
    return image


def read_toggler_params(image: Path) -> TogglerParams:
    """Read back the phase lengths stored in an image, checking the boot signature."""
    with image.open("rb") as f:
        sector = f.read(SECTOR_SIZE)
    if len(sector) != SECTOR_SIZE or sector[510:512] != b"\x55\xaa":
        raise ImageBuildError(f"{image}: no 0x55AA boot signature")
    magic = sector[PARAMS_OFFSET : PARAMS_OFFSET + 4]
    if magic != PARAMS_MAGIC:
        raise ImageBuildError(f"{image}: expected {PARAMS_MAGIC!r} at {PARAMS_OFFSET:#x}")
    busy, halt = struct.unpack_from("<HH", sector, PARAMS_OFFSET + 4)
    return TogglerParams(busy_ticks=busy, halt_ticks=halt)


def _assemble(params: TogglerParams, workdir: Path) -> bytes:
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise ImageBuildError(f"{tool!r} not found: install Debian's binutils")
    obj = workdir / "toggler.o"
    binary = workdir / "toggler.bin"
    _run(
        [
            "as",
            "--32",
            "--defsym",
            f"BUSY_TICKS={params.busy_ticks}",
            "--defsym",
            f"HALT_TICKS={params.halt_ticks}",
            "-o",
            str(obj),
            str(SOURCE),
        ]
    )
    # --oformat binary writes the flat code at its link address, 0x7c00, where
    # the BIOS loads the boot sector.
    _run(
        [
            "ld",
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
            str(binary),
            str(obj),
        ]
    )
    data = binary.read_bytes()
    if len(data) != SECTOR_SIZE or data[510:] != b"\x55\xaa":
        raise ImageBuildError(f"assembled toggler is {len(data)} bytes or lacks 0x55AA")
    return data


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
