"""The side-by-side run: every selected workload on every available backend, round-robin.

Order: for each round, for each workload, every backend in turn (the backend order rotates from
one workload and round to the next), so slow drifts of a noisy machine hit all backends alike.
Every cell gets a fresh mount (fresh upper and work directories, or a fresh copy for native).

Before the rounds, every backend's merged view is snapshotted once and compared with native (the
flattened tree): a backend that shows a different tree is flagged. In the first round the state
each writing workload leaves behind (`Workload.check`) is compared the same way. Results are
kept as plain data (`Results`), rendered by `report`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import backends as bk
from . import mounts
from .datasets import SCALES, Dataset, cache_dir, ensure_dataset
from .trees import Snapshot, diff, snapshot
from .util import BenchError, Progress, can_drop_caches, drop_caches, machine_info, run, scratch_dir
from .workloads import Ctx, Workload
from .workloads import select as select_workloads


@dataclass
class Cell:
    workload: str
    backend: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    requests: list[dict[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    agrees: bool | None = None
    differences: list[str] = field(default_factory=list)
    mounts: list[float] = field(default_factory=list)  # seconds each round's mount took

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def best(self) -> float | None:
        return min(self.times) if self.times else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    def requests_median(self) -> dict[str, int]:
        if not self.requests:
            return {}
        keys = sorted({k for r in self.requests for k in r})
        return {k: int(statistics.median(r.get(k, 0) for r in self.requests)) for k in keys}


@dataclass
class Results:
    meta: dict[str, Any]
    workloads: list[str]
    backends: list[str]
    cells: dict[tuple[str, str], Cell]
    skipped_backends: dict[str, str] = field(default_factory=dict)
    skipped_workloads: dict[str, str] = field(default_factory=dict)
    tree_check: dict[str, list[str]] = field(default_factory=dict)
    """backend -> differences of its initial merged view from native ([] = identical)"""

    def cell(self, workload: str, backend: str) -> Cell:
        return self.cells[(workload, backend)]

    def mount_median(self, backend: str) -> float | None:
        """How long mounting took (start until mounted), median over every cell's mounts."""
        times = [t for (_, b), c in self.cells.items() if b == backend for t in c.mounts]
        return statistics.median(times) if times else None

    def mount_count(self, backend: str) -> int:
        return sum(len(c.mounts) for (_, b), c in self.cells.items() if b == backend)

    def ratio(self, workload: str, backend: str, reference: str) -> float | None:
        if (workload, reference) not in self.cells:
            return None
        a = self.cell(workload, backend).median
        b = self.cell(workload, reference).median
        if a is None or b is None or b <= 0:
            return None
        return a / b

    def to_json(self) -> dict[str, Any]:
        cells = []
        for (w, b), c in self.cells.items():
            d = asdict(c)
            d.update(median=c.median, best=c.best, cpu_median=c.cpu_median,
                     requests_median=c.requests_median(),
                     ratio_native=self.ratio(w, b, "native"),
                     ratio_fuse_overlayfs=self.ratio(w, b, "fuse-overlayfs"))
            cells.append(d)
        return {"meta": self.meta, "workloads": self.workloads, "backends": self.backends,
                "skipped_backends": self.skipped_backends,
                "skipped_workloads": self.skipped_workloads,
                "tree_check": self.tree_check, "cells": cells}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        cells: dict[tuple[str, str], Cell] = {}
        names = {f for f in Cell.__dataclass_fields__}
        for d in data["cells"]:
            c = Cell(**{k: v for k, v in d.items() if k in names})
            cells[(c.workload, c.backend)] = c
        return cls(data["meta"], data["workloads"], data["backends"], cells,
                   data.get("skipped_backends", {}), data.get("skipped_workloads", {}),
                   data.get("tree_check", {}))


@dataclass
class RunOptions:
    backends: list[str]
    workloads: str | None = None
    rounds: int = 3
    dataset: str = "synthetic"
    scale: str = "small"
    cache: Path | None = None
    quiet: bool = False
    check_trees: bool = True


def _rotate(items: Sequence[bk.Backend], k: int) -> list[bk.Backend]:
    if not items:
        return []
    k %= len(items)
    return [*items[k:], *items[:k]]


def run_cell(backend: bk.Backend, w: Workload, ds: Dataset, stack: bk.Stack, where: Path,
             check: bool) -> tuple[float, bk.Sample, bk.Sample, Snapshot | None, float | None]:
    """One measurement: fresh mount, setup, cache preparation, the timed command. Also
    returns how long the mount took."""
    with backend.mount(stack, where) as m:
        ctx = Ctx(m.mnt, ds)
        timeout = ds.scale.timeout
        for argv in w.setup(ctx):
            run(argv, timeout=timeout)
        argv = w.cmd(ctx)
        if w.cache == "warm":
            run(argv, timeout=timeout)
        if w.cache == "cold":
            drop_caches()
        else:
            # write back what setup and earlier cells left dirty (for FUSE with writeback
            # caching this also sends the pending SETATTRs now, not during the measurement)
            os.sync()
        before = m.sample()
        t0 = time.perf_counter()
        res = run(argv, timeout=timeout, capture=w.self_timed)
        elapsed = time.perf_counter() - t0
        after = m.sample()
        if w.self_timed:
            elapsed = float(res.stdout.split()[-1])
        snap = snapshot(m.mnt, w.check) if check and w.check else None
        return elapsed, before, after, snap, m.mount_s


