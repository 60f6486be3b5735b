"""Skip the differential tests (with the reason) where they cannot run: not root, no overlayfs,
or a SUT that does not mount at all (set UNIONFS_DIFF_REQUIRE_SUT=1 to make that a failure).
Tests marked `no_sut` (the harness's own tests) only need root and overlayfs."""

from __future__ import annotations

import pytest

from tests.differential.settings import environment_problem, require_environment


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_sut: a differential-harness test that mounts no SUT")


@pytest.fixture(autouse=True)
def _differential_environment(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("no_sut") is not None:
        problem = environment_problem()
        if problem:
            pytest.skip(problem)
        return
    require_environment()
