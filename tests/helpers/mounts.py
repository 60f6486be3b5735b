"""Mounting helpers for tests: unionfs, kernel overlayfs and fuse-overlayfs, always with timeouts.

Every mount made here is undone by `unmount`, lazily, and a FUSE server started here is killed if
it outlives its mount, so a failing test never leaves a mount or a server behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.mountinfo import escape_option, lowerdir_option, mounts

MOUNT_TIMEOUT = 30.0


_esc = escape_option


def mount_points() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in this namespace, in mount order."""
    return mounts()


def is_mounted(mnt: Path | str) -> bool:
    target = os.path.realpath(mnt)
    return any(mp == target for mp, _ in mount_points())


def fs_type(mnt: Path | str) -> str | None:
    target = os.path.realpath(mnt)
    found = None
    for mp, kind in mount_points():
        if mp == target:
            found = kind
    return found


def unmount(mnt: Path | str) -> None:
    """Lazily unmount `mnt` if it is a mount point (FUSE or not). Never hangs."""
    for _ in range(5):
        if not is_mounted(mnt):
            return
        subprocess.run(["umount", "-l", str(mnt)], timeout=MOUNT_TIMEOUT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def wait_mounted(mnt: Path | str, timeout: float = MOUNT_TIMEOUT,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"mount server exited with {proc.returncode} before {mnt} was mounted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.02)


@dataclass
class Mount:
    """A live mount. `server` is the foreground FUSE server process, if any."""

    kind: str
    mnt: Path
    lowers: list[Path]
    upper: Path | None
    work: Path | None
    server: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def umount(self) -> None:
        unmount(self.mnt)
        if self.server is not None:
            try:
                self.server.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(timeout=MOUNT_TIMEOUT)

    def server_log(self) -> str:
        if self.log is not None and self.log.exists():
            return self.log.read_text(errors="replace")
        return ""


def unionfs_cmd() -> list[str]:
    return [sys.executable, "-m", "unionfs"]


def start_unionfs(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                  options: Sequence[str] = (), debug: bool = False,
                  log: Path | None = None) -> Mount:
    """Run unionfs in the foreground (-f) as a child process and wait for the mount."""
    opts = [f"lowerdir={lowerdir_option(lowers)}"]
    if upper is not None:
        assert work is not None
        opts += [f"upperdir={_esc(upper)}", f"workdir={_esc(work)}"]
    opts += list(options)
    cmd = [*unionfs_cmd(), "-f", *(["-d"] if debug else []), "-o", ",".join(opts), str(mnt)]
    logf = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    if log is not None:
        assert not isinstance(logf, int)
        logf.close()
    try:
        wait_mounted(mnt, proc=proc)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=MOUNT_TIMEOUT)
        unmount(mnt)
        detail = log.read_text(errors="replace") if log is not None and log.exists() else ""
        raise RuntimeError(f"unionfs failed to mount {mnt}: {detail}") from None
    return Mount("unionfs", mnt, list(lowers), upper, work, server=proc, log=log)


def mount_overlay(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                  options: Sequence[str] = ()) -> Mount:
    """Mount kernel overlayfs (the oracle)."""
    opts = [f"lowerdir={lowerdir_option(lowers)}"]
    if upper is not None:
        assert work is not None
        opts += [f"upperdir={_esc(upper)}", f"workdir={_esc(work)}"]
    opts += list(options)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)],
                   check=True, timeout=MOUNT_TIMEOUT, capture_output=True)
    return Mount("overlay", mnt, list(lowers), upper, work)


def start_fuse_overlayfs(lowers: Sequence[Path], upper: Path | None, work: Path | None,
                         mnt: Path, options: Sequence[str] = ()) -> Mount:
    opts = [f"lowerdir={lowerdir_option(lowers)}"]
    if upper is not None:
        assert work is not None
        opts += [f"upperdir={_esc(upper)}", f"workdir={_esc(work)}"]
    opts += list(options)
    proc = subprocess.Popen(["fuse-overlayfs", "-f", "-o", ",".join(opts), str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_mounted(mnt, proc=proc)
    return Mount("fuse-overlayfs", mnt, list(lowers), upper, work, server=proc)


@contextlib.contextmanager
def mounted(kind: str, lowers: Sequence[Path], upper: Path | None, work: Path | None,
            mnt: Path, options: Sequence[str] = (), log: Path | None = None) -> Iterator[Mount]:
    """Context manager over the three mount kinds: "unionfs", "overlay", "fuse-overlayfs"."""
    mnt.mkdir(parents=True, exist_ok=True)
    if kind == "unionfs":
        m = start_unionfs(lowers, upper, work, mnt, options, log=log)
    elif kind == "overlay":
        m = mount_overlay(lowers, upper, work, mnt, options)
    elif kind == "fuse-overlayfs":
        m = start_fuse_overlayfs(lowers, upper, work, mnt, options)
    else:
        raise ValueError(kind)
    try:
        yield m
    finally:
        m.umount()
