"""Low-level mounting for the benchmarks: kernel overlayfs, FUSE servers run in the foreground as
child processes, and unmounting that never hangs.

Every FUSE server started here runs in its own session; `stop_server` unmounts (normally, then
lazily), waits for the server with a timeout and kills its process group if it outlives the
mount. Nothing here decides what to mount; `backends.py` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from unionfs.mountinfo import escape_option, mounts
from unionfs.mountinfo import lowerdir_option as lowerdir_option

MOUNT_TIMEOUT = 60.0


esc = escape_option


def mount_points() -> list[str]:
    return [mp for mp, _ in mounts()]


def is_mounted(mnt: Path | str) -> bool:
    return os.path.realpath(mnt) in mount_points()


def mounts_below(path: Path | str) -> list[str]:
    root = os.path.realpath(path).rstrip("/") + "/"
    return [m for m in mount_points() if m.startswith(root)]


def unmount(mnt: Path | str, timeout: float = MOUNT_TIMEOUT) -> None:
    """Unmount `mnt` if it is a mount point: normally first (so a FUSE server sees DESTROY and the
    next measurement does not share the machine with a dying server), lazily if that fails."""
    for attempt in range(6):
        if not is_mounted(mnt):
            return
        argv = ["umount", str(mnt)] if attempt < 2 else ["umount", "-l", str(mnt)]
        try:
            subprocess.run(argv, timeout=timeout, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            continue
        if attempt < 2 and is_mounted(mnt):
            time.sleep(0.2)
    if is_mounted(mnt):
        raise RuntimeError(f"could not unmount {mnt}")


def unmount_all_below(path: Path | str) -> None:
    for m in sorted(mounts_below(path), key=len, reverse=True):
        unmount(m)


def wait_mounted(mnt: Path | str, timeout: float = MOUNT_TIMEOUT,
                 proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {mnt} was mounted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.002)  # (the benchmark reports how long mounting takes: ms resolution)


def mount_overlay(lowers: Sequence[Path], upper: Path | None, work: Path | None, mnt: Path,
                  options: Sequence[str] = ()) -> None:
    opts = [f"lowerdir={lowerdir_option(lowers)}"]
    if upper is not None and work is not None:
        opts += [f"upperdir={esc(upper)}", f"workdir={esc(work)}"]
    opts += list(options)
    res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)],
                         timeout=MOUNT_TIMEOUT, capture_output=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"mount -t overlay failed: {res.stderr.decode(errors='replace')}")


def start_server(argv: Sequence[str], mnt: Path, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a foreground FUSE server and wait until `mnt` is mounted."""
    with open(log, "wb") as logf:
        proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                cwd=cwd)
    try:
        wait_mounted(mnt, proc=proc)
    except BaseException:
        stop_server(proc, mnt)
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{argv[0]} failed to mount {mnt}: {detail}") from None
    return proc


def stop_server(proc: subprocess.Popen[bytes] | None, mnt: Path) -> None:
    """Unmount `mnt` and make sure the server is gone."""
    try:
        unmount(mnt)
    finally:
        if proc is not None:
            try:
                proc.wait(timeout=MOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=MOUNT_TIMEOUT)
