"""Property-based benchmarking: Hypothesis generates workloads, every backend runs them, the
results must agree before the times count, and performance properties are reported pass/fail.

A generated workload (`GenWorkload`) is plain data: lower layers (tree shape, whiteouts, opaque
directories, symlinks, file sizes drawn from one of several distributions) and, for each
concurrent worker, a list of operations drawn from an operation mix. It is derived from
(seed, index) by running the `workloads()` strategy under `hypothesis.seed(seed)` (generation
phase only, no database), so the same seed gives the same workloads with the same Hypothesis
version; saved as JSON it replays anywhere (`--replay FILE`).

Determinism under concurrency: worker k only touches its own scope (the top-level names assigned
to it and its private directory), writes never follow a symlink (O_NOFOLLOW), symlink targets are
always dangling, and directories are never renamed (overlayfs answers EXDEV where a plain
directory would not). So every correct backend ends with the same tree and the same result
(errno) for every operation; a backend that differs is reported as disagreeing and its time does
not count.

Performance properties (stated factors, reported pass/fail, never asserted in tests):
- depth: cold lookups of every entry of a generated tree cost at most DEPTH_FACTOR times more
  when the tree is spread over DEPTH_LAYERS lower layers than when it is in one layer;
- listing: cold listing time grows at most like n^LIST_EXPONENT between n and k*n entries;
- slowdown: on no generated workload is unionfs more than MAX_SLOWDOWN times slower than
  fuse-overlayfs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from . import backends as bk
from .datasets import cache_dir
from .trees import Snapshot, diff, flatten, make_opaque, make_whiteout, snapshot, to_unionfs_fuse
from .util import (
    BenchError,
    Progress,
    drop_caches,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    render_table,
    run,
    scratch_dir,
)
from .workloads import py

FORMAT = "unionfs-bench-workload/1"
DEPTH_FACTOR = 2.0
LIST_EXPONENT = 1.2
MAX_SLOWDOWN = 4.0

NAMES = ("a", "b", "c", "d", "e", "f")
SUB_NAMES = ("a", "b", "c", "d")
DANGLING = "zz-nowhere"
"""every symlink points below this name, which never exists"""


@dataclass(frozen=True)
class PropLimits:
    max_ops: int
    max_entries_per_dir: int
    max_depth: int
    max_file: int
    shape_entries: int
    depth_layers: int
    list_sizes: tuple[int, int]


LIMITS = {
    "tiny": PropLimits(12, 3, 2, 16 << 10, 200, 4, (100, 400)),
    "small": PropLimits(150, 4, 3, 1 << 20, 3000, 16, (1000, 8000)),
    "medium": PropLimits(400, 5, 3, 4 << 20, 8000, 16, (2000, 20000)),
    "full": PropLimits(1000, 6, 3, 16 << 20, 20000, 16, (5000, 50000)),
}


# -- the workload model ---------------------------------------------------------------------------

Entry = dict[str, Any]
"""{"t": "d", "mode": int, "opaque": bool} | {"t": "f", "size", "seed", "mode"} |
{"t": "l", "target"} | {"t": "w"} (whiteout)"""
Op = dict[str, Any]


@dataclass
class GenWorkload:
    seed: int
    index: int
    layers: list[dict[str, Entry]]
    """top-first; each maps a relative path to an entry; parents are directories of the layer"""
    workers: list[list[Op]]
    sizes: str = ""
    mix: str = ""
    hypothesis_version: str = field(default_factory=lambda: hypothesis.__version__)

    @property
    def name(self) -> str:
        return f"s{self.seed}-{self.index}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenWorkload:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved workload ({FORMAT})")
        return cls(int(data["seed"]), int(data["index"]), data["layers"], data["workers"],
                   data.get("sizes", ""), data.get("mix", ""),
                   data.get("hypothesis_version", ""))

    def digest(self) -> str:
        body = json.dumps({"layers": self.layers, "workers": self.workers}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    def summary(self) -> str:
        n_entries = sum(len(layer) for layer in self.layers)
        n_ops = sum(len(w) for w in self.workers)
        return (f"{len(self.layers)} layers, {n_entries} entries, {len(self.workers)} "
                f"worker(s), {n_ops} ops, sizes {self.sizes}, mix {self.mix}")


# -- strategies -----------------------------------------------------------------------------------

SIZE_DISTRIBUTIONS = ("empty-ish", "small", "mixed", "large")
MIXES: dict[str, dict[str, int]] = {
    "read-heavy": {"read": 6, "stat": 4, "list": 3, "write": 1, "append": 1, "mkdir": 1},
    "metadata": {"stat": 3, "list": 2, "mkdir": 3, "rmdir": 2, "unlink": 3, "rename": 3,
                 "chmod": 2, "symlink": 2, "write": 1},
    "write-heavy": {"write": 5, "append": 4, "truncate": 2, "read": 1, "unlink": 1,
                    "mkdir": 1},
    "mixed": {"read": 2, "stat": 2, "list": 1, "write": 2, "append": 1, "truncate": 1,
              "mkdir": 1, "rmdir": 1, "unlink": 1, "rename": 1, "chmod": 1, "symlink": 1},
}


def file_sizes(dist: str, cap: int) -> st.SearchStrategy[int]:
    if dist == "empty-ish":
        return st.integers(0, min(64, cap))
    if dist == "small":
        return st.integers(0, min(8192, cap))
    if dist == "mixed":
        return st.sampled_from([s for s in (0, 1, 100, 4095, 4096, 4097, 65536, 200_000)
                                if s <= cap])
    return st.integers(min(cap, 100_000), cap)


@st.composite
def layer_tree(draw: st.DrawFn, lim: PropLimits, sizes: st.SearchStrategy[int], bottom: bool,
               ) -> dict[str, Entry]:
    out: dict[str, Entry] = {}

    def fill(prefix: str, depth: int, names: Sequence[str]) -> None:
        chosen = draw(st.lists(st.sampled_from(list(names)), unique=True,
                               max_size=lim.max_entries_per_dir))
        for name in chosen:
            path = f"{prefix}{name}"
            kinds = ["f", "f", "l"] + (["d", "d"] if depth < lim.max_depth else []) + \
                ([] if bottom else ["w"])
            kind = draw(st.sampled_from(kinds))
            if kind == "d":
                out[path] = {"t": "d", "mode": draw(st.sampled_from([0o755, 0o750])),
                             "opaque": False if bottom else draw(st.booleans())}
                fill(path + "/", depth + 1, SUB_NAMES)
            elif kind == "f":
                out[path] = {"t": "f", "size": draw(sizes), "seed": draw(st.integers(0, 999)),
                             "mode": draw(st.sampled_from([0o644, 0o600, 0o755]))}
            elif kind == "l":
                out[path] = {"t": "l", "target": f"../{DANGLING}/{name}"}
            else:
                out[path] = {"t": "w"}

    fill("", 1, NAMES)
    return out


def merged_view(layers: Sequence[dict[str, Entry]]) -> dict[str, str]:
    """path -> type ("d", "f", "l") of the union of `layers` (top-first)."""
    view: dict[str, str] = {}
    for layer in reversed(layers):
        for path in sorted(layer, key=lambda p: (p.count("/"), p)):
            e = layer[path]
            below = [p for p in view if p == path or p.startswith(path + "/")]
            if e["t"] == "w" or e["t"] != "d" or view.get(path) != "d" or e.get("opaque"):
                for p in below:
                    del view[p]
            if e["t"] != "w":
                parent = path.rpartition("/")[0]
                if not parent or view.get(parent) == "d":
                    view[path] = e["t"]
    return view


def _scope_of(path: str, nworkers: int) -> int:
    top = path.split("/", 1)[0]
    if top.startswith("w") and top[1:].isdigit():
        return int(top[1:])
    return NAMES.index(top) % nworkers if top in NAMES else 0


@st.composite
def operations(draw: st.DrawFn, lim: PropLimits, view: dict[str, str], worker: int,
               nworkers: int, weights: dict[str, int], sizes: st.SearchStrategy[int]
               ) -> list[Op]:
    """Ops confined to the worker's scope, drawn against a model of the tree so most succeed."""
    model = {p: t for p, t in view.items() if _scope_of(p, nworkers) == worker}
    private = f"w{worker}"
    ops: list[Op] = [{"op": "mkdir", "path": private}]
    model[private] = "d"
    mine = [n for n in NAMES if NAMES.index(n) % nworkers == worker]
    kinds = sorted(weights)
    cum = [weights[k] for k in kinds]
    n = draw(st.integers(1, lim.max_ops))
    counter = 0

    def pick(kind_filter: Callable[[str], bool]) -> str | None:
        cands = sorted(p for p, t in model.items() if kind_filter(t))
        return draw(st.sampled_from(cands)) if cands else None

    def new_name() -> str:
        nonlocal counter
        parent = pick(lambda t: t == "d")
        counter += 1
        if parent is None or draw(st.integers(0, 4)) == 0:
            base = draw(st.sampled_from([*mine, private])) if mine else private
            if base in model and model[base] != "d":
                base = private
            return f"{base}/n{counter}" if base in model else base
        return f"{parent}/{draw(st.sampled_from([*SUB_NAMES, f'n{counter}']))}"

    for _ in range(n):
        r = draw(st.integers(0, sum(cum) - 1))
        kind = kinds[-1]
        for k, c in zip(kinds, cum, strict=True):
            if r < c:
                kind = k
                break
            r -= c
        if kind in ("read", "append", "truncate", "chmod"):
            path = pick(lambda t: t == "f")
            if path is None:
                continue
            op: Op = {"op": kind, "path": path}
            if kind == "append":
                op.update(size=draw(sizes), seed=draw(st.integers(0, 999)))
            elif kind == "truncate":
                op.update(size=draw(sizes))
            elif kind == "chmod":
                op.update(mode=draw(st.sampled_from([0o600, 0o640, 0o644, 0o755])))
        elif kind == "stat":
            path = pick(lambda t: True)
            if path is None:
                continue
            op = {"op": "stat", "path": path}
        elif kind == "list":
            path = pick(lambda t: t == "d")
            if path is None:
                continue
            op = {"op": "list", "path": path}
        elif kind == "write":
            existing = draw(st.booleans())
            path = pick(lambda t: t == "f") if existing else None
            path = path or new_name()
            op = {"op": "write", "path": path, "size": draw(sizes),
                  "seed": draw(st.integers(0, 999))}
            parent = path.rpartition("/")[0]
            if model.get(path, "f") == "f" and (not parent or model.get(parent) == "d"):
                model[path] = "f"
        elif kind == "mkdir":
            path = new_name()
            op = {"op": "mkdir", "path": path}
            parent = path.rpartition("/")[0]
            if path not in model and (not parent or model.get(parent) == "d"):
                model[path] = "d"
        elif kind == "rmdir":
            path = pick(lambda t: t == "d")
            if path is None or path == private:
                continue
            op = {"op": "rmdir", "path": path}
            if not any(p.startswith(path + "/") for p in model):
                del model[path]
        elif kind == "unlink":
            path = pick(lambda t: t in ("f", "l"))
            if path is None:
                continue
            op = {"op": "unlink", "path": path}
            del model[path]
        elif kind == "rename":
            src = pick(lambda t: t in ("f", "l"))
            if src is None:
                continue
            dst = new_name()
            op = {"op": "rename", "path": src, "dst": dst}
            parent = dst.rpartition("/")[0]
            if model.get(dst, "f") in ("f", "l") and (not parent or model.get(parent) == "d") \
                    and dst != src:
                model[dst] = model.pop(src)
        else:  # symlink
            path = new_name()
            op = {"op": "symlink", "path": path, "target": f"../{DANGLING}/{counter}"}
            parent = path.rpartition("/")[0]
            if path not in model and (not parent or model.get(parent) == "d"):
                model[path] = "l"
        ops.append(op)
    return ops


