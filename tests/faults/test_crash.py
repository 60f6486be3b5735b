"""Crash consistency: SIGKILL the server in the middle of changes, remount, check the merged view.

Claims under test (CONTRIBUTING.md, union.py): after a crash every name shows either its old or
its new state; no partially copied-up file is ever visible and nothing is lost; leftovers in
workdir/work are removed at the next mount; data fsync'd through the mount survives a kill.

Two ways to choose the moment of the kill:

- random timing: a child process runs a list of operations (crashops.py) against the mount and
  the server is SIGKILLed at a random moment (for the copy-up of a large file: when the temp file
  in the work directory has reached a random fraction of its size). Several iterations, each its
  own random moment; the seed is printed, UNIONFS_FAULT_SEED replays it.
- every crash point (needs strace): the operation is traced once to list the server's mutating
  system calls, then replayed once per call with strace injecting SIGKILL at exactly that call.

After each kill the dead mount is lazily unmounted and the same upper/work are mounted again. The
merged tree must equal the state of a plain-directory model (same operations on a plain copy)
before or after the operation that was in flight, operations that had returned must be in effect,
workdir/work must be empty once mounted, and no temp name may be left in the upper branch.

Knobs (environment):
  UNIONFS_CRASH_ITERATIONS  random-timing iterations per scenario (default 4)
  UNIONFS_CRASH_BIG_MIB     size of the large lower file in MiB (default 200)
  UNIONFS_FAULT_SEED        seed of the random choices
  -m slow                   runs every crash-point scenario (the default run has three)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.mounts import MOUNT_TIMEOUT, Mount

from .crashops import Op, apply, pattern
from .support import (
    Branches,
    Snap,
    crash,
    diff_snaps,
    env_int,
    serve,
    snapshot,
    wait_until,
)

BIG_MIB = env_int("UNIONFS_CRASH_BIG_MIB", 200)
ITERATIONS = env_int("UNIONFS_CRASH_ITERATIONS", 4)
CRASHOPS = Path(__file__).with_name("crashops.py")
MTIME_NS = 1_600_000_000_123_456_789
BLOCK = 4096


# --- building branches -----------------------------------------------------------------------

def put(path: Path, data: bytes, mode: int = 0o644, xattr: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if xattr is not None:
        os.setxattr(path, "user.tag", xattr)
    os.utime(path, ns=(MTIME_NS, MTIME_NS))
    return path


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def upper_temp_names(upper: Path) -> list[str]:
    """Names in the upper branch that look like the server's temp names (#N.PID)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in dirnames + filenames:
            if re.fullmatch(r"#[0-9a-f]+\.\d+", n):
                found.append(os.path.join(dirpath, n))
    return found


