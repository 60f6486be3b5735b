"""Fixtures of the fault tests (see support.py for the helpers they use)."""

from __future__ import annotations

import random
import shutil

import pytest

from .support import env_int


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A seeded RNG per test: UNIONFS_FAULT_SEED fixes the seed; the seed is in the report."""
    seed = env_int("UNIONFS_FAULT_SEED", random.randrange(2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: UNIONFS_FAULT_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def strace() -> str:
    """strace(1), for killing the server at an exact system call."""
    path = shutil.which("strace")
    if path is None:
        pytest.skip("needs strace (Debian package strace) to inject a kill at a system call")
    return path
