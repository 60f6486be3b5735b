"""Suite-wide fixtures: every test that needs root or a tool says so by fixture, not by skip."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite mounts file systems: run it as root "
                                "(rootless cases drop privileges themselves)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow run only when asked for (`-m slow`, or any -m expression naming slow):
    the default run, which CI runs, stays short. They are deselected, not skipped."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("slow") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