@pytest.fixture(scope="module")
def big_lower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only lower branch shared by the random-timing tests: a large file of non-repeating
    data (no holes: every MiB differs), mode, mtime and xattr set, and a small tree."""
    lower = tmp_path_factory.mktemp("crash") / "lower"
    lower.mkdir()
    rnd = random.Random(1).randbytes(1 << 20)
    big = lower / "big"
    with open(big, "wb") as f:
        for i in range(BIG_MIB):
            f.write(i.to_bytes(8, "little") + rnd[8:])
    os.chmod(big, 0o640)
    os.setxattr(big, "user.tag", b"big")
    os.utime(big, ns=(MTIME_NS, MTIME_NS))
    put(lower / "tree" / "sub" / "x", b"x" * 5000, 0o600, b"x")
    put(lower / "tree" / "sub" / "y", b"y" * 10)
    put(lower / "tree" / "z", b"zz", 0o755)
    return lower


# --- the workload child and the model ---------------------------------------------------------

def start_child(mnt: Path, ops: list[Op]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CRASHOPS), str(mnt), json.dumps(ops)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def reap_child(child: subprocess.Popen[str]) -> int:
    """Wait for a workload child (killing it if it hangs); how many operations it completed."""
    try:
        out, _ = child.communicate(timeout=MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate(timeout=MOUNT_TIMEOUT)
    return sum(1 for line in out.splitlines() if line.startswith("done "))


def model_states(initial: Path, scratch: Path, ops: list[Op], mtimes: bool) -> list[Snap]:
    """Snapshots of a plain copy of INITIAL before and after each operation."""
    shutil.copytree(initial, scratch, symlinks=True)
    states = [snapshot(scratch, mtimes)]
    for op in ops:
        apply(os.fsencode(scratch), op)
        states.append(snapshot(scratch, mtimes))
    shutil.rmtree(scratch)
    return states


def check_recovered(br: Branches, states: list[Snap], done: int | None, mtimes: bool) -> int:
    """Mount BR again and check the merged tree is one of STATES (at index DONE or DONE + 1 when
    DONE operations are known to have completed). Returns the matching index."""
    with serve(br):
        assert br.work_leftovers() == [], "workdir/work not emptied at mount"
        snap = snapshot(br.mnt, mtimes)
    assert upper_temp_names(br.upper) == [], "temp names left in the upper branch"
    matches = [i for i, s in enumerate(states) if s == snap]
    near = states[min(done or 0, len(states) - 1)]
    assert matches, (f"merged tree after the crash is no state of the model "
                     f"({done} operations had completed); differences from that state:\n"
                     f"{diff_snaps(near, snap)}")
    if done is not None:
        assert any(done <= i <= done + 1 for i in matches), (
            f"tree matches model states {matches} but {done} operations had completed")
    return matches[0]


KillFn = Callable[[Mount, "subprocess.Popen[str]"], str]


def crash_once(br: Branches, ops: list[Op], kill: KillFn) -> tuple[str, int, list[str]]:
    """Run OPS in a child against a fresh mount of BR; KILL picks the moment and kills the server.
    Returns (what KILL saw, operations completed, work dir leftovers before remounting)."""
    m = br.start()
    child: subprocess.Popen[str] | None = None
    try:
        child = start_child(br.mnt, ops)
        seen = kill(m, child)
    finally:
        crash(m)
        done = reap_child(child) if child is not None else 0
    return seen, done, br.work_leftovers()


def wait_started(child: subprocess.Popen[str]) -> None:
    """Wait for the child's "start" line: it is about to run its first operation."""
    assert child.stdout is not None
    # one byte at a time from the pipe itself: readline() would buffer whatever "done" lines
    # already followed, and reap_child's communicate() reads the pipe, not that buffer, so
    # those operations would not be counted
    line = b""
    while not line.endswith(b"\n") and (b := os.read(child.stdout.fileno(), 1)):
        line += b
    assert line.strip() == b"start" or child.poll() is not None, line


def kill_after(delay: float) -> KillFn:
    def kill(m: Mount, child: subprocess.Popen[str]) -> str:
        wait_started(child)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.0005)
        assert m.server is not None
        m.server.send_signal(signal.SIGKILL)
        return "after-child" if child.poll() is not None else "during"
    return kill


def calibrate(br: Branches, ops: list[Op], states: list[Snap], mtimes: bool) -> float:
    """Run OPS once without a kill: the union must end in the model's final state. Returns the
    run time, the window the random kills are spread over."""
    with serve(br):
        child = start_child(br.mnt, ops)
        wait_started(child)
        t0 = time.monotonic()
        done = reap_child(child)
        elapsed = time.monotonic() - t0
        assert child.returncode == 0 and done == len(ops), child.stderr
        final = snapshot(br.mnt, mtimes)
    assert final == states[-1], "union differs from the model:\n" + diff_snaps(states[-1], final)
    return elapsed


