"""Shared fixtures: the busybox test image, built once, and its archives, written once per
format x compression (all deterministic, see tests/helpers/images.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.images import Compression, Format, Image, busybox_image, write_image

ArchiveFactory = Callable[[Format, Compression], Path]


@pytest.fixture(scope="session")
def busybox() -> Image:
    if not Path("/bin/busybox").is_file():
        pytest.skip("needs /bin/busybox (Debian package busybox-static)")
    return busybox_image()


@pytest.fixture(scope="session")
def archive(tmp_path_factory: pytest.TempPathFactory, busybox: Image) -> ArchiveFactory:
    """archive(fmt, compression) -> path of the busybox image in that form (read-only: copy
    it before corrupting it)."""
    root = tmp_path_factory.mktemp("archives")
    cache: dict[tuple[str, str], Path] = {}

    def make(fmt: Format, compression: Compression) -> Path:
        key = (fmt, compression)
        if key not in cache:
            dest = root / f"{fmt}-{compression}" if fmt == "oci-dir" else \
                root / f"{fmt}-{compression}.tar"
            cache[key] = write_image(busybox, dest, fmt, compression)
        return cache[key]

    return make