@st.composite
def workloads(draw: st.DrawFn, lim: PropLimits) -> tuple[list[dict[str, Entry]],
                                                            list[list[Op]], str, str]:
    dist = draw(st.sampled_from(SIZE_DISTRIBUTIONS))
    sizes = file_sizes(dist, lim.max_file)
    nlayers = draw(st.integers(1, 4))
    layers = [draw(layer_tree(lim, sizes, bottom=(i == nlayers - 1))) for i in range(nlayers)]
    view = merged_view(layers)
    nworkers = draw(st.integers(1, 4))
    mix = draw(st.sampled_from(sorted(MIXES)))
    workers = [draw(operations(lim, view, w, nworkers, MIXES[mix], sizes))
               for w in range(nworkers)]
    return layers, workers, dist, mix


def _examples(strategy: st.SearchStrategy[Any], seed: int, count: int) -> list[Any]:
    """The first `count` examples Hypothesis generates for `seed` (after the always-minimal
    first one). Deterministic for a given seed and Hypothesis version."""
    out: list[Any] = []

    @hseed(seed)
    @settings(max_examples=count + 1, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy)
    def collect(x: Any) -> None:
        out.append(x)

    collect()
    return out[1:count + 1] if len(out) > 1 else out


def generate(seed: int, count: int, scale: str) -> list[GenWorkload]:
    lim = LIMITS[scale]
    out = []
    for i, (layers, workers, dist, mix) in enumerate(_examples(workloads(lim), seed, count)):
        out.append(GenWorkload(seed, i, layers, workers, dist, mix))
    return out