def random_crashes(root: Path, lowers: list[Path], fill_upper: Callable[[Path], None] | None,
                   ops: list[Op], rng: random.Random, mtimes: bool = True) -> list[int]:
    """The random-timing harness: model, calibration, then ITERATIONS kills at random moments.
    Returns the model state index matched by each iteration."""
    init = Branches.make(root / "initial", lowers=lowers)
    if fill_upper is not None:
        fill_upper(init.upper)
    with serve(init):
        shutil.copytree(init.mnt, root / "merged0", symlinks=True)
    states = model_states(root / "merged0", root / "model", ops, mtimes)
    shutil.rmtree(root / "merged0")
    shutil.rmtree(init.root)
    cal = Branches.make(root / "calibrate", lowers=lowers)
    if fill_upper is not None:
        fill_upper(cal.upper)
    window = calibrate(cal, ops, states, mtimes)
    shutil.rmtree(cal.root)
    hits = []
    for it in range(ITERATIONS):
        br = Branches.make(root / f"it{it}", lowers=lowers)
        if fill_upper is not None:
            fill_upper(br.upper)
        delay = rng.uniform(0, window * 1.1)
        _seen, done, _left = crash_once(br, ops, kill_after(delay))
        hits.append(check_recovered(br, states, done, mtimes))
        shutil.rmtree(br.root)
    print(f"window {window:.3f}s, model states hit: {hits}")
    return hits


# --- (a) copy-up of a large file -------------------------------------------------------------

def test_kill_during_copy_up_of_large_file(tmp_path: Path, big_lower: Path,
                                           rng: random.Random) -> None:
    """open(O_WRONLY) copies a large lower file up; the server is killed when the temp copy in
    the work directory has reached a random fraction of its size (or while its metadata is set).
    After remounting, the file is the complete original: never a partial copy."""
    size = BIG_MIB << 20
    init = Branches.make(tmp_path / "initial", lowers=[big_lower])
    with serve(init):
        before = snapshot(init.mnt)
    phases = []
    for it in range(ITERATIONS):
        br = Branches.make(tmp_path / f"it{it}", lowers=[big_lower])
        frac = rng.random()
        linger = rng.choice([0.0, rng.uniform(0, 0.003)])
        tmpdir = br.work / "work"

        def kill(m: Mount, child: subprocess.Popen[str], frac: float = frac,
                 linger: float = linger, tmpdir: Path = tmpdir) -> str:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while time.monotonic() < deadline and child.poll() is None:
                names = os.listdir(tmpdir) if tmpdir.is_dir() else []
                with contextlib.suppress(FileNotFoundError):
                    if names and os.stat(tmpdir / names[0]).st_size >= frac * size:
                        break
            time.sleep(linger)
            assert m.server is not None
            m.server.send_signal(signal.SIGKILL)
            m.server.wait(timeout=MOUNT_TIMEOUT)
            names = os.listdir(tmpdir)
            if names:
                got = os.stat(tmpdir / names[0]).st_size
                return "mid-data" if got < size else "metadata"
            return "done" if child.poll() is not None else "before-or-renamed"

        phase, done, leftovers = crash_once(br, [["open_w", "big"]], kill)
        phases.append(phase)
        if phase in ("mid-data", "metadata"):
            assert leftovers, "the kill left no temp file in the work dir?"
        check_recovered(br, [before, before], done, mtimes=True)
        shutil.rmtree(br.root)
    print("kill phases:", phases)
    if ITERATIONS >= 2:
        assert "mid-data" in phases, f"no kill landed inside the data copy: {phases}"


# --- (b) renames ------------------------------------------------------------------------------

RENAME_OPS: list[Op] = [
    ["rename", "big", "big.moved"],            # copy-up of a large file, then the rename
    ["rename", "tree", "tree.moved"],          # a lower directory: redirect
    ["rename", "tree.moved/sub", "tree.moved/sub2"],
    ["rename", "big.moved", "tree.moved/big"],
    ["mkdir", "tree"],                         # over the whiteout the first rename left
    ["rename", "tree.moved/z", "tree/z"],
    ["rename", "tree.moved/sub2", "tree/sub"],
]


def test_kill_during_renames(tmp_path: Path, big_lower: Path, rng: random.Random) -> None:
    """Renames of a large lower file (copy-up first), lower directories (redirects) and upper
    objects, killed at random moments: the tree is one of the model's states, never with an
    object at both names, at neither, or a directory lost."""
    random_crashes(tmp_path, [big_lower], None, RENAME_OPS, rng)


