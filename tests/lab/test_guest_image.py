"""The toggler image: built by binutils, signed, parameters readable, cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.guest import (
    IMAGE_SIZE,
    ImageBuildError,
    TogglerParams,
    build_toggler_image,
    read_toggler_params,
)


def test_image_is_a_signed_boot_sector_padded_to_a_disk(image_cache: Path) -> None:
    image = build_toggler_image(busy_s=0.5, halted_s=1.25, cache_dir=image_cache)
    data = image.read_bytes()
    assert len(data) == IMAGE_SIZE
    assert data[510:512] == b"\x55\xaa"
    assert data[:1] == b"\xfa"  # cli: the sector starts with our code, not padding
    assert not data[512:].strip(b"\0")


def test_phase_lengths_are_stored_as_100hz_ticks(image_cache: Path) -> None:
    image = build_toggler_image(busy_s=0.5, halted_s=1.25, cache_dir=image_cache)
    params = read_toggler_params(image)
    assert params == TogglerParams(busy_ticks=50, halt_ticks=125)
    assert (params.busy_s, params.halted_s) == (0.5, 1.25)


def test_same_parameters_reuse_the_cached_image(image_cache: Path) -> None:
    first = build_toggler_image(busy_s=0.3, halted_s=0.3, cache_dir=image_cache)
    stamp = first.stat().st_mtime_ns
    again = build_toggler_image(busy_s=0.3, halted_s=0.3, cache_dir=image_cache)
    other = build_toggler_image(busy_s=0.3, halted_s=0.4, cache_dir=image_cache)
    assert again == first
    assert again.stat().st_mtime_ns == stamp
    assert other != first


@pytest.mark.parametrize("seconds", [0.0, 0.004, 656.0])
def test_rejects_phases_that_do_not_fit_16_bit_ticks(image_cache: Path, seconds: float) -> None:
    with pytest.raises(ValueError, match="ticks"):
        build_toggler_image(busy_s=seconds, halted_s=1.0, cache_dir=image_cache)


def test_refuses_to_read_an_image_without_boot_signature(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.img"
    bogus.write_bytes(bytes(512))
    with pytest.raises(ImageBuildError, match="signature"):
        read_toggler_params(bogus)