# -- shapes for the performance properties --------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    fanout: int
    depth: int
    files: int
    """files per directory"""

    def paths(self, cap: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        level = [""]
        for _ in range(self.depth):
            nxt = []
            for d in level:
                for k in range(self.fanout):
                    p = f"{d}/s{k}" if d else f"s{k}"
                    out.append((p, "d"))
                    nxt.append(p)
            level = nxt
        for d in [p for p, t in list(out) if t == "d"]:
            for f in range(self.files):
                out.append((f"{d}/f{f}", "f"))
                if len(out) >= cap:
                    return out
        return out


@st.composite
def shapes(draw: st.DrawFn, lim: PropLimits) -> tuple[Shape, int]:
    """A tree shape (fanout, depth) filled with files up to the scale's entry budget, and the
    growth factor k for the listing property."""
    fanout = draw(st.integers(2, 10))
    depth = draw(st.integers(1, 3))
    dirs = sum(fanout ** i for i in range(1, depth + 1))
    files = max(1, (lim.shape_entries - dirs) // dirs)
    return Shape(fanout, depth, files), draw(st.integers(2, 10))


# -- materialising --------------------------------------------------------------------------------

def file_data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_layers(layers: Sequence[dict[str, Entry]], root: Path) -> list[Path]:
    """Write `layers` (top-first) in overlay format under root/layers/I."""
    out = []
    for i, layer in enumerate(layers):
        d = root / "layers" / str(i)
        d.mkdir(parents=True)
        for path in sorted(layer, key=lambda p: (p.count("/"), p)):
            e = layer[path]
            p = d / path
            if e["t"] == "d":
                p.mkdir(mode=0o755)
                os.chmod(p, e["mode"])
                if e.get("opaque"):
                    make_opaque(p)
            elif e["t"] == "f":
                p.write_bytes(file_data(e["size"], e["seed"]))
                os.chmod(p, e["mode"])
            elif e["t"] == "l":
                os.symlink(e["target"], p)
            else:
                make_whiteout(p)
        out.append(d)
    return out


def materialise(w: GenWorkload, root: Path, ufs_metadir: str | None) -> bk.Stack:
    layers = write_layers(w.layers, root)
    flatten(layers, root / "flat", hardlink=False)
    ufs = None
    if ufs_metadir:
        ufs = tuple(root / "ufs" / str(i) for i in range(len(layers)))
        for layer, out in zip(layers, ufs, strict=True):
            to_unionfs_fuse(layer, out, ufs_metadir)
    return bk.Stack(tuple(layers), root / "flat", ufs, native_copy=True)


EXEC = r"""
import errno, json, os, random, stat, sys, time
spec = json.load(open(sys.argv[1]))
root = sys.argv[2]

def data(size, seed):
    return random.Random(seed).randbytes(size)

def writeall(fd, buf):
    while buf:
        buf = buf[os.write(fd, buf):]

def do(op):
    k = op["op"]
    p = root + "/" + op["path"]
    if k == "read":
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while os.read(fd, 1 << 20):
                pass
        finally:
            os.close(fd)
    elif k == "stat":
        os.lstat(p)
    elif k == "list":
        os.listdir(p)
    elif k in ("write", "append", "truncate"):
        flags = os.O_WRONLY | os.O_NOFOLLOW
        flags |= {"write": os.O_CREAT | os.O_TRUNC, "append": os.O_APPEND, "truncate": 0}[k]
        fd = os.open(p, flags, 0o644)
        try:
            if k == "truncate":
                os.ftruncate(fd, op["size"])
            else:
                writeall(fd, data(op["size"], op["seed"]))
        finally:
            os.close(fd)
    elif k == "mkdir":
        os.mkdir(p, 0o755)
    elif k == "rmdir":
        os.rmdir(p)
    elif k == "unlink":
        os.unlink(p)
    elif k == "rename":
        if stat.S_ISDIR(os.lstat(p).st_mode):
            raise OSError(errno.EISDIR, "directory renames are not generated")
        os.rename(p, root + "/" + op["dst"])
    elif k == "chmod":
        if stat.S_ISLNK(os.lstat(p).st_mode):
            raise OSError(errno.ELOOP, "symlink")
        os.chmod(p, op["mode"])
    elif k == "symlink":
        os.symlink(op["target"], p)
    else:
        raise SystemExit("unknown op " + k)

def work(ops):
    res = []
    for op in ops:
        try:
            do(op)
            res.append("ok")
        except OSError as e:
            res.append(errno.errorcode.get(e.errno, str(e.errno)))
    return res

workers = spec["workers"]
pipes, pids = [], []
go_r, go_w = os.pipe()
for ops in workers:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(go_w)
        os.read(go_r, 1)
        out = json.dumps(work(ops)).encode()
        while out:
            out = out[os.write(w, out):]
        os._exit(0)
    os.close(w)
    pipes.append(r)
    pids.append(pid)
os.close(go_r)
t = time.perf_counter()
os.write(go_w, b"x" * len(workers))
results = []
for r in pipes:
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    results.append(json.loads(b"".join(chunks) or b"[]"))
for pid in pids:
    os.waitpid(pid, 0)
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "outcomes": results}))
"""


def execute(spec_file: Path, mnt: Path, timeout: float) -> tuple[float, list[list[str]]]:
    res = run(py(EXEC, spec_file, mnt), timeout=timeout, capture=True)
    data = json.loads(res.stdout.decode().strip().splitlines()[-1])
    return float(data["seconds"]), data["outcomes"]


# -- running --------------------------------------------------------------------------------------

@dataclass
class WorkloadResult:
    name: str
    digest: str
    summary: str
    times: dict[str, list[float]] = field(default_factory=dict)
    agrees: dict[str, bool] = field(default_factory=dict)
    differences: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    tree_digest: dict[str, str] = field(default_factory=dict)

    def median(self, b: str) -> float | None:
        t = self.times.get(b)
        return statistics.median(t) if t else None


@dataclass
class Property:
    name: str
    statement: str
    backend: str
    value: float | None
    limit: float
    passed: bool | None
    detail: str = ""


def _snap_digest(s: Snapshot) -> str:
    return hashlib.sha256(json.dumps(sorted(s.items()), default=str).encode()).hexdigest()[:12]


@dataclass
class PropsRunner:
    backends: list[bk.Backend]
    rounds: int
    scratch: Path
    progress: Progress
    ufs_metadir: str | None
    timeout: float = 600.0

    def order(self, r: int) -> list[bk.Backend]:
        k = r % len(self.backends)
        return self.backends[k:] + self.backends[:k]

    def run_workload(self, w: GenWorkload) -> WorkloadResult:
        res = WorkloadResult(w.name, w.digest(), w.summary())
        with scratch_dir(self.scratch, f"{w.name}-") as root:
            stack = materialise(w, root / "data", self.ufs_metadir)
            spec = root / "spec.json"
            spec.write_text(json.dumps({"workers": w.workers}))
            snaps: dict[str, Snapshot] = {}
            outcomes: dict[str, list[list[str]]] = {}
            for r in range(self.rounds):
                for b in self.order(r):
                    self.progress.step(f"{w.name} round {r + 1}/{self.rounds} {b.name}")
                    try:
                        with scratch_dir(root, f"{b.name}-") as where, \
                                b.mount(stack, where) as m:
                            t, outs = execute(spec, m.mnt, self.timeout)
                            if r == 0:
                                snaps[b.name] = snapshot(m.mnt)
                                outcomes[b.name] = outs
                    except (BenchError, RuntimeError, OSError, ValueError) as e:
                        res.errors.setdefault(b.name, []).append(str(e))
                        continue
                    res.times.setdefault(b.name, []).append(t)
        ref = "native" if "native" in snaps else (sorted(snaps)[0] if snaps else None)
        for name, snap in snaps.items():
            assert ref is not None
            d = diff(snaps[ref], snap)
            if outcomes[name] != outcomes[ref]:
                for k, (a, b2) in enumerate(zip(outcomes[ref], outcomes[name], strict=False)):
                    for j, (x, y) in enumerate(zip(a, b2, strict=False)):
                        if x != y:
                            d.append(f"worker {k} op {j} {w.workers[k][j]}: {ref} {x}, "
                                     f"{name} {y}")
                            break
            res.agrees[name] = not d
            res.differences[name] = d[:8]
            res.tree_digest[name] = _snap_digest(snap)
        return res

    # -- the performance properties -----------------------------------------------------------

    def _cold_time(self, b: bk.Backend, stack: bk.Stack, argv_for: Callable[[Path], list[str]]
                   ) -> float:
        with scratch_dir(self.scratch, f"p-{b.name}-") as where, b.mount(stack, where) as m:
            drop_caches()
            res = run(argv_for(m.mnt), timeout=self.timeout, capture=True)
            return float(res.stdout.split()[-1])

    def depth_property(self, shape: Shape, lim: PropLimits) -> list[Property]:
        from .scaling import LOOKUP

        entries = shape.paths(lim.shape_entries)
        props: list[Property] = []
        with scratch_dir(self.scratch, "depth-") as root:
            stacks = {}
            for nl in (1, lim.depth_layers):
                layers = [root / f"l{nl}" / "layers" / str(i) for i in range(nl)]
                for layer in layers:
                    layer.mkdir(parents=True)
                for k, (p, kind) in enumerate(entries):
                    if kind == "d":
                        for layer in layers:
                            (layer / p).mkdir()
                    else:
                        (layers[(k * 7919) % nl] / p).touch()
                flatten(layers, root / f"l{nl}" / "flat")
                ufs = None
                if self.ufs_metadir:
                    ufs = tuple(root / f"l{nl}" / "ufs" / str(i) for i in range(nl))
                    for layer, out in zip(layers, ufs, strict=True):
                        to_unionfs_fuse(layer, out, self.ufs_metadir)
                stacks[nl] = bk.Stack(tuple(layers), root / f"l{nl}" / "flat", ufs)
            listfile = root / "paths.txt"
            listfile.write_text("\0".join(p for p, _ in entries))
            times: dict[tuple[str, int], list[float]] = {}
            for r in range(self.rounds):
                for b in self.order(r):
                    for nl, stack in stacks.items():
                        self.progress.step(f"depth property {nl} layers {b.name}")
                        try:
                            t = self._cold_time(b, stack, lambda m: py(LOOKUP, listfile, m))
                        except (BenchError, RuntimeError, OSError) as e:
                            self.progress.note(f"depth property on {b.name}: {e}")
                            continue
                        times.setdefault((b.name, nl), []).append(t)
        for b in self.backends:
            t1 = times.get((b.name, 1))
            tn = times.get((b.name, lim.depth_layers))
            value = statistics.median(tn) / statistics.median(t1) if t1 and tn else None
            props.append(Property(
                "depth", f"cold lookups with {lim.depth_layers} layers <= {DEPTH_FACTOR}x "
                         f"those with 1 layer", b.name, value, DEPTH_FACTOR,
                None if value is None else value <= DEPTH_FACTOR,
                f"{len(entries)} entries, shape {asdict(shape)}"))
        return props

    def listing_property(self, n1: int, k: int) -> list[Property]:
        from .scaling import LISTDIR

        n2 = n1 * k
        props: list[Property] = []
        with scratch_dir(self.scratch, "list-") as root:
            stacks = {}
            for n in (n1, n2):
                layers = [root / f"n{n}" / "layers" / str(i) for i in range(2)]
                for layer in layers:
                    (layer / "big").mkdir(parents=True)
                for e in range(n):
                    (layers[e % 2] / "big" / f"e{e:06d}").touch()
                flatten(layers, root / f"n{n}" / "flat")
                ufs = None
                if self.ufs_metadir:
                    ufs = tuple(root / f"n{n}" / "ufs" / str(i) for i in range(2))
                    for layer, out in zip(layers, ufs, strict=True):
                        to_unionfs_fuse(layer, out, self.ufs_metadir)
                stacks[n] = bk.Stack(tuple(layers), root / f"n{n}" / "flat", ufs)
            times: dict[tuple[str, int], list[float]] = {}
            for r in range(self.rounds):
                for b in self.order(r):
                    for n, stack in stacks.items():
                        self.progress.step(f"listing property {n} entries {b.name}")
                        try:
                            t = self._cold_time(b, stack, lambda m: py(LISTDIR, m / "big"))
                        except (BenchError, RuntimeError, OSError) as e:
                            self.progress.note(f"listing property on {b.name}: {e}")
                            continue
                        times.setdefault((b.name, n), []).append(t)
        for b in self.backends:
            a, c = times.get((b.name, n1)), times.get((b.name, n2))
            value = None
            if a and c:
                value = math.log(statistics.median(c) / statistics.median(a)) / math.log(k)
            props.append(Property(
                "listing", f"cold listing time grows at most like n^{LIST_EXPONENT}", b.name,
                value, LIST_EXPONENT, None if value is None else value <= LIST_EXPONENT,
                f"{n1} -> {n2} entries (exponent of the growth)"))
        return props


def slowdown_property(results: Sequence[WorkloadResult], factor: float) -> Property | None:
    worst: tuple[float, str] | None = None
    for r in results:
        a, b = r.median("unionfs"), r.median("fuse-overlayfs")
        if a is None or b is None or not r.agrees.get("unionfs", False) or b <= 0:
            continue
        ratio = a / b
        if worst is None or ratio > worst[0]:
            worst = (ratio, r.name)
    if worst is None:
        return None
    return Property("slowdown", f"unionfs at most {factor}x slower than fuse-overlayfs on every "
                    "generated workload", "unionfs", worst[0], factor, worst[0] <= factor,
                    f"worst: {worst[1]}")


def render(results: Sequence[WorkloadResult], props: Sequence[Property],
           backends: Sequence[str]) -> str:
    header = ["workload", "digest", *backends]
    if "unionfs" in backends and "fuse-overlayfs" in backends:
        header.append("unionfs/fuse-ovl")
    rows = []
    for r in results:
        row = [r.name, r.digest]
        for b in backends:
            if b in r.errors and not r.times.get(b):
                row.append("FAIL")
            else:
                mark = "" if r.agrees.get(b, True) else "!"
                row.append(fmt_seconds(r.median(b)) + mark)
        if len(header) > len(row):
            a, c = r.median("unionfs"), r.median("fuse-overlayfs")
            row.append(fmt_ratio(a / c if a is not None and c else None))
        rows.append(row)
    parts = ["generated workloads (median time of all workers; ! = final tree or errno differs "
             "from native)", render_table(header, rows), ""]
    for r in results:
        parts.append(f"{r.name}: {r.summary}")
        for b, d in r.differences.items():
            if d:
                parts.append(f"  {b} disagrees: " + "; ".join(d[:3]))
        for b, errs in r.errors.items():
            parts.append(f"  {b} failed: {errs[0]}")
    if props:
        parts += ["", "performance properties"]
        prow = [[p.name, p.backend, "-" if p.value is None else f"{p.value:.2f}",
                 f"<= {p.limit:g}", "n/a" if p.passed is None else
                 "PASS" if p.passed else "FAIL", p.detail] for p in props]
        parts.append(render_table(["property", "backend", "value", "limit", "result", "detail"],
                                  prow, right=False))
        seen = set()
        for p in props:
            if p.name not in seen:
                parts.append(f"  {p.name}: {p.statement}")
                seen.add(p.name)
        if any(p.backend == "native" for p in props):
            parts.append("  native has no layers: its depth value shows the measurement noise")
    return "\n".join(parts)


def load_workloads(paths: Sequence[Path]) -> Iterator[GenWorkload]:
    for p in paths:
        data = json.loads(p.read_text())
        items = data if isinstance(data, list) else [data]
        for item in items:
            yield GenWorkload.from_json(item)


def run_props(backends: Sequence[str], workloads_: Sequence[GenWorkload], scale: str,
              rounds: int, cache: Path | None, seed: int, properties: bool = True,
              max_slowdown: float = MAX_SLOWDOWN, quiet: bool = False
              ) -> tuple[dict[str, Any], list[WorkloadResult], list[Property]]:
    progress = Progress(0, quiet)
    chosen, skipped, metadir = bk.prepare(backends, progress.note)
    lim = LIMITS[scale]
    shape_draw: list[tuple[Shape, int]] = _examples(shapes(lim), seed, 1) if properties else []
    progress.total = rounds * len(chosen) * (len(workloads_) + (4 if properties else 0))
    started = time.time()
    results: list[WorkloadResult] = []
    props: list[Property] = []
    with scratch_dir(cache_dir(cache) / "runs", f"props-{os.getpid()}-") as scratch:
        pr = PropsRunner(chosen, rounds, scratch, progress, metadir)
        try:
            for w in workloads_:
                results.append(pr.run_workload(w))
            if properties and shape_draw:
                shape, k = shape_draw[0]
                props += pr.depth_property(shape, lim)
                n1 = lim.list_sizes[0]
                props += pr.listing_property(n1, max(2, min(k, lim.list_sizes[1] // n1)))
        finally:
            progress.finish()
    sp = slowdown_property(results, max_slowdown)
    if sp is not None:
        props.append(sp)
    meta = {"machine": machine_info(), "scale": scale, "rounds": rounds, "seed": seed,
            "skipped_backends": skipped, "backends": [b.name for b in chosen],
            "hypothesis": hypothesis.__version__,
            "stated": {"depth_factor": DEPTH_FACTOR, "depth_layers": lim.depth_layers,
                       "list_exponent": LIST_EXPONENT, "max_slowdown": max_slowdown},
            "elapsed_s": round(time.time() - started, 1)}
    return meta, results, props


def main(args: argparse.Namespace) -> int:
    from .report import describe_meta

    if args.replay:
        wls = list(load_workloads(args.replay))
    else:
        wls = generate(args.seed, args.count, args.scale)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for w in wls:
            (args.save / f"{w.name}.json").write_text(json.dumps(w.to_json(), indent=1) + "\n")
        print(f"saved {len(wls)} workload(s) in {args.save}")
    meta, results, props = run_props(
        bk.parse_backends(args.fs), wls, args.scale, args.rounds, args.cache, args.seed,
        properties=not args.no_properties and not args.replay,
        max_slowdown=args.max_slowdown or MAX_SLOWDOWN, quiet=args.quiet)
    print(describe_meta({**meta, "dataset": "generated", "entries": "-"}))
    print()
    print(render(results, props, meta["backends"]))
    if args.json:
        args.json.write_text(json.dumps({
            "meta": meta, "workloads": [asdict(r) for r in results],
            "properties": [asdict(p) for p in props]}, indent=1) + "\n")
        print(f"JSON: {args.json}")
    return 0
