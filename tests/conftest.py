"""Suite-wide fixtures: every test that needs root or a tool says so by fixture, not by skip."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite mounts file systems: run it as root "
                                "(rootless cases drop privileges themselves)")
