"""Suite-wide fixtures: every test that needs root or a tool says so by fixture, not by skip."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_LOWER_CACHE: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite mounts file systems: run it as root "
                                "(rootless cases drop privileges themselves)")
    # every unionfs server the suite starts keeps its lower cache (on by default) here, not in
    # the machine's /var/cache: the default behaviour is what is tested, with nothing left over
    if "UNIONFS_LOWER_CACHE" not in os.environ:
        _LOWER_CACHE.append(tempfile.mkdtemp(prefix="unionfs-lowercache-"))
        os.environ["UNIONFS_LOWER_CACHE"] = _LOWER_CACHE[0]


def pytest_unconfigure(config: pytest.Config) -> None:
    for d in _LOWER_CACHE:
        shutil.rmtree(d, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow run only when asked for (`-m slow`, or any -m expression naming slow):
    the default run, which CI runs, stays short. They are deselected, not skipped."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("slow") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
