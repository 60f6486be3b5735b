"""Fixtures for the benchmark smoke tests: a private dataset cache and the installed backends.

The cache lives in pytest's temporary directory (same file system as everything else here), so
the tests never touch /var/cache/unionfs-bench and build the tiny synthetic dataset themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import backends as bk


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="session")
def installed_backends() -> list[str]:
    """Every backend that can run here. native and overlay always can (the suite runs as root);
    the FUSE ones are reported when missing, not silently dropped."""
    ok, skipped = bk.select(list(bk.ALL_BACKENDS))
    names = [b.name for b in ok]
    assert "native" in names and "overlay" in names, skipped
    for name, why in skipped.items():
        print(f"benchmark backend {name} not tested: {why}")
    return names
