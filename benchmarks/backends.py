"""The file systems under test, each able to present a `Stack` of layers as one tree.

| name            | what is mounted                                                           |
| --------------- | ------------------------------------------------------------------------- |
| native          | no union: a hard-link copy of the flattened tree (mutable files copied)   |
| overlay         | kernel overlayfs over the overlay-format layers                           |
| fuse-overlayfs  | fuse-overlayfs (C, libfuse 3) over the same layers                        |
| unionfs-fuse    | unionfs-fuse (C, libfuse 2) over the layers converted to its own format   |
| unionfs         | this project (`python -m unionfs`) over the overlay-format layers         |

Every backend gets a fresh upper and work directory (or a fresh copy, for native) per mount, and
default options, as a user would run it. unionfs keeps what it read of the layers' directories
for its next mount (its lower cache, on by default); a benchmark run gives it a cache directory
of its own, empty at the start (`LOWER_CACHE_ENV`): its first mount of a stack learns, the later
rounds read the cache, as a user's second and later mounts do (`unionfs-nocache` never keeps
anything). `Mounted.sample()` reads what the server spent: CPU time
and RSS from /proc for every FUSE server, and for unionfs the FUSE request counts per type when the
server supports the stats dump (see `STATS_ENV`); without it the counts are simply missing.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import mounts
from .util import (
    BenchError,
    catches_signal,
    link_farm,
    proc_cpu_seconds,
    proc_status_kib,
    proc_thread_ns,
    rmtree,
    run,
    tool_version,
)

STATS_ENV = "UNIONFS_STATS_FILE"
"""unionfs writes its request counters as JSON to this file on SIGUSR1 (when supported)."""

STATS_TIMEOUT = 10.0

LOWER_CACHE_ENV = "UNIONFS_LOWER_CACHE"
"""unionfs keeps its lower cache in this directory (see `unionfs/lowercache.py`)."""


@functools.cache
def lower_cache_dir() -> Path:
    """This benchmark run's lower cache for unionfs: empty at the start, removed at exit."""
    d = Path(tempfile.mkdtemp(prefix="unionfs-bench-lowercache-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d

ALL_BACKENDS = ("native", "overlay", "fuse-overlayfs", "unionfs-fuse", "unionfs")
ALIASES = {"overlayfs": "overlay", "kernel": "overlay", "fuse_overlayfs": "fuse-overlayfs",
           "unionfs_fuse": "unionfs-fuse"}

UNIONFS_FUSE_BIN = "unionfs-fuse"
"""Debian's unionfs-fuse installs /usr/bin/unionfs and the alias /usr/bin/unionfs-fuse; the
alias is used because `unionfs` may be this project's own command."""

UNIONFS_FUSE_OPTIONS = ("cow", "hide_meta_files", "allow_other")


@dataclass(frozen=True)
class Stack:
    """One merged view in every format the backends need."""

    layers: tuple[Path, ...]
    """top-first, overlay format (what lowerdir= takes)"""
    flat: Path
    """the same view flattened (what native serves)"""
    ufs_layers: tuple[Path, ...] | None = None
    """top-first, unionfs-fuse format; None if not converted"""
    mutable: tuple[str, ...] = ()
    """relative paths that workloads modify in place: native gets its own copy of these"""
    native_copy: bool = False
    """native gets a full copy, not hard links (for workloads that may change any file)"""


@dataclass
class Sample:
    cpu_s: float | None = None
    """utime + stime of the server (clock-tick resolution, includes exited threads)"""
    rss_kib: int | None = None
    requests: dict[str, int] | None = None
    thread_ns: dict[int, int] = field(default_factory=dict)
    """ns on CPU per live thread (precise)"""


def cpu_delta(before: Sample, after: Sample) -> float | None:
    """Server CPU seconds between two samples: precise per-thread counters when no thread
    exited in between, the clock-tick totals otherwise."""
    if before.thread_ns and after.thread_ns and set(before.thread_ns) <= set(after.thread_ns):
        return sum(v - before.thread_ns.get(t, 0) for t, v in after.thread_ns.items()) / 1e9
    if before.cpu_s is not None and after.cpu_s is not None:
        return after.cpu_s - before.cpu_s
    return None


@dataclass
class Mounted:
    backend: str
    mnt: Path
    pid: int | None = None
    stats_file: Path | None = None
    # seconds from starting the mount (the server's exec, or mount(8)) until it was mounted;
    # None where nothing is mounted (native)
    mount_s: float | None = None
    _seq: int = field(default=0, repr=False)

    def sample(self, requests: bool = True) -> Sample:
        if self.pid is None:
            return Sample()
        s = Sample(proc_cpu_seconds(self.pid), proc_status_kib(self.pid),
                   thread_ns=proc_thread_ns(self.pid))
        if requests and self.stats_file is not None:
            s.requests = self._dump_requests()
        return s

    def _dump_requests(self) -> dict[str, int] | None:
        """Ask unionfs for its counters (SIGUSR1), if it has a handler for it."""
        assert self.pid is not None and self.stats_file is not None
        if not catches_signal(self.pid, signal.SIGUSR1):
            return None
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + STATS_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.stats_file.read_text())
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict) and int(data.get("seq", 0)) > self._seq:
                self._seq = int(data["seq"])
                return {str(k): int(v) for k, v in data.get("requests", {}).items()}
            time.sleep(0.005)
        return None


