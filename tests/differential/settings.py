"""Hypothesis settings and environment checks shared by the differential tests.

Environment:
- `DIFF_SUT`: the system under test, "unionfs" (default) or "fuse-overlayfs" (to validate the
  harness against a known implementation).
- `UNIONFS_DIFF_EXAMPLES`: examples per test (default: small, for CI). Long run: e.g. 300.
- `UNIONFS_DIFF_STEPS`: operations per state-machine example (default 30).
- `UNIONFS_DIFF_REQUIRE_SUT=1`: fail instead of skipping when the SUT cannot mount at all.
- `UNIONFS_DIFF_XWHITEOUTS=0`: generate no xattr whiteouts (fuse-overlayfs 1.10 ignores them).
- `UNIONFS_DIFF_IGNORE=nlink,...`: difference classes to ignore, to look past a known one
  (see harness.IGNORE).
- `UNIONFS_DIFF_KEEP=1`: keep the temporary layer trees (for debugging a failure).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from tests.differential.harness import SUT_KIND, rm_tree
from tests.helpers.layers import Layer, Stack, kernel_honours_xattr_whiteouts, materialise, stacks
from tests.helpers.mounts import mounted

EXAMPLES = int(os.environ.get("UNIONFS_DIFF_EXAMPLES", "0")) or None
STEPS = int(os.environ.get("UNIONFS_DIFF_STEPS", "30"))
XWHITEOUTS = os.environ.get("UNIONFS_DIFF_XWHITEOUTS", "1") != "0"


def diff_settings(default_examples: int, **kw: object) -> settings:
    """`deadline=None` and no too_slow check: every example mounts filesystems."""
    return settings(
        max_examples=EXAMPLES or default_examples,
        deadline=None,
        # CI: the same examples every run (no flaky red); a failure is still shrunk and printed
        derandomize=os.environ.get("CI") == "true" and not EXAMPLES,
        # no explain phase: it replays a failure hundreds of times (minutes, with mounts)
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        **kw,  # type: ignore[arg-type]
    )


@functools.cache
def environment_problem() -> str | None:
    """Why the differential tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (kernel overlayfs mounts, trusted.* xattrs, mknod)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            subprocess.run(["modprobe", "overlay"], capture_output=True, check=False, timeout=30)
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "kernel overlayfs is not available"
    return None


@functools.cache
def sut_problem() -> str | None:
    """Why the SUT cannot mount an empty stack, or None (probed once per session)."""
    root = Path(tempfile.mkdtemp(prefix="unionfs-diff-probe-"))
    try:
        d = materialise(Stack([Layer()]), root / "layers")
        log = root / "server.log"
        with mounted(SUT_KIND, d.lowers, d.upper, d.work, root / "mnt", log=log):
            os.listdir(root / "mnt")
        return None
    except Exception as e:  # any failure to mount means: no SUT to test
        return f"{SUT_KIND} does not mount: {e}"
    finally:
        rm_tree(root)


def require_environment() -> None:
    problem = environment_problem()
    if problem:
        pytest.skip(problem)
    problem = sut_problem()
    if problem:
        if os.environ.get("UNIONFS_DIFF_REQUIRE_SUT") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


def stack_strategy() -> st.SearchStrategy[Stack]:
    """Generated stacks; xattr whiteouts only where this kernel honours them (probed when the
    first example is drawn)."""
    return st.deferred(lambda: stacks(xwhiteouts=XWHITEOUTS and kernel_honours_xattr_whiteouts()))