# --- (c) whiteouts ------------------------------------------------------------------------------

def _whiteout_layout(root: Path) -> tuple[Path, Callable[[Path], None], list[Op]]:
    lower = root / "lower"
    for i in range(120):
        put(lower / f"f{i:03}", f"lower file {i}\n".encode())
    for i in range(10):
        put(lower / f"d{i:02}" / "x", b"lower x\n")

    def fill_upper(upper: Path) -> None:
        for i in range(0, 120, 4):  # every fourth file also in the upper: it shadows the lower
            put(upper / f"f{i:03}", f"upper file {i}\n".encode(), xattr=b"u")
        for i in range(0, 10, 2):   # half of the directories are merged with an upper part
            put(upper / f"d{i:02}" / "y", b"upper y\n")

    ops: list[Op] = []
    order = list(range(120))
    random.Random(7).shuffle(order)
    for i in range(10):
        ops.append(["unlink", f"d{i:02}/x"])
        if i % 2 == 0:
            ops.append(["unlink", f"d{i:02}/y"])
        ops.append(["rmdir", f"d{i:02}"])
        ops += [["unlink", f"f{j:03}"] for j in order[i * 12:(i + 1) * 12]]
    return lower, fill_upper, ops


def test_kill_during_whiteout_creation(tmp_path: Path, rng: random.Random) -> None:
    """Unlinks of lower files (whiteout created), of upper files that shadow lower ones (replaced
    by a whiteout), and rmdir of lower and merged directories, killed at random moments."""
    lower, fill_upper, ops = _whiteout_layout(tmp_path / "layout")
    random_crashes(tmp_path, [lower], fill_upper, ops, rng)


# --- (d) writes -----------------------------------------------------------------------------------