@functools.cache
def unionfs_fuse_metadir() -> str:
    """The hidden directory the installed unionfs-fuse keeps whiteouts in, found by deleting a
    lower file through a scratch mount and looking at what appears in the upper branch."""
    with tempfile.TemporaryDirectory(prefix="ufs-probe-") as t:
        lower, upper, mnt = Path(t, "l"), Path(t, "u"), Path(t, "m")
        for d in (lower, upper, mnt):
            d.mkdir()
        (lower / "f").touch()
        proc = mounts.start_server(
            [UNIONFS_FUSE_BIN, "-f", "-o", "cow", f"{upper}=RW:{lower}=RO", str(mnt)], mnt,
            Path(t, "log"), cwd=Path(t))
        try:
            (mnt / "f").unlink()
        finally:
            mounts.stop_server(proc, mnt)
        found = [p.name for p in upper.iterdir() if p.is_dir()]
    if len(found) != 1:
        raise RuntimeError(f"cannot tell where unionfs-fuse keeps whiteouts: {found}")
    return found[0]


class Backend:
    name = ""
    fuse = False

    def unavailable(self) -> str | None:
        """None if this backend can run here, else why not."""
        return None

    def version(self) -> str:
        return ""

    @contextlib.contextmanager
    def mount(self, stack: Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[Mounted]:
        raise NotImplementedError
        yield  # pragma: no cover


def _fresh(where: Path) -> tuple[Path, Path, Path]:
    upper, work, mnt = where / "upper", where / "work", where / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    return upper, work, mnt


class Native(Backend):
    name = "native"

    def version(self) -> str:
        return "plain directory (hard-link copy of the flattened tree)"

    @contextlib.contextmanager
    def mount(self, stack: Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[Mounted]:
        tree = where / "native"
        if stack.native_copy:
            run(["cp", "-a", "--", str(stack.flat), str(tree)])
        else:
            link_farm(stack.flat, tree, stack.mutable)
        try:
            yield Mounted(self.name, tree)
        finally:
            mounts.unmount_all_below(tree)
            rmtree(tree)


class Overlay(Backend):
    name = "overlay"

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root"
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read():
                subprocess.run(["modprobe", "overlay"], check=False, timeout=30,
                               capture_output=True)
        with open("/proc/filesystems") as f:
            return None if "overlay" in f.read() else "kernel has no overlayfs"

    def version(self) -> str:
        return f"kernel {os.uname().release}"

    @contextlib.contextmanager
    def mount(self, stack: Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[Mounted]:
        upper, work, mnt = _fresh(where)
        t0 = time.perf_counter()
        mounts.mount_overlay(stack.layers, upper, work, mnt)
        took = time.perf_counter() - t0
        try:
            yield Mounted(self.name, mnt, mount_s=took)
        finally:
            mounts.unmount(mnt)


class FuseServer(Backend):
    fuse = True
    log_name = "server.log"

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def server_env(self, where: Path, env: dict[str, str] | None
                   ) -> tuple[dict[str, str], Path | None]:
        return dict(env if env is not None else os.environ), None

    @contextlib.contextmanager
    def mount(self, stack: Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[Mounted]:
        upper, work, mnt = _fresh(where)
        senv, stats = self.server_env(where, env)
        t0 = time.perf_counter()
        proc = mounts.start_server(self.argv(stack, upper, work, mnt), mnt,
                                   where / self.log_name, senv, cwd=where)
        took = time.perf_counter() - t0
        try:
            if stats is not None and not self._stats_handler(proc.pid):
                stats = None
            yield Mounted(self.name, mnt, proc.pid, stats, mount_s=took)
        finally:
            mounts.stop_server(proc, mnt)

    _stats_supported: bool | None = None

    def _stats_handler(self, pid: int) -> bool:
        """Wait for the server's SIGUSR1 handler (installed just after the mount appears); give
        up quickly once a server of this backend has been seen without one."""
        wait = 3.0 if self._stats_supported is None else 1.0 if self._stats_supported else 0.0
        deadline = time.monotonic() + wait
        while True:
            if catches_signal(pid, signal.SIGUSR1):
                self._stats_supported = True
                return True
            if time.monotonic() >= deadline:
                self._stats_supported = False
                return False
            time.sleep(0.005)


class FuseOverlayfs(FuseServer):
    name = "fuse-overlayfs"

    def unavailable(self) -> str | None:
        if shutil.which("fuse-overlayfs") is None:
            return "fuse-overlayfs not installed (apt-get install fuse-overlayfs)"
        return None if os.path.exists("/dev/fuse") else "no /dev/fuse"

    def version(self) -> str:
        return tool_version(["fuse-overlayfs", "--version"],
                            ("fuse-overlayfs", "FUSE library"))

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        opts = (f"lowerdir={mounts.lowerdir_option(stack.layers)},"
                f"upperdir={mounts.esc(upper)},workdir={mounts.esc(work)}")
        return ["fuse-overlayfs", "-f", "-o", opts, str(mnt)]


class UnionfsFuse(FuseServer):
    name = "unionfs-fuse"

    def unavailable(self) -> str | None:
        if shutil.which(UNIONFS_FUSE_BIN) is None:
            return "unionfs-fuse not installed (apt-get install unionfs-fuse)"
        return None if os.path.exists("/dev/fuse") else "no /dev/fuse"

    def version(self) -> str:
        return tool_version([UNIONFS_FUSE_BIN, "--version"],
                            ("unionfs-fuse version", "FUSE library"))

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        if stack.ufs_layers is None:
            raise RuntimeError("stack has no unionfs-fuse layers")
        branches = [f"{upper}=RW", *(f"{p}=RO" for p in stack.ufs_layers)]
        return [UNIONFS_FUSE_BIN, "-f", "-o", ",".join(UNIONFS_FUSE_OPTIONS),
                ":".join(branches), str(mnt)]


UNIONFS = [sys.executable, "-c", "import sys; from unionfs.cli import main; sys.exit(main())"]
"""The server as its console script `unionfs` (what podman's mount_program and users run)
starts it, with this interpreter: not `python -m unionfs`, whose runpy costs every mount
about 4 ms of imports that the installed command never pays."""


class Unionfs(FuseServer):
    name = "unionfs"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("unionfs") is None or \
                importlib.util.find_spec("pyfuse3") is None:
            return "unionfs / pyfuse3 not importable"
        return None if os.path.exists("/dev/fuse") else "no /dev/fuse"

    def version(self) -> str:
        return tool_version([*UNIONFS, "--version"])

    def server_env(self, where: Path, env: dict[str, str] | None
                   ) -> tuple[dict[str, str], Path | None]:
        senv = dict(env if env is not None else os.environ)
        # the server runs the unionfs this process would import, whatever its working directory
        spec = importlib.util.find_spec("unionfs")
        if spec is not None and spec.origin:
            root = str(Path(spec.origin).resolve().parent.parent)
            senv["PYTHONPATH"] = os.pathsep.join(
                p for p in (root, senv.get("PYTHONPATH", "")) if p)
        stats = where / "unionfs-stats.json"
        senv[STATS_ENV] = str(stats)
        senv[LOWER_CACHE_ENV] = str(lower_cache_dir())
        return senv, stats

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        opts = (f"lowerdir={mounts.lowerdir_option(stack.layers)},"
                f"upperdir={mounts.esc(upper)},workdir={mounts.esc(work)}")
        return [*UNIONFS, "-f", "-o", opts, str(mnt)]


class UnionfsWith(Unionfs):
    """unionfs with extra mount options (the variants below; none is in "all")."""

    def __init__(self, name: str, options: str) -> None:
        self.name = name
        self.options = options

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        argv = super().argv(stack, upper, work, mnt)
        argv[argv.index("-o") + 1] += "," + self.options
        return argv


VARIANTS = (
    # per-inode I/O, no open/release requests
    UnionfsWith("unionfs-noopen", "noopen=1"),
    # the direct loop sleeps as soon as no request is waiting: the loop before the spin
    UnionfsWith("unionfs-nospin", "spin=0"),
    # the lower cache's records checked at first use, not ahead by a helper at mount
    UnionfsWith("unionfs-inline", "lowercache_check=inline"),
    # every mount reads the layers' directories afresh, as a first mount does
    UnionfsWith("unionfs-nocache", "lowercache=off"),
    # as podman would pass them from storage.conf's `mountopt`: the first mount of a stack runs
    # without an index and builds one after its unmount (into this run's lower cache), the
    # later rounds use it
    UnionfsWith("unionfs-autoindex", "lowerindex=auto,lowerindex_check=roots"),
)


class UnionfsIndex(Unionfs):
    """unionfs with `-o lowerindex=FILE`: the index of the lower layers is built before the
    mount, outside any timed region (as mountctl builds it once per image), with
    `python -m unionfs index build`; mounted with `lowerindex_check=roots` as mountctl does
    (its layers are immutable), so lookups and getattr of lower objects are answered from the
    index's attributes. Not in "all"."""

    name = "unionfs-index"

    @contextlib.contextmanager
    def mount(self, stack: Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[Mounted]:
        index = where / "lower.idx"
        senv, _ = self.server_env(where, env)
        run([*UNIONFS, "index", "build", "-o",
             f"lowerdir={mounts.lowerdir_option(stack.layers)}", str(index)], env=senv)
        with super().mount(stack, where, env) as m:
            yield m

    def argv(self, stack: Stack, upper: Path, work: Path, mnt: Path) -> list[str]:
        argv = super().argv(stack, upper, work, mnt)
        index = mnt.parent / "lower.idx"
        argv[argv.index("-o") + 1] += f",lowerindex={mounts.esc(index)},lowerindex_check=roots"
        return argv


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Native(), Overlay(), FuseOverlayfs(), UnionfsFuse(), Unionfs(), *VARIANTS, UnionfsIndex())}


def probe_unionfs_fuse(chosen: list[Backend], skipped: dict[str, str]) -> str | None:
    """The unionfs-fuse metadir if unionfs-fuse is among `chosen`; if the probe fails,
    unionfs-fuse is moved from `chosen` to `skipped` with the reason."""
    if not any(b.name == "unionfs-fuse" for b in chosen):
        return None
    try:
        return unionfs_fuse_metadir()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        chosen[:] = [b for b in chosen if b.name != "unionfs-fuse"]
        skipped["unionfs-fuse"] = f"cannot tell its whiteout format: {e}"
        return None


def parse_backends(spec: str | Sequence[str] | None) -> list[str]:
    """Backend names from `a,b,c` (aliases accepted, order kept); all if None/'all'."""
    if spec is None or spec == "all":
        return list(ALL_BACKENDS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        name = ALIASES.get(item.strip(), item.strip())
        if not name:
            continue
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {item!r} (known: {', '.join(ALL_BACKENDS)})")
        if name not in out:
            out.append(name)
    return out


def select(names: Sequence[str]) -> tuple[list[Backend], dict[str, str]]:
    """The available backends among `names`, and why the others are skipped."""
    ok: list[Backend] = []
    skipped: dict[str, str] = {}
    for n in names:
        b = BACKENDS[n]
        why = b.unavailable()
        if why is None:
            ok.append(b)
        else:
            skipped[n] = why
    return ok, skipped


def require_root() -> None:
    if os.geteuid() != 0:
        raise BenchError("the benchmarks mount file systems and drop caches: run them as root")


def prepare(names: Sequence[str], note: Callable[[str], None]
            ) -> tuple[list[Backend], dict[str, str], str | None]:
    """Root check, the available backends among NAMES, the skipped ones (each noted with its
    reason), and unionfs-fuse's metadata directory name; raises when none is available."""
    require_root()
    chosen, skipped = select(list(names))
    metadir = probe_unionfs_fuse(chosen, skipped)
    for name, why in skipped.items():
        note(f"skipping {name}: {why}")
    if not chosen:
        raise BenchError("no backend available")
    return chosen, skipped, metadir
