"""The side-by-side workloads: what each one runs, how caches are prepared, what is checked.

Each workload is an external command run in a subprocess against the mount point (find, cat, dd,
tar, rm, chroot), so the time is spent in system calls, not in the harness. The few that need
a loop no shell tool offers (random 4 KiB reads, creating many small files) run a short
`python3 -I -S -c` snippet that times its own loop and prints the seconds, so interpreter start-up
is not counted. Every backend runs exactly the same command.

Cache states:
- "cold": fresh mount, then `echo 3 > /proc/sys/vm/drop_caches`, then the timed command;
- "warm": fresh mount, the same command once untimed, then the timed command;
- "none": fresh mount and the workload's own untimed setup (e.g. the lower file read once on the
  host for copy-up, so the copy measures the union and not the disk).
Before every timed command that is not cold, `sync` writes back whatever the setup or earlier
cells left dirty, so that work is not billed to the measurement.

Workloads that change the tree name the paths whose resulting state is compared across backends
(`check`), so a backend that is fast because it did not do the work is caught.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import BIG, COPYUP, Dataset

RANDREAD = """\
import os, sys, time, random
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // 4096
offs = [b * 4096 for b in random.Random(seed).sample(range(blocks), min(n, blocks))]
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
t = time.perf_counter()
for o in offs:
    if len(os.pread(fd, 4096, o)) != 4096:
        raise SystemExit("short read")
