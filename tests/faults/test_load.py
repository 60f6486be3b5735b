"""Load: many processes racing on one mount, and an fsx-style single-file exerciser.

test_concurrent_random_operations: N worker processes (loadworker.py) do random create, write,
read, append, truncate, rename, unlink, mkdir, rmdir, link, symlink, chmod, readdir and stat on a
small pool of overlapping paths over a small lower tree, in two phases of equal length. Then:
- no worker saw EIO or an errno a local file system would not give (ENOENT, EEXIST, ENOTEMPTY...
  are expected races and only counted); the server is alive and logged no "unionfs bug";
- the tree is consistent: every listed name can be lstat'ed, every file read, every directory
  listed, names of one inode agree; unmounting and mounting again gives the same tree, and so
  does kernel overlayfs mounted read-only on the same branches (the upper as its top layer);
- resources come back: after each phase and `echo 2 > /proc/sys/vm/drop_caches` (the kernel
  forgets its inodes) the server's open fds are back to the idle count (+2), and its RSS grew by
  at most LEAK_MIB (16 MiB) during the second phase: a per-operation leak grows linearly with the
  work done, while warm-up costs (code paths, allocator arenas) are paid in the first phase; in
  all, at most 4 x LEAK_MIB over the idle server.

test_fsx: random read / write / truncate / mmap read / mmap write / fallocate (if supported) /
copy_file_range on one file that starts in the lower branch (so the first write copies it up),
checked against an in-memory model after every operation; every 50 operations the kernel's page
cache of the file is dropped so reads come from the server; at the end the upper file itself and a
fresh mount are compared with the model.

Knobs (environment):
  UNIONFS_LOAD_SECONDS  total load time (default 10; two phases of half of it)
  UNIONFS_LOAD_WORKERS  worker processes (default 8)
  UNIONFS_FSX_OPS       fsx operations (default 3000)
  UNIONFS_FAULT_SEED    seed of the random choices
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import random
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers.mounts import MOUNT_TIMEOUT, mount_overlay, unmount
from unionfs.branch import DIRFD_CACHE_MAX, LOWER_DIRFD_MIN, LOWER_DIRFDS

from .support import (
    BUG_MARKER,
    Branches,
    alive,
    cached_dir_fds,
    diff_snaps,
    drop_caches,
    env_float,
    env_int,
    fd_count,
    rss_kib,
    serve,
    snapshot,
    wait_until,
)

LOAD_SECONDS = env_float("UNIONFS_LOAD_SECONDS", 10.0)
WORKERS = env_int("UNIONFS_LOAD_WORKERS", 8)
FSX_OPS = env_int("UNIONFS_FSX_OPS", 3000)
WORKER = Path(__file__).with_name("loadworker.py")
FD_SLACK = 2
LEAK_MIB = 16


def _lower_tree(lower: Path) -> None:
    def put(rel: str, data: bytes) -> None:
        p = lower / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    put("a", b"lower a\n" * 100)
    put("b", b"lower b\n")
    put("d/a", b"lower d/a\n")
    put("d/b", b"x" * 70_000)
    put("e/c", b"lower e/c\n")
    (lower / "e" / "a").mkdir()
    put("e/a/x", b"deep\n")  # not in the workers' pool: keeps e/a non-empty
    os.symlink("a", lower / "c")
    os.link(lower / "b", lower / "e" / "b")  # a lower hard link
    os.chmod(lower / "d", 0o750)


def _run_workers(mnt: Path, out: Path, seconds: float, rng: random.Random, phase: str
                 ) -> list[dict[str, object]]:
    procs = []
    try:
        for i in range(WORKERS):
            res = out / f"{phase}-{i}.json"
            procs.append((subprocess.Popen(
                [sys.executable, str(WORKER), str(mnt), str(rng.randrange(2**32)),
                 str(seconds), str(res)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                res))
        results = []
        for p, res in procs:
            _, err = p.communicate(timeout=seconds + 60)
            assert p.returncode == 0, f"worker failed: {err.decode(errors='replace')}"
            results.append(json.loads(res.read_text()))
        return results
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=MOUNT_TIMEOUT)


def _check_results(results: list[dict[str, object]], problems: list[str]) -> Counter[str]:
    totals: Counter[str] = Counter()
    eio: list[str] = []
    unexpected: list[str] = []
    for r in results:
        res = r["results"]
        assert isinstance(res, dict)
        for op, counts in res.items():
            for key, n in counts.items():
                totals[f"{op}:{key}"] += n
        eio += r["eio"]  # type: ignore[arg-type]
        unexpected += r["unexpected"]  # type: ignore[arg-type]
    if eio:
        problems.append(f"{len(eio)} operations got EIO, e.g.: {eio[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected failures, e.g.: {unexpected[:5]}")
    return totals


def _check_tree(mnt: Path) -> None:
    """Every name lstat-able, files readable, dirs listable (snapshot does all of that), and
    the names of one inode agree on what they are."""
    snap = snapshot(mnt)
    by_ino: dict[int, list[bytes]] = {}
    for rel, entry in snap.items():
        if entry[0] == "file":
            st = os.lstat(os.fsencode(mnt) + b"/" + rel)
            by_ino.setdefault(st.st_ino, []).append(rel)
    for ino, names in by_ino.items():
        if len(names) < 2:
            continue
        entries = {snap[n][1:5] for n in names}  # mode, owner, size, content
        assert len(entries) == 1, f"names of inode {ino} disagree: {names} {entries}"
        nlinks = {os.lstat(os.fsencode(mnt) + b"/" + n).st_nlink for n in names}
        assert len(nlinks) == 1 and min(nlinks) >= len(names), (
            f"inode {ino}: {len(names)} names {names} but st_nlink {nlinks}")


def _cached(pid: int, br: Branches) -> int:
    """The server's cached directory fds (`Branch.dir_fd`), checked against their bounds."""
    upper = cached_dir_fds(pid, br.upper)
    assert upper <= DIRFD_CACHE_MAX, f"{upper} cached upper directory fds"
    lower = sum(cached_dir_fds(pid, p) for p in br.lowers)
    assert lower <= max(LOWER_DIRFDS, LOWER_DIRFD_MIN * len(br.lowers)), \
        f"{lower} cached lower directory fds"
    return upper + lower


