"""The direct loop's spin (third_party patch item 8, `-o spin=US`): after each request the server
polls for the next one for up to US microseconds before sleeping, so a client that asks again at
once finds it awake. Checked on real mounts through the stats dump: which spin the loop got, and
that waits really end in the spin (hits) or in sleep (misses)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unionfs.conftest import Stack, write
from tests.unionfs.test_kernel_caching import requests
from unionfs.cli import parse_options
from unionfs.mount import cpu_quota, spin_time


def _busy(mnt: Path, n: int = 300) -> None:
    """Requests in quick succession: each open and fstat waits for its reply, each close sends
    a release the client does not wait for, so the next open follows at once."""
    for i in range(n):
        fd = os.open(mnt / f"f{i % 10}", os.O_RDONLY)
        os.fstat(fd)
        os.close(fd)


def _sparse(mnt: Path, n: int = 30) -> None:
    """Single requests 3 ms apart (the kernel caches no xattr: each getxattr is a request)."""
    for i in range(n):
        with contextlib.suppress(OSError):  # ENODATA
            os.getxattr(mnt / f"f{i % 10}", "user.none")
        time.sleep(0.003)


def _stats(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           options: tuple[str, ...] = ()) -> dict[str, object]:
    for i in range(10):
        write(stack.lowers[0] / f"f{i}", str(i))
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    with stack.mount(options=options) as m:
        _busy(stack.mnt)
        counts = requests(m, stats, [0])
        dumped: dict[str, object] = json.loads(stats.read_text())
    assert counts.get("open", 0) >= 300, counts
    return dumped


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """This process (and so the server it starts) runs on one CPU only, until the block ends."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def test_the_direct_loop_spins_and_catches_requests(stack: Stack, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this host gives the tests one CPU: the server would not spin")
    dumped = _stats(stack, tmp_path, monkeypatch)
    assert dumped["loop"] == "direct" and dumped["spin_us"] == 50, dumped
    hits, misses = dumped["spin_hits"], dumped["spin_misses"]
    assert isinstance(hits, int) and isinstance(misses, int)
    # every wait of the loop is one or the other, and the busy client is caught awake
    assert hits + misses >= 900 and hits > 0, dumped


def test_the_spin_stops_for_sparse_requests_and_resumes_for_a_burst(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight waits in a row that the spin did not shorten switch it off (it would only burn
    CPU); a request that comes soon after the previous reply switches it on again."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("this host gives the tests one CPU: the server would not spin")
    for i in range(10):
        write(stack.lowers[0] / f"f{i}", str(i))
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]

    def spin() -> dict[str, int]:
        requests(m, stats, seq)
        d = json.loads(stats.read_text())
        return {k: d[k] for k in ("spin_hits", "spin_misses", "spin_skips")}

    with stack.mount() as m:
        for i in range(10):
            os.stat(stack.mnt / f"f{i}")  # the lookups, before the sparse phase
        before = spin()
        _sparse(stack.mnt)
        sparse = spin()
        _busy(stack.mnt)
        busy = spin()
    # 30 requests 3 ms apart: at most eight misses in a row, then every wait is skipped
    assert sparse["spin_hits"] == before["spin_hits"], (before, sparse)
    assert sparse["spin_misses"] - before["spin_misses"] <= 8, (before, sparse)
    assert sparse["spin_skips"] - before["spin_skips"] >= 22, (before, sparse)
    assert busy["spin_hits"] - sparse["spin_hits"] >= 100, (sparse, busy)


@pytest.mark.parametrize("options", [("spin=0",), ("loop=trio",)], ids=["spin=0", "trio"])
def test_no_spin_when_switched_off_or_on_the_trio_loop(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        options: tuple[str, ...]) -> None:
    dumped = _stats(stack, tmp_path, monkeypatch, options)
    assert dumped["spin_us"] == 0 and dumped["spin_hits"] == 0, dumped
    assert dumped["spin_misses"] == 0 and dumped["spin_skips"] == 0, dumped


def test_no_spin_on_a_single_cpu(stack: Stack, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that shares its only CPU with the client would spin while the client needs
    that CPU to send the next request: the spin is off then, whatever `-o spin` says."""
    with _one_cpu():
        dumped = _stats(stack, tmp_path, monkeypatch, ("spin=200",))
    assert dumped["loop"] == "direct", dumped
    assert dumped["spin_us"] == 0 and dumped["spin_hits"] == 0 and dumped["spin_misses"] == 0


def test_spin_option() -> None:
    assert parse_options(["spin=0"])["spin"] == 0
    assert parse_options(["spin=10000"])["spin"] == 10000
    assert "spin" not in parse_options(["lowerdir=/a"])


@contextlib.contextmanager
def _cpu_quota(cpus: float) -> Iterator[None]:
    """This process (and so the server it starts) in a new cgroup allowed CPUS CPUs' worth of
    time (cgroup v1 `cpu` controller, else v2 `cpu.max`), until the block ends."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        parent = v1
        group = v1 / f"unionfs-spin-test-{os.getpid()}"
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
    else:
        parent = Path("/sys/fs/cgroup")
        group = parent / f"unionfs-spin-test-{os.getpid()}"
        group.mkdir()
        (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
    try:
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (parent / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        group.rmdir()


def test_no_spin_under_a_cpu_quota_of_one_cpu(stack: Stack, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CPUs by affinity but one CPU's worth of time by the cgroup: spinning would spend
    the client's share. Off then; on again with a quota of two CPUs."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")  # (the single-CPU case is the test above)
    with _cpu_quota(1.0):
        dumped = _stats(stack, tmp_path, monkeypatch, ("spin=200",))
    assert dumped["spin_us"] == 0 and dumped["spin_hits"] == 0, dumped
    with _cpu_quota(2.0):
        assert spin_time(200) == 200


def test_cpu_quota_reading(tmp_path: Path) -> None:
    def tree(lines: str, files: dict[str, str]) -> float | None:
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "proc").write_text(lines)
        return cpu_quota(str(root / "proc"), str(root / "fs"))

    # v2: the smallest quota on the way up; "max" is no limit
    assert tree("0::/a/b\n", {"fs/cgroup.controllers": "cpu", "fs/a/cpu.max": "150000 100000",
                              "fs/a/b/cpu.max": "max 100000"}) == 1.5
    assert tree("0::/a\n", {"fs/cgroup.controllers": "cpu", "fs/a/cpu.max": "max 100000"}) is None
    # v1, the controller mounted as cpu,cpuacct or as cpu
    assert tree("2:cpu,cpuacct:/x\n1:memory:/y\n",
                {"fs/cpu,cpuacct/x/cpu.cfs_quota_us": "50000",
                 "fs/cpu,cpuacct/x/cpu.cfs_period_us": "100000"}) == 0.5
    assert tree("1:cpu:/x\n", {"fs/cpu/cpu.cfs_quota_us": "-1",
                               "fs/cpu/cpu.cfs_period_us": "100000",
                               "fs/cpu/x/cpu.cfs_quota_us": "300000",
                               "fs/cpu/x/cpu.cfs_period_us": "100000"}) == 3.0
    # hybrid: v2 beside v1 under unified/, the v1 quota the smaller
    assert tree("1:cpu:/\n0::/s\n", {"fs/cpu/cpu.cfs_quota_us": "100000",
                                     "fs/cpu/cpu.cfs_period_us": "100000",
                                     "fs/unified/s/cpu.max": "200000 100000"}) == 1.0
    assert tree("garbage\n", {}) is None
    assert cpu_quota(str(tmp_path / "absent")) is None
