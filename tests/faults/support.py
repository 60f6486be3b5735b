"""Helpers shared by the fault tests: branch sets, mounted servers, tree snapshots, probes.

Owns: `Branches` (one lower/upper/work/mount set under a test's tmp_path, with a numbered server
log per mount), `serve` (mount, yield, unmount; fails on a logged "unionfs bug"), `crash` (SIGKILL
the server, lazily unmount, reap), `snapshot` (the merged tree as comparable data), and probes of a
server process (`fd_count`, `rss_kib`, `alive`). No pytest fixtures here (see conftest.py).

Every wait has a timeout; `serve` and `crash` leave neither a mount nor a process behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.mounts import MOUNT_TIMEOUT, Mount, is_mounted, start_unionfs, unmount

BUG_MARKER = "unionfs bug"


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment (documented in each module's docstring)."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


@dataclass
class Branches:
    """lowers (top first), upper, work and mount point of one union under ROOT."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, lowers: Sequence[Path] | None = None, nlower: int = 1
             ) -> Branches:
        """New (empty) branches under ROOT; LOWERS, when given, are used as they are."""
        root.mkdir(parents=True, exist_ok=True)
        lows = list(lowers) if lowers is not None else [root / f"lower{i}"
                                                         for i in range(nlower)]
        br = cls(root, lows, root / "upper", root / "work", root / "mnt")
        for d in [*br.lowers, br.upper, br.work, br.mnt]:
            d.mkdir(parents=True, exist_ok=True)
        return br

    def start(self, options: Sequence[str] = ()) -> Mount:
        """Start a foreground server (its own log file, numbered) and wait for the mount."""
        log = self.root / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        return start_unionfs(self.lowers, self.upper, self.work, self.mnt, options, log=log)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def work_leftovers(self) -> list[str]:
        """Names left in workdir/work (the server's scratch directory)."""
        w = self.work / "work"
        return sorted(os.listdir(w)) if w.is_dir() else []


def stop(m: Mount) -> None:
    """Unmount (lazily) and reap the server; kill it if it does not go. Never raises."""
    with contextlib.suppress(Exception):
        unmount(m.mnt)
    if m.server is not None and m.server.poll() is None:
        try:
            m.server.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.server.pid, signal.SIGKILL)
            m.server.wait(timeout=MOUNT_TIMEOUT)


@contextlib.contextmanager
def serve(br: Branches, options: Sequence[str] = (), check_log: bool = True
          ) -> Iterator[Mount]:
    """Mount BR, yield the mount, unmount. Fails the test if the server logged a bug."""
    m = br.start(options)
    try:
        yield m
    finally:
        stop(m)
    if check_log:
        assert BUG_MARKER not in br.log_text(), br.log_text()


def crash(m: Mount) -> None:
    """SIGKILL the server (no chance to clean up), then lazily unmount its dead mount."""
    assert m.server is not None
    m.server.send_signal(signal.SIGKILL)  # a no-op once the server has been reaped
    try:
        m.server.wait(timeout=MOUNT_TIMEOUT)
    finally:
        unmount(m.mnt)
    assert not is_mounted(m.mnt), f"{m.mnt} still mounted after the crash"


def alive(m: Mount) -> bool:
    return m.server is not None and m.server.poll() is None and is_mounted(m.mnt)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cached_dir_fds(pid: int, under: Path) -> int:
    """How many of the server's fds are O_PATH fds of directories below UNDER (the upper
    branch's directory fd cache, `Branch.dir_fd`, bounded by DIRFD_CACHE_MAX)."""
    n = 0
    prefix = str(under).rstrip("/") + "/"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info
                             if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if flags & os.O_PATH and target.startswith(prefix) and os.path.isdir(target):
            n += 1
    return n


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def drop_caches() -> None:
    """Reclaim unused dentries and inodes system-wide: the kernel sends FORGETs."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- tree snapshots ---------------------------------------------------------------------------

Snap = dict[bytes, tuple[object, ...]]


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                        for n in names if n.startswith("user.")))


def file_digest(path: bytes | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def entry_of(path: bytes, st: os.stat_result, mtimes: bool = True) -> tuple[object, ...]:
    """What a snapshot records for one object (no inode numbers, no ctimes, no dir mtimes)."""
    mode = st.st_mode
    owner = (st.st_uid, st.st_gid)
    if stat.S_ISDIR(mode):
        return ("dir", stat.S_IMODE(mode), owner, _xattrs(path))
    mt = st.st_mtime_ns if mtimes else None
    if stat.S_ISREG(mode):
        return ("file", stat.S_IMODE(mode), owner, st.st_size, file_digest(path), mt,
                _xattrs(path))
    if stat.S_ISLNK(mode):
        return ("symlink", os.readlink(path), owner)
    return ("other", stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_rdev, owner, mt)


def snapshot(root: Path | bytes, mtimes: bool = True) -> Snap:
    """Every object below ROOT (relative bytes path -> entry_of). Reads every file in full, so a
    listed name that cannot be stat'ed or read fails the caller with that OSError."""
    base = os.fsencode(root)
    out: Snap = {}
    todo = [b""]
    while todo:
        rel = todo.pop()
        full = base + b"/" + rel if rel else base
        for name in sorted(os.listdir(full)):
            crel = rel + b"/" + name if rel else name
            cpath = base + b"/" + crel
            st = os.lstat(cpath)
            out[crel] = entry_of(cpath, st, mtimes)
            if stat.S_ISDIR(st.st_mode):
                todo.append(crel)
    return out


def diff_snaps(a: Snap, b: Snap, limit: int = 8) -> str:
    """A short human-readable difference of two snapshots."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"  {k!r}: {a.get(k)!r} -> {b.get(k)!r}")
            if len(lines) >= limit:
                lines.append("  ...")
                break
    return "\n".join(lines)
