"""Scaling curves: how the cost of each backend grows with the work.

- `layers`: cold lookups (lstat of existing names spread over all layers, and of missing names,
  which must be looked up in every layer) after the mount, the same lookups made as soon as
  the mount is ready (caches dropped before mounting, as a container's first lookups), and a
  cold `find` walk, with 1, 4, 16 and 64 lower layers holding the same files.
- `dirsize`: one directory of 10 .. 100,000 entries (half in each of two layers): cold listing
  (`os.listdir`) and cold lookup of every entry.
- `copyup`: appending one byte to a lower file of 4 KiB .. 1 GiB (the lower data in the page
  cache, so the union's copy is measured, not the disk).
- `rss`: server memory after a cold `find -printf` over trees of 10k and 100k entries, as bytes
  per cached inode (FUSE servers only); `rss_forgotten`: what is left of that growth after the
  kernel dropped its dentries and inodes and sent the FORGETs.

Each point is measured `rounds` times, interleaved across backends, on fresh mounts; the median
is kept. For each curve and backend a least-squares line is fitted and its slope stated, plus the
log-log exponent (1 = linear). Generated trees are cached under the dataset cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import backends as bk
from .datasets import MiB, cache_dir
from .trees import flatten, to_unionfs_fuse
from .util import (
    BenchError,
    Progress,
    drop_caches,
    fmt_seconds,
    machine_info,
    render_table,
    rmtree,
    run,
    scratch_dir,
    write_pattern,
)
from .workloads import py

_LOOKUPS = """\
t = time.perf_counter()
for p in paths:
    try:
        os.lstat(base + "/" + p)
    except FileNotFoundError:
        pass
