"""Smoke tests of the side-by-side harness, the scaling curves and the tree tools.

One round of every workload on the tiny synthetic dataset and every installed backend: the run
completes, every cell is filled, the backends show the same tree and leave the same results, and
the table, JSON and chart come out. No timing is ever asserted.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import backends as bk
from benchmarks import mounts, report, scaling
from benchmarks.datasets import SCALES, ensure_dataset
from benchmarks.runner import Results, RunOptions, run_benchmark
from benchmarks.trees import (
    describe,
    diff,
    flatten,
    is_opaque,
    make_opaque,
    make_whiteout,
    snapshot,
    to_unionfs_fuse,
)
from benchmarks.util import fmt_seconds
from benchmarks.workloads import WORKLOADS

REPO = Path(__file__).resolve().parents[2]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(bench_cache: Path, installed_backends: list[str]) -> Results:
    res = run_benchmark(RunOptions(backends=installed_backends, rounds=1, scale="tiny",
                                   cache=bench_cache, quiet=True))
    assert not mounts.mounts_below(bench_cache), "a mount was left behind"
    return res


def test_every_cell_is_measured(smoke: Results, installed_backends: list[str],
                                bench_cache: Path) -> None:
    assert smoke.backends == installed_backends
    features = ensure_dataset("synthetic", SCALES["tiny"], bench_cache).features
    expected = [w.name for w in WORKLOADS if not w.needs - features]
    assert smoke.workloads == expected
    for w in smoke.workloads:
        for b in smoke.backends:
            cell = smoke.cell(w, b)
            assert not cell.errors, (w, b, cell.errors)
            assert len(cell.times) == 1 and cell.times[0] > 0, (w, b)
            if bk.BACKENDS[b].fuse:
                assert len(cell.cpu) == 1 and cell.cpu[0] >= 0, (w, b)
            # every mount is timed (native mounts nothing)
            assert len(cell.mounts) == (0 if b == "native" else 1), (w, b)
            assert all(0 < t < mounts.MOUNT_TIMEOUT for t in cell.mounts), (w, b)
    # python3 is only in the rootfs dataset: skipped with a reason, not silently
    assert set(smoke.skipped_workloads) == {w.name for w in WORKLOADS} - set(expected)
    assert {"chroot_python_cold", "chroot_python_warm"} <= set(smoke.skipped_workloads)


def test_backends_agree(smoke: Results) -> None:
    assert smoke.tree_check == {b: [] for b in smoke.backends}
    writing = [w.name for w in WORKLOADS if w.check and w.name in smoke.workloads]
    assert writing
    for w in writing:
        for b in smoke.backends:
            cell = smoke.cell(w, b)
            assert cell.agrees is True, (w, b, cell.differences)


def test_json_has_every_cell(smoke: Results, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    report.write_json(smoke, path)
    data = json.loads(path.read_text())
    cells = {(c["workload"], c["backend"]) for c in data["cells"]}
    assert cells == {(w, b) for w in smoke.workloads for b in smoke.backends}
    for c in data["cells"]:
        assert c["median"] is not None and c["best"] is not None
        if "native" in smoke.backends:
            assert c["ratio_native"] is not None
        if "fuse-overlayfs" in smoke.backends:
            assert c["ratio_fuse_overlayfs"] is not None
    assert data["meta"]["machine"]["nproc"] >= 1
    again = Results.from_json(data)
    assert report.render_text(again) == report.render_text(smoke)


def test_table_renders(smoke: Results) -> None:
    text = report.render_text(smoke)
    for w in smoke.workloads:
        assert w in text
    for b in smoke.backends:
        assert b in text
    assert "ratio of medians to native" in text
    assert "problems:" not in text, text
    mounted = [b for b in smoke.backends if b != "native"]
    if mounted:  # one row per backend that mounts, with its median
        table = text.split("until the mount point is mounted\n", 1)[1]
        for b in mounted:
            t = smoke.mount_median(b)
            assert t is not None and smoke.mount_count(b) == len(smoke.workloads)
            assert any(line.split()[:2] == [b, fmt_seconds(t)] for line in table.splitlines()), b
        assert not any(line.split()[:1] == ["native"] for line in table.splitlines())


def test_chart(smoke: Results, tmp_path: Path) -> None:
    chart = report.chart_data(smoke)
    ref = chart.reference
    assert ref == ("fuse-overlayfs" if "fuse-overlayfs" in smoke.backends else "native")
    assert set(chart.series) == set(smoke.backends) - {ref}
    for values in chart.series.values():
        assert len(values) == len(smoke.workloads)
        assert all(v is not None and v > 0 for v in values)
    png = tmp_path / "chart.png"
    if _has_matplotlib():
        report.render_chart(chart, png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        # the chart data was checked above; without matplotlib the renderer must say what is
        # missing instead of writing nothing
        with pytest.raises(report.MissingDependency, match="matplotlib"):
            report.render_chart(chart, png)
        assert not png.exists()


def test_cli(bench_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "UNIONFS_BENCH_CACHE": str(bench_cache)}
    out = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--workloads", "list"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=env,
                         check=True).stdout
    assert all(w.name in out for w in WORKLOADS)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--scale", "tiny", "--rounds", "1",
         "--fs", "native,unionfs,unionfs-noopen", "--workloads",
         "walk_cold,copyup", "--json", str(js), "--plot", str(png), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert res.returncode == (0 if _has_matplotlib() else 1), res.stderr
    assert "walk_cold" in res.stdout and "copyup" in res.stdout
    data = json.loads(js.read_text())
    assert {(c["workload"], c["backend"]) for c in data["cells"]} == {
        (w, b) for w in ("walk_cold", "copyup") for b in ("native", "unionfs", "unionfs-noopen")}
    # every backend left the same tree as native (a backend that differs is flagged)
    assert all(c.get("agrees") is not False for c in data["cells"]), data["cells"]
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--fs", "nosuchfs"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 1 and "unknown backend" in bad.stderr


def test_unavailable_backend_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bk, "UNIONFS_FUSE_BIN", "no-such-unionfs-fuse-binary")
    ok, skipped = bk.select(["native", "unionfs-fuse"])
    assert [b.name for b in ok] == ["native"]
    assert "not installed" in skipped["unionfs-fuse"]


def test_scaling_smoke(bench_cache: Path, installed_backends: list[str]) -> None:
    fs = [b for b in ("native", "unionfs", "fuse-overlayfs") if b in installed_backends]
    _, curves = scaling.run_scaling(fs, ["copyup", "rss"], "tiny", 1, bench_cache, quiet=True)
    names = {c.name for c in curves}
    assert names == {"copyup", "rss", "rss_forgotten"}
    cu = next(c for c in curves if c.name == "copyup")
    assert set(cu.points) == set(fs)
    for series in cu.points.values():
        assert set(series) == set(scaling.LIMITS["tiny"].copyup_sizes)
    rss = next(c for c in curves if c.name == "rss")
    assert set(rss.points) == {b for b in fs if bk.BACKENDS[b].fuse}
    left = next(c for c in curves if c.name == "rss_forgotten")
    assert set(left.points) == set(rss.points)
    text = scaling.render_curves(curves)
    assert "slope" in text and "bytes per cached inode" in text
    json.dumps([c.to_json() for c in curves])
    assert not mounts.mounts_below(bench_cache)


def test_linear_fit() -> None:
    fit = scaling.linear_fit([(1, 3), (2, 5), (4, 9)])
    assert fit is not None
    assert fit[0] == pytest.approx(1) and fit[1] == pytest.approx(2)
    exp = scaling.loglog_exponent([(10, 1), (100, 10), (1000, 100)])
    assert exp == pytest.approx(1)
    assert scaling.linear_fit([(1, 1)]) is None


# -- trees: flattening, conversion, snapshots -----------------------------------------------------

def _stack(root: Path) -> list[Path]:
    top, bottom = root / "top", root / "bottom"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d/x").write_text("x")
    (bottom / "gone").write_text("gone")
    (bottom / "o").mkdir()
    (bottom / "o/hidden").write_text("h")
    (bottom / "f").write_text("old")
    (top / "d").mkdir(parents=True)
    (top / "d/y").write_text("y")
    make_whiteout(top / "gone")
    (top / "o").mkdir()
    make_opaque(top / "o")
    (top / "o/new").write_text("n")
    (top / "f").write_text("new!")
    return [top, bottom]


def test_flatten_applies_whiteouts_and_opaque(tmp_path: Path) -> None:
    layers = _stack(tmp_path)
    flatten(layers, tmp_path / "flat")
    snap = snapshot(tmp_path / "flat")
    assert sorted(snap) == ["d", "d/x", "d/y", "f", "o", "o/new"]
    assert snap["f"][4] == 4  # size of the top layer's file
    assert not is_opaque(tmp_path / "flat/o")


def test_unionfs_fuse_conversion(tmp_path: Path) -> None:
    layers = _stack(tmp_path)
    out = tmp_path / "ufs-top"
    to_unionfs_fuse(layers[0], out, ".unionfs-fuse")
    assert (out / ".unionfs-fuse/gone_HIDDEN~").exists()
    assert (out / ".unionfs-fuse/o_HIDDEN~").exists()
    assert not os.path.lexists(out / "gone")
    assert (out / "o/new").read_text() == "n"
    assert not is_opaque(out / "o")
    # ignored when snapshotting the merged view
    assert ".unionfs-fuse" not in snapshot(out)


def test_snapshot_and_diff(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_bytes(b"1")
    os.symlink("nowhere", tmp_path / "l")
    one = snapshot(tmp_path)
    assert one["l"][0] == "l" and one["l"][-1] == "nowhere"
    assert describe(tmp_path / "a")[0] == "d"
    (tmp_path / "b").write_bytes(b"2")
    os.chmod(tmp_path / "a", 0o700)
    two = snapshot(tmp_path)
    d = diff(one, two)
    assert len(d) == 2 and any("'a'" in x for x in d) and any("'b'" in x for x in d)
    assert snapshot(tmp_path, ["missing"]) == {"missing": ("absent",)}
    assert stat.S_ISDIR(os.lstat(tmp_path / "a").st_mode)


def test_synthetic_dataset_is_cached(bench_cache: Path) -> None:
    a = ensure_dataset("synthetic", SCALES["tiny"], bench_cache, log=lambda s: None)
    b = ensure_dataset("synthetic", SCALES["tiny"], bench_cache,
                       log=lambda s: pytest.fail(f"rebuilt: {s}"))
    assert a == b and a.entries > 100 and len(a.layers) == 3
    assert a.tarball.stat().st_size > 0


def test_lower_cache_backends(bench_cache: Path) -> None:
    """`unionfs` keeps its lower cache in a directory of the run's own (round 1 learns, the
    others read it), `unionfs-autoindex` leaves an index there after its first round, and
    `unionfs-nocache` keeps nothing; all three measure every point of the depth curve, and so
    does its baseline without a union (the names lstat'ed in their own layers)."""
    fs = ["unionfs", "unionfs-nocache", "unionfs-autoindex"]
    _, curves = scaling.run_scaling(fs, ["layers"], "tiny", 2, bench_cache, quiet=True)
    assert [c.name for c in curves] == ["layers_lookup", "layers_lookup_at_mount", "layers_walk"]
    for c in curves:
        assert set(c.points) == set(fs) | ({scaling.FLOOR} if c.name == "layers_lookup" else set())
        for series in c.points.values():
            assert set(series) == set(scaling.LIMITS["tiny"].layer_counts)
            assert all(v and min(v) > 0 for v in series.values())
    kept = list(bk.lower_cache_dir().iterdir())
    assert any(p.name.endswith(".layer") for p in kept), kept
    # one index per stack (one stack per layer count), built by unionfs-autoindex
    assert len([p for p in kept if p.name.endswith(".index")]) == len(
        scaling.LIMITS["tiny"].layer_counts), kept
