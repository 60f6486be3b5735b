"""One load worker: random file operations on a small pool of overlapping paths, for a while.

    python loadworker.py ROOT SEED SECONDS OUT_JSON

Run by test_load.py as N concurrent processes on the same mount. Every path comes from a fixed
pool (depth <= 2, a few names), so workers collide all the time: ENOENT, EEXIST, ENOTEMPTY and
the like are the expected results of races and are only counted. Symlink targets are bare names
(resolved in the link's own directory), so following one never leaves the mount.

The JSON result: {"ops": N, "results": {op: {"ok" | errno name: count}}, "eio": [...],
"unexpected": [...]} where "eio" lists the operations answered with EIO and "unexpected" those that
failed with an errno outside EXPECTED or with a non-OSError exception. Imports nothing from the
test suite, so it runs as a plain script.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable

NAMES = ("a", "b", "c", "d", "e")
SUBNAMES = ("a", "b", "c")
POOL = [n for n in NAMES] + [f"{n}/{s}" for n in NAMES for s in SUBNAMES]
DIRS = ["", *NAMES]

EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
            errno.EINVAL, errno.ELOOP, errno.EPERM, errno.EMLINK, errno.ENAMETOOLONG}


def _where() -> str:
    """The source line of the current exception's innermost frame (which call failed)."""
    tb = traceback.extract_tb(sys.exc_info()[2])
    return tb[-1].line or "?" if tb else "?"


class Worker:
    def __init__(self, root: str, seed: int) -> None:
        self.root = root
        self.r = random.Random(seed)
        self.results: dict[str, dict[str, int]] = {}
        self.eio: list[str] = []
        self.unexpected: list[str] = []
        self.ops = 0

    def p(self) -> str:
        return os.path.join(self.root, self.r.choice(POOL))

    def d(self) -> str:
        return os.path.join(self.root, self.r.choice(DIRS))

    def data(self) -> bytes:
        return self.r.randbytes(self.r.choice((0, 1, 100, 4096, 5000, 70_000)))

    # --- operations ---------------------------------------------------------------------
    def op_create(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | self.r.choice((0, os.O_EXCL, os.O_TRUNC))
        fd = os.open(self.p(), flags, 0o644)
        try:
            os.write(fd, self.data())
        finally:
            os.close(fd)

    def op_write(self) -> None:
        fd = os.open(self.p(), os.O_RDWR)
        try:
            os.pwrite(fd, self.data(), self.r.randrange(0, 80_000))
        finally:
            os.close(fd)

    def op_read(self) -> None:
        fd = os.open(self.p(), os.O_RDONLY)
        try:
            while os.read(fd, 65536):
                pass
        finally:
            os.close(fd)

    def op_append(self) -> None:
        fd = os.open(self.p(), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, self.data())
        finally:
            os.close(fd)

    def op_truncate(self) -> None:
        os.truncate(self.p(), self.r.randrange(0, 100_000))

    def op_rename(self) -> None:
        os.rename(self.p(), self.p())

    def op_unlink(self) -> None:
        os.unlink(self.p())

    def op_mkdir(self) -> None:
        os.mkdir(self.p(), 0o755)

    def op_rmdir(self) -> None:
        os.rmdir(self.p())

    def op_link(self) -> None:
        os.link(self.p(), self.p(), follow_symlinks=False)

    def op_symlink(self) -> None:
        os.symlink(self.r.choice(NAMES), self.p())

    def op_chmod(self) -> None:
        os.chmod(self.p(), self.r.choice((0o644, 0o600, 0o755, 0o700, 0o640)))

    def op_readdir(self) -> None:
        os.listdir(self.d())

    def op_stat(self) -> None:
        if self.r.random() < 0.5:
            os.lstat(self.p())
        else:
            os.stat(self.p())

    def run(self, seconds: float) -> None:
        ops: list[tuple[str, Callable[[], None], int]] = [
            ("create", self.op_create, 8), ("write", self.op_write, 8),
            ("read", self.op_read, 8), ("append", self.op_append, 4),
            ("truncate", self.op_truncate, 4), ("rename", self.op_rename, 8),
            ("unlink", self.op_unlink, 6), ("mkdir", self.op_mkdir, 5),
            ("rmdir", self.op_rmdir, 4), ("link", self.op_link, 3),
            ("symlink", self.op_symlink, 3), ("chmod", self.op_chmod, 3),
            ("readdir", self.op_readdir, 6), ("stat", self.op_stat, 8),
        ]
        names = [o[0] for o in ops]
        funcs = {o[0]: o[1] for o in ops}
        weights = [o[2] for o in ops]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name = self.r.choices(names, weights)[0]
            counts = self.results.setdefault(name, {})
            self.ops += 1
            try:
                funcs[name]()
                key = "ok"
            except OSError as e:
                key = errno.errorcode.get(e.errno or 0, str(e.errno))
                if e.errno == errno.EIO:
                    self.eio.append(f"{name}: {e!r} at {_where()}")
                elif e.errno not in EXPECTED:
                    self.unexpected.append(f"{name}: {e!r} at {_where()}")
            except Exception:
                key = "exception"
                self.unexpected.append(f"{name}: {traceback.format_exc()}")
            counts[key] = counts.get(key, 0) + 1


def main(argv: list[str]) -> int:
    root, seed, seconds, out = argv[1], int(argv[2]), float(argv[3]), argv[4]
    w = Worker(root, seed)
    w.run(seconds)
    with open(out, "w") as f:
        json.dump({"ops": w.ops, "results": w.results, "eio": w.eio[:50],
                   "unexpected": w.unexpected[:50]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