print(time.perf_counter() - t)
"""

LOOKUP = """\
import os, sys, time
paths = open(sys.argv[1]).read().split("\\0")
base = sys.argv[2]
""" + _LOOKUPS

LOOKUP_AT_MOUNT = """\
import os, sys, time
paths = open(sys.argv[1]).read().split("\\0")
print("ready", flush=True)
base = sys.stdin.readline().strip()  # the mount point, as soon as it is mounted
""" + _LOOKUPS

LISTDIR = """\
import os, sys, time
t = time.perf_counter()
n = len(os.listdir(sys.argv[1]))
print(time.perf_counter() - t)
"""


@dataclass(frozen=True)
class Limits:
    layer_files: int
    layer_counts: tuple[int, ...]
    lookups: int
    dir_sizes: tuple[int, ...]
    copyup_sizes: tuple[int, ...]
    rss_sizes: tuple[int, ...]


KiB = 1 << 10
_COPY_ALL = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB, 1024 * MiB)
LIMITS = {
    "tiny": Limits(200, (1, 4, 16), 100, (10, 100, 1000), _COPY_ALL[:3], (500, 2000)),
    "small": Limits(2000, (1, 4, 16, 64), 1000, (10, 100, 1000, 10000), _COPY_ALL[:4],
                    (2000, 10000)),
    "medium": Limits(5000, (1, 4, 16, 64), 2000, (10, 100, 1000, 10000, 100000),
                     _COPY_ALL[:5], (10000, 100000)),
    "full": Limits(20000, (1, 4, 16, 64), 5000, (10, 100, 1000, 10000, 100000), _COPY_ALL,
                   (10000, 100000)),
}


# -- generated stacks -----------------------------------------------------------------------------

@dataclass
class GenStack:
    root: Path
    layers: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flat(self) -> Path:
        return self.root / "flat"

    def stack(self, ufs_metadir: str | None, mutable: Sequence[str] = ()) -> bk.Stack:
        ufs = None
        if ufs_metadir:
            out = self.root / f"ufs{ufs_metadir}"
            if not (out / ".complete").exists():
                rmtree(out)
                for i, layer in enumerate(self.layers):
                    to_unionfs_fuse(layer, out / str(i), ufs_metadir)
                (out / ".complete").touch()
            ufs = tuple(out / str(i) for i in range(len(self.layers)))
        return bk.Stack(tuple(self.layers), self.flat, ufs, tuple(mutable))


def _cached(root: Path, build: Callable[[Path], dict[str, Any]], nlayers: int) -> GenStack:
    done = root / "manifest.json"
    if not done.exists():
        rmtree(root)
        tmp = root.with_name(root.name + ".tmp")
        rmtree(tmp)
        tmp.mkdir(parents=True)
        extra = build(tmp)
        flatten([tmp / "layers" / str(i) for i in range(nlayers)], tmp / "flat")
        (tmp / "manifest.json").write_text(json.dumps(extra))
        os.rename(tmp, root)
    extra = json.loads(done.read_text())
    return GenStack(root, [root / "layers" / str(i) for i in range(nlayers)], extra)


def layer_of(f: int, nlayers: int) -> int:
    """The layer of `layers_stack` that holds file number F."""
    return (f * 7919) % nlayers


def layers_stack(cache: Path, nlayers: int, nfiles: int) -> GenStack:
    """`nfiles` empty files in directories of 50, spread over `nlayers` layers (every layer has
    every directory, as image layers do)."""
    def build(tmp: Path) -> dict[str, Any]:
        ndirs = max(1, nfiles // 50)
        for i in range(nlayers):
            for d in range(ndirs):
                (tmp / "layers" / str(i) / f"d{d:04d}").mkdir(parents=True)
        for f in range(nfiles):
            layer = layer_of(f, nlayers)
            (tmp / "layers" / str(layer) / f"d{f % ndirs:04d}" / f"f{f:06d}").touch()
        return {"ndirs": ndirs, "nfiles": nfiles}

    return _cached(cache / f"layers-{nlayers}x{nfiles}", build, nlayers)


def dir_stack(cache: Path, n: int) -> GenStack:
    """One directory `big/` of `n` entries, even ones in the lower layer, odd in the upper."""
    def build(tmp: Path) -> dict[str, Any]:
        for i in range(2):
            (tmp / "layers" / str(i) / "big").mkdir(parents=True)
        for k in range(n):
            (tmp / "layers" / str(k % 2) / "big" / f"e{k:06d}").touch()
        return {"n": n}

    return _cached(cache / f"dir-{n}", build, 2)


def copyup_stack(cache: Path, sizes: Sequence[int]) -> GenStack:
    def build(tmp: Path) -> dict[str, Any]:
        (tmp / "layers" / "0").mkdir(parents=True)
        for s in sizes:
            write_pattern(tmp / "layers" / "0" / f"f{s}", s, s)
        return {"sizes": list(sizes)}

    return _cached(cache / ("copyup-" + "-".join(str(s) for s in sizes)), build, 1)


def tree_stack(cache: Path, n: int) -> GenStack:
    """A tree of `n` entries (dirs of 100 files) in two layers, for the RSS curve."""
    def build(tmp: Path) -> dict[str, Any]:
        ndirs = max(1, n // 101)
        for i in range(2):
            for d in range(ndirs):
                (tmp / "layers" / str(i) / f"d{d:04d}").mkdir(parents=True)
        for k in range(n - ndirs):
            (tmp / "layers" / str(k % 2) / f"d{k % ndirs:04d}" / f"f{k:06d}").touch()
        return {"n": n}

    return _cached(cache / f"tree-{n}", build, 2)


# -- fitting --------------------------------------------------------------------------------------

def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line, None with fewer than two distinct x."""
    pts = [(x, y) for x, y in points if y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    sxy = sum((x - mx) * (y - my) for x, y in pts)
    slope = sxy / sxx
    return my - slope * mx, slope


def loglog_exponent(points: Sequence[tuple[float, float]]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y is not None and y > 0]
    fit = linear_fit(pts)
    return None if fit is None else fit[1]


# -- measuring ------------------------------------------------------------------------------------

@dataclass
class Curve:
    name: str
    title: str
    xlabel: str
    ylabel: str
    unit: str
    points: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    """series name -> x -> measured values"""
    slope_unit: str = ""
    slope_scale: float = 1.0

    def add(self, series: str, x: int, y: float) -> None:
        self.points.setdefault(series, {}).setdefault(x, []).append(y)

    def medians(self, series: str) -> list[tuple[float, float]]:
        return [(float(x), statistics.median(v)) for x, v in sorted(self.points[series].items())]

    def fits(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for s in self.points:
            pts = self.medians(s)
            fit = linear_fit(pts)
            out[s] = {"intercept": None if fit is None else fit[0],
                      "slope": None if fit is None else fit[1],
                      "exponent": loglog_exponent(pts)}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "xlabel": self.xlabel,
                "ylabel": self.ylabel, "unit": self.unit, "slope_unit": self.slope_unit,
                "points": {s: {str(x): v for x, v in d.items()} for s, d in self.points.items()},
                "medians": {s: self.medians(s) for s in self.points}, "fits": self.fits()}


def _timed(argv: list[str], timeout: float, self_timed: bool) -> float:
    t0 = time.perf_counter()
    res = run(argv, timeout=timeout, capture=self_timed)
    t = time.perf_counter() - t0
    return float(res.stdout.split()[-1]) if self_timed else t


@dataclass
class Scaler:
    backends: list[bk.Backend]
    rounds: int
    scratch: Path
    cache: Path
    progress: Progress
    timeout: float = 1800.0
    ufs_metadir: str | None = None

    def each(self, label: str, fn: Callable[[bk.Backend, int], None]) -> None:
        """Call fn(backend, round) for every round and backend, interleaved."""
        for r in range(self.rounds):
            order = self.backends[r % len(self.backends):] + self.backends[:r % len(self.backends)]
            for b in order:
                self.progress.step(f"{label} round {r + 1}/{self.rounds} {b.name}")
                try:
                    fn(b, r)
                except (BenchError, RuntimeError, OSError) as e:
                    self.progress.note(f"{label} on {b.name} failed: {e}")

    @contextlib.contextmanager
    def mount(self, b: bk.Backend, gs: GenStack, mutable: Sequence[str] = ()
              ) -> Iterator[bk.Mounted]:
        with scratch_dir(self.scratch, f"{b.name}-") as where, \
                b.mount(gs.stack(self.ufs_metadir, mutable), where) as m:
            yield m


FLOOR = "lstat in its layer"
"""The depth curve's baseline without any union: every name lstat'ed in the layer directory
that holds it (a missing name in the top layer's), cold, as the union must at least."""


def curve_layers(sc: Scaler, lim: Limits) -> list[Curve]:
    look = Curve("layers_lookup", "cold lookup vs lower layers", "lower layers",
                 "us per lookup", "us", slope_unit="us per lookup per added layer")
    start = Curve("layers_lookup_at_mount", "cold lookup at mount vs lower layers",
                  "lower layers", "us per lookup", "us",
                  slope_unit="us per lookup per added layer")
    walk = Curve("layers_walk", "cold find walk vs lower layers", "lower layers",
                 "seconds", "s", slope_unit="ms per added layer", slope_scale=1e3)
    for nl in lim.layer_counts:
        gs = layers_stack(sc.cache, nl, lim.layer_files)
        ndirs = int(gs.extra["ndirs"])
        rnd = random.Random(nl)
        files = rnd.sample(range(lim.layer_files), min(lim.lookups, lim.layer_files))
        names = [f"d{f % ndirs:04d}/f{f:06d}" for f in files]
        missing = [f"d{rnd.randrange(ndirs):04d}/missing{k}" for k in range(lim.lookups // 2)]
        listfile = sc.scratch / f"lookups-{nl}.txt"
        listfile.write_text("\0".join(names + missing))
        floorfile = sc.scratch / f"lookups-{nl}-floor.txt"
        floorfile.write_text("\0".join(
            [str(gs.layers[layer_of(f, nl)] / n)[1:] for f, n in zip(files, names, strict=True)]
            + [str(gs.layers[0] / n)[1:] for n in missing]))

        def one(b: bk.Backend, r: int, gs: GenStack = gs, nl: int = nl,
                listfile: Path = listfile, floorfile: Path = floorfile,
                n: int = len(names) + len(missing)) -> None:
            if b is sc.backends[0]:  # once a round, beside the backends
                drop_caches()
                look.add(FLOOR, nl, _timed(py(LOOKUP, floorfile, ""), sc.timeout, True) / n * 1e6)
            with sc.mount(b, gs) as m:
                drop_caches()
                t = _timed(py(LOOKUP, listfile, m.mnt), sc.timeout, True)
                look.add(b.name, nl, t / n * 1e6)
            start.add(b.name, nl, _at_mount(sc, b, gs, listfile) / n * 1e6)
            with sc.mount(b, gs) as m:
                drop_caches()
                walk.add(b.name, nl, _timed(["find", str(m.mnt)], sc.timeout, False))

        sc.each(f"layers={nl}", one)
    return [look, start, walk]


def _at_mount(sc: Scaler, b: bk.Backend, gs: GenStack, listfile: Path) -> float:
    """Seconds of the lookups in LISTFILE made as soon as the mount is ready, caches dropped
    before the mount (as a container's first lookups): the client is started and has read its
    list before, and is handed the mount point when it is mounted."""
    client = subprocess.Popen(py(LOOKUP_AT_MOUNT, listfile), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != b"ready":
            raise BenchError("the lookup client did not start")
        drop_caches()
        with sc.mount(b, gs) as m:
            out, _ = client.communicate(f"{m.mnt}\n".encode(), timeout=sc.timeout)
        if client.returncode != 0:
            raise BenchError(f"the lookup client failed ({client.returncode})")
        return float(out.split()[-1])
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"lookups at mount timed out after {sc.timeout:.0f}s") from e
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def curve_dirsize(sc: Scaler, lim: Limits) -> list[Curve]:
    lst = Curve("dir_list", "cold listing of one directory", "entries", "seconds", "s",
                slope_unit="us per entry", slope_scale=1e6)
    look = Curve("dir_lookup", "cold lookup of every entry of one directory", "entries",
                 "seconds", "s", slope_unit="us per entry", slope_scale=1e6)
    for n in lim.dir_sizes:
        gs = dir_stack(sc.cache, n)
        names = [f"big/e{k:06d}" for k in random.Random(n).sample(range(n), n)]
        listfile = sc.scratch / f"dir-{n}.txt"
        listfile.write_text("\0".join(names))

        def one(b: bk.Backend, r: int, gs: GenStack = gs, n: int = n,
                listfile: Path = listfile) -> None:
            with sc.mount(b, gs) as m:
                drop_caches()
                lst.add(b.name, n, _timed(py(LISTDIR, m.mnt / "big"), sc.timeout, True))
            with sc.mount(b, gs) as m:
                drop_caches()
                look.add(b.name, n, _timed(py(LOOKUP, listfile, m.mnt), sc.timeout, True))

        sc.each(f"dir entries={n}", one)
    return [lst, look]


def curve_copyup(sc: Scaler, lim: Limits) -> list[Curve]:
    cu = Curve("copyup", "copy-up: append 1 byte to a lower file", "file size (bytes)",
               "seconds", "s", slope_unit="s per GiB", slope_scale=float(1 << 30))
    gs = copyup_stack(sc.cache, lim.copyup_sizes)
    for size in lim.copyup_sizes:
        rel = f"f{size}"

        def one(b: bk.Backend, r: int, rel: str = rel, size: int = size) -> None:
            with sc.mount(b, gs, mutable=(rel,)) as m:
                run(["cat", str(gs.layers[0] / rel)], timeout=sc.timeout)
                t = _timed(["sh", "-c", 'printf x >> "$1"', "sh", str(m.mnt / rel)],
                           sc.timeout, False)
                if os.path.getsize(m.mnt / rel) != size + 1:
                    raise BenchError(f"copy-up of {rel}: wrong size after append")
                cu.add(b.name, size, t)

        sc.each(f"copy-up {size} bytes", one)
    return [cu]


def curve_rss(sc: Scaler, lim: Limits) -> list[Curve]:
    rss = Curve("rss", "server RSS growth during a cold find -printf", "entries walked",
                "RSS growth (bytes)", "B", slope_unit="bytes per cached inode")
    kept = Curve("rss_forgotten", "server RSS growth left after the kernel forgot the inodes",
                 "entries walked", "RSS growth (bytes)", "B",
                 slope_unit="bytes per forgotten inode")
    fuse = [b for b in sc.backends if b.fuse]
    for n in lim.rss_sizes:
        gs = tree_stack(sc.cache, n)

        def one(b: bk.Backend, r: int, gs: GenStack = gs, n: int = n) -> None:
            with sc.mount(b, gs) as m:
                drop_caches()
                before = m.sample(requests=False).rss_kib
                run(["find", str(m.mnt), "-printf", "%m %s\n"], timeout=sc.timeout)
                after = m.sample(requests=False).rss_kib
                if before is None or after is None:
                    raise BenchError("no RSS reading")
                rss.add(b.name, n, (after - before) * 1024)
                # the kernel drops its dentries and inodes and sends FORGETs; give the server
                # a moment to process them, then see what it still holds
                drop_caches()
                left = after
                for _ in range(20):
                    time.sleep(0.1)
                    now = m.sample(requests=False).rss_kib
                    if now is None:
                        raise BenchError("no RSS reading")
                    if now == left and now < after:
                        break
                    left = now
                kept.add(b.name, n, (left - before) * 1024)

        saved = sc.backends
        sc.backends = fuse
        try:
            sc.each(f"rss entries={n}", one)
        finally:
            sc.backends = saved
    return [rss, kept]


CURVES: dict[str, Callable[[Scaler, Limits], list[Curve]]] = {
    "layers": curve_layers, "dirsize": curve_dirsize, "copyup": curve_copyup, "rss": curve_rss}


def _fmt(v: float, unit: str, x: int = 0) -> str:
    if unit == "s":
        return fmt_seconds(v)
    if unit == "us":
        return f"{v:.1f}us"
    if unit == "B":
        return f"{v / MiB:.2f}MiB ({v / max(1, x):.0f}B/entry)" if x else f"{v / MiB:.2f}MiB"
    return f"{v:.0f}{unit}"


def render_curves(curves: Sequence[Curve]) -> str:
    parts = []
    for c in curves:
        series = list(c.points)
        xs = sorted({x for s in series for x in c.points[s]})
        rows = [[str(x), *(_fmt(statistics.median(c.points[s][x]), c.unit, x)
                           if x in c.points[s] else "-" for s in series)] for x in xs]
        parts += [f"{c.title} ({c.ylabel}, median)", render_table([c.xlabel, *series], rows)]
        fits = c.fits()
        fl = []
        for s in series:
            f = fits[s]
            slope = f["slope"]
            exp = f["exponent"]
            slope_txt = "-" if slope is None else f"{slope * c.slope_scale:.3g} {c.slope_unit}"
            exp_txt = f"{exp:.2f}" if exp is not None else "-"
            fl.append(f"  {s}: slope {slope_txt}; log-log exponent {exp_txt}")
        parts += ["fit (least squares):", *fl, ""]
    return "\n".join(parts)


def panels(curves: Sequence[Curve]) -> list[dict[str, Any]]:
    out = []
    for c in curves:
        out.append({"title": c.title, "xlabel": c.xlabel, "ylabel": c.ylabel,
                    "series": {s: c.medians(s) for s in c.points},
                    "logx": True, "logy": True})
    return out


def run_scaling(backends: Sequence[str], curves: Sequence[str], scale: str, rounds: int,
                cache: Path | None, quiet: bool = False) -> tuple[dict[str, Any], list[Curve]]:
    lim = LIMITS[scale]
    progress = Progress(0, quiet)
    chosen, skipped, metadir = bk.prepare(backends, progress.note)
    base = cache_dir(cache)
    gen_cache = base / "scaling"
    n_fuse = sum(1 for b in chosen if b.fuse)
    sizes = {"layers": len(lim.layer_counts) * len(chosen),
             "dirsize": len(lim.dir_sizes) * len(chosen),
             "copyup": len(lim.copyup_sizes) * len(chosen),
             "rss": len(lim.rss_sizes) * n_fuse}
    progress.total = rounds * sum(sizes[c] for c in curves)
    out: list[Curve] = []
    started = time.time()
    with scratch_dir(base / "runs", f"scaling-{os.getpid()}-") as scratch:
        sc = Scaler(chosen, rounds, scratch, gen_cache, progress, ufs_metadir=metadir)
        try:
            for name in curves:
                if name not in CURVES:
                    raise ValueError(f"unknown curve {name!r} (known: {', '.join(CURVES)})")
                out += CURVES[name](sc, lim)
        finally:
            progress.finish()
    meta = {"machine": machine_info(), "scale": scale, "rounds": rounds,
            "limits": lim.__dict__, "skipped_backends": skipped,
            "versions": {b.name: b.version() for b in chosen},
            "elapsed_s": round(time.time() - started, 1)}
    return meta, out


def main(args: argparse.Namespace) -> int:
    from .report import MissingDependency, describe_meta, line_chart

    curves = [c.strip() for c in args.curves.split(",") if c.strip()]
    meta, result = run_scaling(bk.parse_backends(args.fs), curves, args.scale, args.rounds,
                               args.cache, args.quiet)
    print(describe_meta({**meta, "dataset": "generated", "entries": "-"}))
    print()
    print(render_curves(result))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "curves": [c.to_json() for c in result]},
                                        indent=1) + "\n")
        print(f"JSON: {args.json}")
    if args.plot:
        try:
            line_chart(args.plot, panels(result),
                       f"scaling ({args.scale}), {meta['machine']['date']}")
            print(f"chart: {args.plot}")
        except MissingDependency as e:
            print(f"no chart: {e}", file=sys.stderr)
            return 1
    return 0