print(time.perf_counter() - t)
"""

CREATE = """\
import os, sys, time
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes(range(256)) * (size // 256 + 1)
t = time.perf_counter()
os.mkdir(d)
for i in range(n):
    if i % 100 == 0:
        sub = f"{d}/{i // 100:03d}"
        os.mkdir(sub)
    fd = os.open(f"{sub}/f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data[:size])
    os.close(fd)
print(time.perf_counter() - t)
"""

SMALL_FILE_SIZE = 1000
NEW_DIR = "bench-new"
WRITE_FILE = "bench-write.bin"
UNTAR_DIR = "bench-untar"


def py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", code, *(str(a) for a in args)]


def sh(script: str, *args: object) -> list[str]:
    return ["sh", "-c", script, "sh", *(str(a) for a in args)]


@dataclass(frozen=True)
class Ctx:
    mnt: Path
    dataset: Dataset


Argv = list[str]


@dataclass(frozen=True)
class Workload:
    name: str
    doc: str
    cmd: Callable[[Ctx], Argv]
    cache: str = "none"
    setup: Callable[[Ctx], list[Argv]] = field(default=lambda ctx: [])
    self_timed: bool = False
    check: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    writes: bool = False


def _find(ctx: Ctx) -> Argv:
    return ["find", str(ctx.mnt)]


def _stat(ctx: Ctx) -> Argv:
    return ["find", str(ctx.mnt), "-printf", "%m %s %U\n"]


def _read_usr(ctx: Ctx) -> Argv:
    return sh('find "$1/usr" -type f -print0 | xargs -0 -r cat > /dev/null', ctx.mnt)


def _seqread(ctx: Ctx) -> Argv:
    return ["dd", f"if={ctx.mnt / BIG}", "of=/dev/null", "bs=1M"]


def _randread(ctx: Ctx) -> Argv:
    return py(RANDREAD, ctx.mnt / BIG, ctx.dataset.scale.randreads, 42)


def _warm_big(ctx: Ctx) -> list[Argv]:
    return [["dd", f"if={ctx.mnt / BIG}", "of=/dev/null", "bs=1M"]]


def _seqwrite(ctx: Ctx) -> Argv:
    return ["dd", "if=/dev/zero", f"of={ctx.mnt / WRITE_FILE}", "bs=1M",
            f"count={ctx.dataset.scale.seqwrite >> 20}"]


def _copyup(ctx: Ctx) -> Argv:
    return sh('printf x >> "$1"', ctx.mnt / COPYUP)


def _copyup_setup(ctx: Ctx) -> list[Argv]:
    # the lower file in the page cache: copy-up then measures the union, not the disk
    return [["cat", str(ctx.dataset.lower_file(COPYUP))]]


def _create(ctx: Ctx) -> Argv:
    return py(CREATE, ctx.mnt / NEW_DIR, ctx.dataset.scale.create, SMALL_FILE_SIZE)


def _rm(ctx: Ctx) -> Argv:
    return ["rm", "-rf", str(ctx.mnt / NEW_DIR)]


def _rm_setup(ctx: Ctx) -> list[Argv]:
    return [_create(ctx)]


def _untar(ctx: Ctx) -> Argv:
    return ["tar", "xf", str(ctx.dataset.tarball), "-C", str(ctx.mnt / UNTAR_DIR)]


def _untar_setup(ctx: Ctx) -> list[Argv]:
    return [["mkdir", str(ctx.mnt / UNTAR_DIR)], ["cat", str(ctx.dataset.tarball)]]


def _chroot_sh(ctx: Ctx) -> Argv:
    return ["chroot", str(ctx.mnt), "/bin/sh", "-c", "true"]


def _chroot_py(ctx: Ctx) -> Argv:
    return ["chroot", str(ctx.mnt), "/usr/bin/python3", "-c", "import json"]


_SH = frozenset({"sh"})
_PY = frozenset({"python3"})
_USR = frozenset({"usr"})

WORKLOADS: tuple[Workload, ...] = (
    Workload("walk_cold", "find over the whole tree, caches dropped", _find, "cold"),
    Workload("walk_warm", "find over the whole tree, second run", _find, "warm"),
    Workload("stat_cold", "find -printf (lstat of every entry), caches dropped", _stat, "cold"),
    Workload("stat_warm", "find -printf (lstat of every entry), second run", _stat, "warm"),
    Workload("read_usr_cold", "cat every regular file under usr/, caches dropped", _read_usr,
             "cold", needs=_USR),
    Workload("read_usr_warm", "cat every regular file under usr/, second run", _read_usr, "warm",
             needs=_USR),
    Workload("seqread_cold", "dd bs=1M of the large lower file, caches dropped", _seqread,
             "cold"),
    Workload("seqread_warm", "dd bs=1M of the large lower file, second run", _seqread, "warm"),
    Workload("randread_hot", "random 4 KiB preads of the large file, file in the page cache",
             _randread, "none", setup=_warm_big, self_timed=True),
    Workload("randread_cold", "random 4 KiB preads (FADV_RANDOM) after dropping caches: every "
             "read reaches the file system", _randread, "cold", self_timed=True),
    Workload("seqwrite", "dd bs=1M from /dev/zero into a new file", _seqwrite,
             check=(WRITE_FILE,), writes=True),
    Workload("copyup", "append one byte to the lower copy-up file (lower data cached)",
             _copyup, setup=_copyup_setup, check=(COPYUP,), writes=True),
    Workload("create_files", "create N small files (1000 B) in directories of 100", _create,
             self_timed=True, check=(NEW_DIR,), writes=True),
    Workload("rm_files", "rm -rf of the N files just created", _rm, setup=_rm_setup,
             check=(NEW_DIR,), writes=True),
    Workload("untar", "tar xf of the generated archive into a new directory", _untar,
             setup=_untar_setup, check=(UNTAR_DIR,), writes=True),
    Workload("chroot_sh_cold", "chroot MNT /bin/sh -c true, caches dropped", _chroot_sh, "cold",
             needs=_SH),
    Workload("chroot_sh_warm", "chroot MNT /bin/sh -c true, second run", _chroot_sh, "warm",
             needs=_SH),
    Workload("chroot_python_cold", "chroot MNT python3 -c 'import json', caches dropped",
             _chroot_py, "cold", needs=_PY),
    Workload("chroot_python_warm", "chroot MNT python3 -c 'import json', second run",
             _chroot_py, "warm", needs=_PY),
)

BY_NAME = {w.name: w for w in WORKLOADS}


def select(spec: str | Sequence[str] | None, dataset: Dataset
           ) -> tuple[list[Workload], dict[str, str]]:
    """Workloads named in `spec` (comma-separated names or prefixes; all if None) that the
    dataset supports, and the reasons the others are skipped."""
    if spec is None or spec == "all":
        chosen = list(WORKLOADS)
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        chosen = []
        for item in (i.strip() for i in items):
            if not item:
                continue
            hits = [w for w in WORKLOADS if w.name == item or w.name.startswith(item + "_")
                    or (item.endswith("*") and w.name.startswith(item[:-1]))]
            if not hits:
                raise ValueError(f"unknown workload {item!r} "
                                 f"(known: {', '.join(w.name for w in WORKLOADS)})")
            chosen += [w for w in hits if w not in chosen]
    ok, skipped = [], {}
    for w in chosen:
        missing = w.needs - dataset.features
        if missing:
            skipped[w.name] = f"dataset {dataset.kind} has no {', '.join(sorted(missing))}"
        else:
            ok.append(w)
    return ok, skipped