def _idle(pid: int, base_fds: int, br: Branches) -> None:
    """Wait for the kernel's RELEASEs and FORGETs to be answered. The branches' directory fd
    caches may keep a bounded number of fds; any other fd left is a leak."""
    drop_caches()

    def others() -> int:
        return fd_count(pid) - _cached(pid, br)

    wait_until(lambda: others() <= base_fds + FD_SLACK, 10,
               f"server fds back to {base_fds} + {FD_SLACK} (now {others()} besides the "
               f"cached directories)")


def test_concurrent_random_operations(tmp_path: Path, rng: random.Random) -> None:
    br = Branches.make(tmp_path / "u")
    _lower_tree(br.lowers[0])
    out = tmp_path / "results"
    out.mkdir()
    phase = LOAD_SECONDS / 2
    totals: Counter[str] = Counter()
    problems: list[str] = []  # collected, so that one finding does not hide the others
    with serve(br, check_log=False) as m:
        assert m.server is not None
        pid = m.server.pid
        snapshot(br.mnt)
        drop_caches()
        base_fds, base_rss = fd_count(pid) - _cached(pid, br), rss_kib(pid)
        totals += _check_results(_run_workers(br.mnt, out, phase, rng, "p1"), problems)
        _idle(pid, base_fds, br)
        rss1 = rss_kib(pid)
        totals += _check_results(_run_workers(br.mnt, out, phase, rng, "p2"), problems)
        _idle(pid, base_fds, br)
        rss2 = rss_kib(pid)
        assert alive(m), "the server died under load"
        if BUG_MARKER in br.log_text():
            problems.append("server log: " + br.log_text()[-3000:])
        print(f"fds {base_fds}; RSS KiB {base_rss} -> {rss1} (phase 1) -> {rss2} (phase 2)")
        print("results:", dict(sorted(totals.items())))
        ok = sum(n for k, n in totals.items() if k.endswith(":ok"))
        assert ok > 1000, f"the load did almost nothing: {totals}"
        if rss2 - base_rss > 4 * LEAK_MIB * 1024:
            problems.append(f"server RSS grew {(rss2 - base_rss) // 1024} MiB under load")
        if rss2 - rss1 > LEAK_MIB * 1024:
            problems.append(f"server RSS grew {(rss2 - rss1) // 1024} MiB during phase 2 "
                            f"(> {LEAK_MIB} MiB)")
        try:
            _check_tree(br.mnt)
        except (AssertionError, OSError) as e:
            problems.append(f"inconsistent tree: {e!r}")
        first = snapshot(br.mnt)
    with serve(br):
        second = snapshot(br.mnt)
        if br.work_leftovers():
            problems.append(f"work dir not empty at mount: {br.work_leftovers()}")
    if first != second:
        problems.append("tree differs after remount:\n" + diff_snaps(first, second))
    # the oracle: kernel overlayfs reads the same branches (the upper as its top lower layer)
    omnt = tmp_path / "overlay"
    omnt.mkdir()
    mount_overlay([br.upper, *br.lowers], None, None, omnt, ["redirect_dir=follow"])
    try:
        third = snapshot(omnt)
    finally:
        unmount(omnt)
    if first != third:
        problems.append("kernel overlayfs sees another tree:\n" + diff_snaps(first, third))
    assert not problems, "\n".join(problems)


