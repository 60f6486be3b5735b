"""System plumbing shared by every benchmark: commands with timeouts, page-cache dropping, the
CPU time and memory of a server process from /proc, hard-link farms, the machine description and
the progress line.

Nothing here knows about union file systems; every wait has a timeout and every helper that
creates something on disk has a matching cleanup.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

COMMAND_TIMEOUT = 3600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark step failed in a way that is reported, not a bug of the harness."""


def run(argv: Sequence[str | os.PathLike[str]], timeout: float = COMMAND_TIMEOUT,
        check: bool = True, capture: bool = False, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion with a timeout; stdout discarded unless `capture`."""
    try:
        res = subprocess.run([str(a) for a in argv], timeout=timeout, env=env, cwd=cwd,
                             stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                             stderr=subprocess.PIPE, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(map(str, argv))}") from e
    if check and res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"exit {res.returncode}: {' '.join(map(str, argv))}: {' | '.join(err)}")
    return res


def drop_caches() -> None:
    """Write back dirty data, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


# -- a server process seen through /proc ----------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads, live and exited), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_thread_ns(pid: int) -> dict[int, int]:
    """Nanoseconds on CPU of each live thread of a process (/proc/PID/task/TID/schedstat)."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def proc_status_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A `kB` value from /proc/PID/status (VmRSS by default)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def catches_signal(pid: int, signum: int) -> bool:
    """True if the process has a handler installed for `signum` (SigCgt in /proc/PID/status).

    Sending SIGUSR1 to a process without a handler would kill it, so callers check first."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return False
    return False


# -- trees on disk --------------------------------------------------------------------------------

def rmtree(path: Path) -> None:
    """Remove a tree that may contain read-only directories or device nodes; never follows a
    mount (callers unmount first)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        run(["rm", "-rf", "--one-file-system", "--", str(path)], timeout=COMMAND_TIMEOUT)
    else:
        path.unlink()


def link_farm(src: Path, dst: Path, copy: Sequence[str] = ()) -> None:
    """Make `dst` a hard-link copy of `src` (cheap), except the relative paths in `copy`, which
    get their own data so writing to them in place never changes `src`."""
    run(["cp", "-al", "--", str(src), str(dst)])
    for rel in copy:
        target = dst / rel
        if target.is_file() and not target.is_symlink():
            tmp = target.with_name(target.name + ".bench-copy")
            run(["cp", "-a", "--", str(src / rel), str(tmp)])
            os.replace(tmp, target)


def write_pattern(path: Path, size: int, seed: int, chunk: int = 1 << 20) -> None:
    """Write `size` bytes of incompressible, deterministic data (fast: one random chunk, each
    repetition xor-free but shifted so no two MiB are identical)."""
    import random

    rnd = random.Random(seed)
    base = rnd.randbytes(chunk + 4096)
    with open(path, "wb") as f:
        done = 0
        i = 0
        while done < size:
            n = min(chunk, size - done)
            off = (i * 997) % 4096
            block = base[off:off + n]
            if i:
                block = i.to_bytes(8, "little") + block[8:]
            f.write(block[:n])
            done += n
            i += 1


# -- the machine ----------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    root_fs = ""
    with contextlib.suppress(OSError):
        res = run(["findmnt", "-n", "-o", "FSTYPE", "-T", "/var/cache"], capture=True,
                  check=False, timeout=10)
        root_fs = res.stdout.decode().strip()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "nproc": os.cpu_count() or 0,
        "cpu": cpu,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "fs_under_test": root_fs,
    }


def tool_version(argv: Sequence[str], pick: Sequence[str] = ()) -> str:
    """The version lines of a tool: those containing one of `pick` (default: the first line)."""
    try:
        res = subprocess.run(list(argv), capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (res.stdout + res.stderr).decode(errors="replace").strip().splitlines()
    if pick:
        return ", ".join(ln.strip() for ln in lines if any(p in ln for p in pick))
    return lines[0] if lines else ""


# -- output ---------------------------------------------------------------------------------------

class Progress:
    """One progress line on stderr, rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text)

    def show(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        line = f"[{self.done:>4}/{self.total}] {elapsed:6.0f}s  {text}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            sys.stderr.write("\r" + line[:width - 1].ljust(width - 1))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1)
                             + "\r")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.3g}s"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: bool = True) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i == 0 or not right else c.rjust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory under `parent`, removed afterwards (unmount anything inside first)."""
    parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        rmtree(path)