def _write_layout(root: Path, seed: int) -> tuple[Path, list[Op]]:
    lower = root / "lower"
    nblocks = 1024
    data = b"".join(pattern(1_000_000 + i, BLOCK) for i in range(nblocks))
    put(lower / "data", data, 0o644, b"d")
    r = random.Random(seed)
    ops: list[Op] = []
    size = nblocks * BLOCK
    for k in range(60):
        roll = r.random()
        if roll < 0.08:
            size = r.randrange(size // 2, size + 1) // BLOCK * BLOCK
            ops.append(["truncate", "data", size])
        elif roll < 0.15:
            # create(2) and write(2) are two steps for any file system: the crash test keeps them
            # apart (an empty new file is a legitimate state in between)
            ops.append(["create", f"new{k}", 0, 0])
            ops.append(["write", f"new{k}", 0, 2_000_000 + k, BLOCK])
        else:
            off = r.randrange(0, size + BLOCK, BLOCK)  # sometimes at the end: the file grows
            size = max(size, off + BLOCK)
            ops.append(["write", "data", off, 3_000_000 + k, BLOCK])
    return lower, ops


def test_kill_during_writes(tmp_path: Path, rng: random.Random) -> None:
    """One-page writes (each open/pwrite/close: close pushes cached data to the server),
    truncates and new files on a copied-up lower file, killed at random moments: every completed
    write is in the file, the one in flight is there or not, nothing else changed."""
    lower, ops = _write_layout(tmp_path / "layout", rng.randrange(2**32))
    random_crashes(tmp_path, [lower], None, ops, rng, mtimes=False)


FSYNC_WRITER = r"""
import os, random, sys
path, seed, count, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
nblocks = int(sys.argv[5])
r = random.Random(seed)
fd = os.open(path, os.O_RDWR)
for seq in range(1, count + 1):
    b = r.randrange(nblocks)
    os.pwrite(fd, (seq.to_bytes(8, "little") * 512), b * 4096)
    if seq % every == 0:
        os.fsync(fd)
        print("synced", seq, flush=True)
"""


def test_kill_with_fsynced_and_unsynced_writes(tmp_path: Path, rng: random.Random) -> None:
    """One open file, many 4 KiB writes and an fsync every few writes, killed at a random
    moment: each block holds its original data or one of the values written to it, and never a
    value older than the last write to it that an fsync had confirmed."""
    nblocks, count, every = 512, 3000, 25
    lower = tmp_path / "lower"
    orig = [pattern(1_000_000 + i, BLOCK) for i in range(nblocks)]
    put(lower / "data", b"".join(orig))
    for it in range(ITERATIONS):
        seed = rng.randrange(2**32)
        r = random.Random(seed)
        writes: list[list[int]] = [[] for _ in range(nblocks)]
        for seq in range(1, count + 1):
            writes[r.randrange(nblocks)].append(seq)
        br = Branches.make(tmp_path / f"it{it}", lowers=[lower])
        m = br.start()
        lines: list[str] = []
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", FSYNC_WRITER, str(br.mnt / "data"), str(seed),
                 str(count), str(every), str(nblocks)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True)
            try:
                target = rng.randrange(1, count // every)
                assert child.stdout is not None
                while True:  # kill once a random number of fsyncs have been confirmed
                    line = child.stdout.readline()
                    if not line:
                        break
                    lines.append(line)
                    if len(lines) >= target:
                        time.sleep(rng.uniform(0, 0.01))
                        break
            finally:
                crash(m)
                try:
                    rest, _ = child.communicate(timeout=MOUNT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    rest, _ = child.communicate(timeout=MOUNT_TIMEOUT)
        finally:
            crash(m)
        lines += rest.splitlines()
        synced = max((int(x.split()[1]) for x in lines if x.startswith("synced")), default=0)
        with serve(br):
            assert br.work_leftovers() == []
            got = (br.mnt / "data").read_bytes()
        assert len(got) == nblocks * BLOCK
        for b in range(nblocks):
            blk = got[b * BLOCK:(b + 1) * BLOCK]
            confirmed = [s for s in writes[b] if s <= synced]
            allowed = {s.to_bytes(8, "little") * 512 for s in writes[b]
                       if not confirmed or s >= confirmed[-1]}
            if not confirmed:
                allowed.add(orig[b])
            assert blk in allowed, (f"block {b}: {blk[:8]!r}... is not a value it may hold "
                                    f"(last fsync'd write {confirmed[-1:]}, fsync'd up to "
                                    f"{synced})")
        shutil.rmtree(br.root)


def test_fsynced_data_survives_sigkill(tmp_path: Path) -> None:
    """Data written and fsync'd through the mount is there after a SIGKILL and a remount: a new
    file, a rewritten lower file (copy-up), and the write-temp/fsync/rename-over idiom."""
    br = Branches.make(tmp_path)
    put(br.lowers[0] / "old", b"o" * 100_000)
    put(br.lowers[0] / "config", b"version 1\n")
    fresh = random.Random(3).randbytes(6 << 20)
    patch = random.Random(4).randbytes(70_000)
    m = br.start()
    fds: list[int] = []
    try:
        fd = os.open(br.mnt / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fds.append(fd)
        os.write(fd, fresh)
        os.fsync(fd)
        fd = os.open(br.mnt / "old", os.O_RDWR)
        fds.append(fd)
        os.pwrite(fd, patch, 12_345)
        os.fdatasync(fd)
        fd = os.open(br.mnt / "config.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fds.append(fd)
        os.write(fd, b"version 2\n")
        os.fsync(fd)
        os.rename(br.mnt / "config.tmp", br.mnt / "config")
        dfd = os.open(br.mnt, os.O_RDONLY | os.O_DIRECTORY)
        fds.append(dfd)
        os.fsync(dfd)
    finally:
        crash(m)  # with every file still open: nothing but fsync pushed the data
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    with serve(br):
        assert (br.mnt / "new").read_bytes() == fresh
        old = bytearray(b"o" * 100_000)
        old[12_345:12_345 + len(patch)] = patch
        assert (br.mnt / "old").read_bytes() == bytes(old)
        assert (br.mnt / "config").read_bytes() == b"version 2\n"
        assert not (br.mnt / "config.tmp").exists()
        assert br.work_leftovers() == []


@pytest.mark.parametrize("options", [[], ["noopen=1"]], ids=["open", "noopen"])
def test_close_after_the_server_died_fails(tmp_path: Path, options: list[str]) -> None:
    """close() of a file written through the mount reports a server that died before the data
    reached it: test_kill_during_writes counts an operation as done when its close() returned.

    The kernel drops the dirty pages without an error when the connection is gone as it sends
    them, so only a request of close() itself can fail: a flush (unless the server ever answered
    flush with ENOSYS: the kernel sends none after that) or the setattr that writes back times
    the write changed. Each file is created and written in the same timestamp tick, after a
    pause of more than a tick, so the write changes no time and the flush is what must fail."""
    br = Branches.make(tmp_path)
    m = br.start(options)
    fds: list[int] = []
    closed: list[str] = []
    try:
        # a first close: a server that answers flush with ENOSYS has done so after this one
        os.close(os.open(br.mnt / "first", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        for i in range(8):
            time.sleep(0.02)
            fd = os.open(br.mnt / f"new{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fds.append(fd)
            os.pwrite(fd, pattern(i, BLOCK), 0)
        assert m.server is not None
        m.server.send_signal(signal.SIGKILL)
        m.server.wait(timeout=MOUNT_TIMEOUT)
        for i in range(len(fds)):
            fd = fds.pop(0)  # closed even when close() fails
            try:
                os.close(fd)
                closed.append(f"new{i}")
            except OSError as e:
                assert e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO), e
    finally:
        crash(m)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    with serve(br):
        lost = [n for n in closed if (br.mnt / n).stat().st_size != BLOCK]
    assert closed == [], f"close() returned 0 for {closed}; data lost for {lost}"


# --- every crash point of one operation (strace) ----------------------------------------------

TRACED = ("openat", "mkdirat", "mknodat", "unlinkat", "renameat2", "symlinkat", "linkat",
          "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fchown",
          "fchownat", "fchmod", "fchmodat", "utimensat", "ftruncate", "copy_file_range",
          "pwrite64", "fsync", "fdatasync")


def _layout_copy_up(br: Branches) -> Op:
    put(br.lowers[0] / "f", b"flat" * 1000, 0o640, b"f")
    return ["open_w", "f"]


def _layout_copy_up_nested(br: Branches) -> Op:
    low = br.lowers[0]
    put(low / "a" / "b" / "f", b"nested" * 1000, 0o640, b"f")
    os.chmod(low / "a" / "b", 0o705)
    os.setxattr(low / "a", "user.tag", b"a")
    return ["open_w", "a/b/f"]


def _layout_rename_lower_dir(br: Branches) -> Op:
    put(br.lowers[0] / "d" / "x", b"x")
    put(br.lowers[0] / "d" / "sub" / "y", b"y", xattr=b"y")
    return ["rename", "d", "e"]


def _layout_rename_dir_over_emptied_dir(br: Branches) -> Op:
    # d is a lower directory whose only entry was deleted: it looks empty, and rename(2) may
    # replace an empty directory
    put(br.lowers[0] / "d" / "x", b"lower x")
    whiteout(br.upper / "d" / "x")
    put(br.upper / "s" / "z", b"upper z")
    return ["rename", "s", "d"]


def _layout_rmdir_merged_dir(br: Branches) -> Op:
    put(br.lowers[0] / "d" / "x", b"lower x")
    whiteout(br.upper / "d" / "x")
    return ["rmdir", "d"]


def _layout_rename_lower_file_over_upper(br: Branches) -> Op:
    put(br.lowers[0] / "f", b"lower f", xattr=b"f")
    put(br.lowers[0] / "g", b"lower g")
    put(br.upper / "g", b"upper g")
    return ["rename", "f", "g"]


def _layout_unlink_upper_over_lower(br: Branches) -> Op:
    put(br.lowers[0] / "f", b"lower f")
    put(br.upper / "f", b"upper f")
    return ["unlink", "f"]


def _layout_mkdir_over_whiteout(br: Branches) -> Op:
    put(br.lowers[0] / "d" / "x", b"lower x")
    whiteout(br.upper / "d")
    return ["mkdir", "d"]


def _layout_create_over_whiteout(br: Branches) -> Op:
    put(br.lowers[0] / "f", b"lower f")
    whiteout(br.upper / "f")
    return ["create", "f", 5, 0]  # just the creation: writing is another operation


def _layout_link_lower_file(br: Branches) -> Op:
    put(br.lowers[0] / "d" / "f", b"lower f", xattr=b"f")
    return ["link", "d/f", "g"]


def _layout_copy_up_hard_links(br: Branches) -> Op:
    low = br.lowers[0]
    put(low / "f", b"linked")
    (low / "sub").mkdir()
    os.link(low / "f", low / "h")
    os.link(low / "f", low / "sub" / "k")
    return ["open_w", "f"]


def _layout_chmod_lower_dir(br: Branches) -> Op:
    put(br.lowers[0] / "d" / "x", b"x")
    return ["chmod", "d", 0o700]


CRASH_POINT_SCENARIOS = [
    pytest.param(_layout_copy_up, id="copy-up"),
    pytest.param(_layout_copy_up_nested, id="copy-up-nested", marks=pytest.mark.slow),
    pytest.param(_layout_rename_lower_dir, id="rename-lower-dir"),
    pytest.param(_layout_rename_dir_over_emptied_dir, id="rename-dir-over-emptied-dir"),
    pytest.param(_layout_rmdir_merged_dir, id="rmdir-merged-dir", marks=pytest.mark.slow),
    pytest.param(_layout_rename_lower_file_over_upper, id="rename-lower-file-over-upper",
                 marks=pytest.mark.slow),
    pytest.param(_layout_unlink_upper_over_lower, id="unlink-upper-over-lower",
                 marks=pytest.mark.slow),
    pytest.param(_layout_mkdir_over_whiteout, id="mkdir-over-whiteout", marks=pytest.mark.slow),
    pytest.param(_layout_create_over_whiteout, id="create-over-whiteout",
                 marks=pytest.mark.slow),
    pytest.param(_layout_link_lower_file, id="link-lower-file", marks=pytest.mark.slow),
    pytest.param(_layout_copy_up_hard_links, id="copy-up-hard-links", marks=pytest.mark.slow),
    pytest.param(_layout_chmod_lower_dir, id="chmod-lower-dir", marks=pytest.mark.slow),
]


def _traced_by(pid: int, tracer: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                line = next(x for x in f if x.startswith("TracerPid:"))
        except (FileNotFoundError, StopIteration):
            return False
        if int(line.split()[1]) != tracer:
            return False
    return True


def _attach(strace: str, pid: int, out: Path, inject: str | None) -> subprocess.Popen[bytes]:
    cmd = [strace, "-f", "-o", str(out), "-e", "trace=" + ",".join(TRACED)]
    if inject is not None:
        cmd += ["-e", f"inject={inject}"]
    errlog = open(out.with_suffix(".err"), "wb")
    try:
        tracer = subprocess.Popen([*cmd, "-p", str(pid)], stdout=subprocess.DEVNULL,
                                  stderr=errlog)
    finally:
        errlog.close()
    try:
        wait_until(lambda: _traced_by(pid, tracer.pid), 10, "strace to attach")
    except BaseException:
        _detach(tracer)
        raise
    return tracer


def _detach(tracer: subprocess.Popen[bytes]) -> None:
    if tracer.poll() is None:
        tracer.send_signal(signal.SIGINT)  # strace detaches and exits
    try:
        tracer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait(timeout=10)


_CALL = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)$")


def crash_points(trace: Path) -> list[tuple[str, int, str]]:
    """(syscall, its occurrence number, the traced line) of each mutating call in TRACE."""
    counts: dict[str, int] = {}
    points = []
    for line in trace.read_text().splitlines():
        mt = _CALL.match(line)
        if mt is None or mt.group(1) not in TRACED:
            continue
        name = mt.group(1)
        counts[name] = counts.get(name, 0) + 1
        if name == "openat" and "O_CREAT" not in mt.group(2):
            continue
        points.append((name, counts[name], line))
    return points


@pytest.mark.parametrize("layout", CRASH_POINT_SCENARIOS)
def test_every_crash_point(tmp_path: Path, strace: str, layout: Callable[[Branches], Op]
                           ) -> None:
    """Kill the server at each mutating system call of one operation (strace injects SIGKILL
    there, so the call never happens); after each, the remounted tree is the old or new state."""
    ref = Branches.make(tmp_path / "ref")
    op = layout(ref)
    m = ref.start()
    try:
        before = snapshot(ref.mnt)
        tracer = _attach(strace, m.server.pid if m.server else 0, tmp_path / "ref.trace", None)
        try:
            child = start_child(ref.mnt, [op])
            assert reap_child(child) == 1, child.stderr
        finally:
            _detach(tracer)
        after = snapshot(ref.mnt)
    finally:
        crash(m)
    assert before != after or op[0] == "open_w", "the operation changed nothing?"
    points = crash_points(tmp_path / "ref.trace")
    assert points, "no mutating system call traced"
    print(f"{len(points)} crash points:", *(f"  {p[2][:150]}" for p in points), sep="\n")
    failures = []
    for k, (name, nth, line) in enumerate(points):
        br = Branches.make(tmp_path / f"p{k}")
        layout(br)
        m = br.start()
        assert m.server is not None
        # the same lookups as before the traced operation (the nodes the kernel knows decide
        # what a copy-up does at once: the other names of a hard link it knows are linked then)
        assert snapshot(br.mnt) == before
        tracer = _attach(strace, m.server.pid, tmp_path / f"p{k}.trace",
                         f"{name}:signal=KILL:error=EIO:when={nth}")
        child = None
        try:
            child = start_child(br.mnt, [op])
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while m.server.poll() is None and child.poll() is None:
                assert time.monotonic() < deadline, "neither the server nor the child ended"
                time.sleep(0.005)
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.server.wait(timeout=2)
            reached = m.server.returncode == -signal.SIGKILL
        finally:
            crash(m)
            done = reap_child(child) if child is not None else 0
            _detach(tracer)
        assert reached, f"crash point {k} ({line}) was not reached on replay"
        try:
            check_recovered(br, [before, after], done, mtimes=True)
        except AssertionError as e:
            failures.append(f"kill at {name} #{nth} [{line[:160]}]: {e}")
        shutil.rmtree(br.root, ignore_errors=True)
    assert not failures, "\n\n".join(failures)


def test_killed_server_leaves_callers_an_error_not_a_hang(tmp_path: Path) -> None:
    """A caller blocked on a request of a server that is then killed gets ENOTCONN-like
    errors at once (the copy-up in flight is abandoned)."""
    br = Branches.make(tmp_path)
    put(br.lowers[0] / "f", b"f" * 1000)
    m = br.start()
    try:
        assert m.server is not None
        m.server.send_signal(signal.SIGSTOP)  # requests now wait
        child = start_child(br.mnt, [["open_w", "f"]])
        time.sleep(0.2)
        assert child.poll() is None
        m.server.send_signal(signal.SIGKILL)
        m.server.wait(timeout=MOUNT_TIMEOUT)
        child.wait(timeout=MOUNT_TIMEOUT)
        assert child.returncode != 0
        assert child.stderr is not None
        err = child.stderr.read()
        assert any(os.strerror(c) in err for c in (errno.ENOTCONN, errno.ECONNABORTED)), err
    finally:
        crash(m)
    with serve(br):
        assert (br.mnt / "f").read_bytes() == b"f" * 1000