# --- fsx ------------------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAXLEN = 256 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Fsx:
    """The file under test and its model."""

    def __init__(self, path: Path, model: bytes, rng: random.Random) -> None:
        self.path = path
        self.model = bytearray(model)
        self.r = rng
        self.ro = os.open(path, os.O_RDONLY)  # opened before the copy-up: must follow it
        self.fd = os.open(path, os.O_RDWR)
        self.history: list[str] = []
        self.unsupported: set[int] = set()

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.ro)

    def _grow(self, end: int) -> None:
        if end > len(self.model):
            self.model.extend(b"\0" * (end - len(self.model)))

    def _range(self, within: int) -> tuple[int, int]:
        off = self.r.randrange(0, max(within, 1))
        return off, self.r.randrange(1, min(65536, MAXLEN - off) + 1)

    def step(self) -> None:
        kinds = ["read", "write", "truncate", "mapread", "mapwrite", "fallocate", "copy"]
        kind = self.r.choices(kinds, [4, 6, 1, 2, 2, 1, 2])[0]
        size = len(self.model)
        if kind == "read":
            off, n = self._range(size + 100)
            fd = self.r.choice((self.fd, self.ro))
            self.history.append(f"read {off} {n}")
            got = os.pread(fd, n, off)
            assert got == bytes(self.model[off:off + n]), "read returned other data"
        elif kind == "write":
            off, n = self._range(MAXLEN - 1)
            data = self.r.randbytes(n)
            self.history.append(f"write {off} {n}")
            assert os.pwrite(self.fd, data, off) == n
            self._grow(off + n)
            self.model[off:off + n] = data
        elif kind == "truncate":
            n = self.r.randrange(0, MAXLEN)
            self.history.append(f"truncate {n}")
            if self.r.random() < 0.5:
                os.ftruncate(self.fd, n)
            else:
                os.truncate(self.path, n)
            del self.model[n:]
            self._grow(n)
        elif kind in ("mapread", "mapwrite"):
            if size == 0:
                return
            off, n = self._range(size)
            n = min(n, size - off)
            self.history.append(f"{kind} {off} {n}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if kind == "mapwrite" else 0)
            with mmap.mmap(self.fd, size, mmap.MAP_SHARED, prot) as mm:
                if kind == "mapread":
                    assert mm[off:off + n] == bytes(self.model[off:off + n]), "mmap read"
                else:
                    data = self.r.randbytes(n)
                    mm[off:off + n] = data
                    mm.flush()
                    self.model[off:off + n] = data
        elif kind == "fallocate":
            mode = self.r.choice((0, FALLOC_FL_KEEP_SIZE,
                                  FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  FALLOC_FL_ZERO_RANGE))
            if mode in self.unsupported:
                return
            off, n = self._range(MAXLEN - 1)
            self.history.append(f"fallocate mode={mode:#x} {off} {n}")
            try:
                fallocate(self.fd, mode, off, n)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self.unsupported.add(mode)
                self.history.append("  -> EOPNOTSUPP")
                return
            if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                end = min(off + n, size) if mode & FALLOC_FL_KEEP_SIZE else off + n
                if end > off:
                    self._grow(end)
                    self.model[off:end] = b"\0" * (end - off)
            elif not mode & FALLOC_FL_KEEP_SIZE:
                self._grow(off + n)
        else:  # copy_file_range within the file, non-overlapping
            if size < 2:
                return
            src, n = self._range(size)
            n = min(n, size - src)
            dst = self.r.randrange(0, MAXLEN - n)
            if dst < src + n and src < dst + n:
                return
            self.history.append(f"copy {src} -> {dst} {n}")
            done = os.copy_file_range(self.fd, self.fd, n, src, dst)
            data = bytes(self.model[src:src + done])
            self._grow(dst + done)
            self.model[dst:dst + done] = data

    def check(self) -> None:
        size = os.fstat(self.fd).st_size
        assert size == len(self.model), f"size {size}, model {len(self.model)}"
        assert os.pread(self.fd, size + 1, 0) == bytes(self.model), "content differs"

    def drop_page_cache(self) -> None:
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def test_fsx(tmp_path: Path, rng: random.Random) -> None:
    br = Branches.make(tmp_path)
    initial = random.Random(5).randbytes(100_000)
    (br.lowers[0] / "fsx").write_bytes(initial)
    with serve(br):
        fsx = Fsx(br.mnt / "fsx", initial, rng)
        try:
            for i in range(FSX_OPS):
                try:
                    fsx.step()
                    fsx.check()
                    if i % 50 == 49:
                        fsx.drop_page_cache()
                        fsx.check()
                except AssertionError as e:
                    raise AssertionError(f"after op {i} ({e}); last ops:\n  "
                                         + "\n  ".join(fsx.history[-15:])) from None
        finally:
            fsx.close()
        print("fallocate modes unsupported:", sorted(fsx.unsupported) or "none")
        upper = br.upper / "fsx"
        st = os.lstat(upper)
        assert stat.S_ISREG(st.st_mode)
        assert upper.read_bytes() == bytes(fsx.model), "the upper file differs from the model"
        assert (br.lowers[0] / "fsx").read_bytes() == initial, "the lower file was written"
    with serve(br):
        assert (br.mnt / "fsx").read_bytes() == bytes(fsx.model)
    with contextlib.suppress(OSError):
        os.unlink(upper)