def _delta(before: bk.Sample, after: bk.Sample) -> tuple[float | None, dict[str, int] | None]:
    cpu = bk.cpu_delta(before, after)
    reqs = None
    if before.requests is not None and after.requests is not None:
        reqs = {k: v - before.requests.get(k, 0) for k, v in after.requests.items()
                if v - before.requests.get(k, 0)}
    return cpu, reqs


def check_initial_trees(ds: Dataset, stack: bk.Stack, backends: Sequence[bk.Backend],
                        scratch: Path, progress: Progress) -> dict[str, list[str]]:
    """Snapshot each backend's merged view; compare with the flattened tree."""
    expected = snapshot(ds.flat)
    out: dict[str, list[str]] = {}
    for b in backends:
        progress.show(f"checking the merged view of {b.name}")
        try:
            with scratch_dir(scratch, f"check-{b.name}-") as where, \
                    b.mount(stack, where) as m:
                out[b.name] = diff(expected, snapshot(m.mnt))
        except (BenchError, RuntimeError, OSError) as e:
            out[b.name] = [f"could not check: {e}"]
    return out


def run_benchmark(opts: RunOptions, log: Callable[[str], None] | None = None) -> Results:
    bk.require_root()
    if not can_drop_caches():
        raise BenchError("cannot write /proc/sys/vm/drop_caches")
    scale = SCALES[opts.scale]
    progress = Progress(0, opts.quiet)
    note = log or progress.note
    ds = ensure_dataset(opts.dataset, scale, opts.cache, log=note)
    chosen, skipped = bk.select(opts.backends)
    stack = ds.stack(bk.probe_unionfs_fuse(chosen, skipped))
    for name, why in skipped.items():
        note(f"skipping {name}: {why}")
    workloads, wskipped = select_workloads(opts.workloads, ds)
    for name, why in wskipped.items():
        note(f"skipping workload {name}: {why}")
    meta: dict[str, Any] = {
        "machine": machine_info(),
        "dataset": ds.kind, "scale": scale.name, "entries": ds.entries,
        "scale_params": asdict(scale), "rounds": opts.rounds,
        "versions": {b.name: b.version() for b in chosen},
        "command": "python -m benchmarks run",
    }
    res = Results(meta, [w.name for w in workloads], [b.name for b in chosen], {},
                  skipped, wskipped)
    for w in workloads:
        for b in chosen:
            res.cells[(w.name, b.name)] = Cell(w.name, b.name)
    scratch = cache_dir(opts.cache) / "runs"
    progress.total = opts.rounds * len(workloads) * len(chosen)
    started = time.time()
    with scratch_dir(scratch, f"run-{os.getpid()}-") as rundir:
        try:
            if opts.check_trees:
                res.tree_check = check_initial_trees(ds, stack, chosen, rundir, progress)
                for name, d in res.tree_check.items():
                    if d:
                        note(f"WARNING: {name} shows a different tree than native: "
                             + "; ".join(d[:3]))
            for r in range(opts.rounds):
                for wi, w in enumerate(workloads):
                    snaps: dict[str, Snapshot] = {}
                    for b in _rotate(chosen, r + wi):
                        progress.step(f"round {r + 1}/{opts.rounds}  {w.name:<20} {b.name}")
                        cell = res.cell(w.name, b.name)
                        try:
                            with scratch_dir(rundir, f"{b.name}-") as where:
                                t, before, after, snap, mount_s = run_cell(
                                    b, w, ds, stack, where, check=r == 0)
                        except (BenchError, RuntimeError, OSError, ValueError) as e:
                            cell.errors.append(f"round {r + 1}: {e}")
                            note(f"{w.name} on {b.name} failed: {e}")
                            continue
                        cell.times.append(t)
                        if mount_s is not None:
                            cell.mounts.append(mount_s)
                        cpu, reqs = _delta(before, after)
                        if cpu is not None:
                            cell.cpu.append(cpu)
                        if reqs is not None:
                            cell.requests.append(reqs)
                        if snap is not None:
                            snaps[b.name] = snap
                    if snaps:
                        _compare_snaps(res, w.name, snaps)
        finally:
            progress.finish()
            with contextlib.suppress(Exception):
                mounts.unmount_all_below(rundir)
    meta["elapsed_s"] = round(time.time() - started, 1)
    return res


def _compare_snaps(res: Results, workload: str, snaps: dict[str, Snapshot]) -> None:
    ref_name = "native" if "native" in snaps else sorted(snaps)[0]
    ref = snaps[ref_name]
    for name, snap in snaps.items():
        d = diff(ref, snap)
        cell = res.cell(workload, name)
        cell.agrees = not d
        cell.differences = [f"vs {ref_name}: {x}" for x in d]
