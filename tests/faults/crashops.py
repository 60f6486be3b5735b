"""File operations described as data, applied to a directory: the workload of the crash tests.

`apply(root, op)` performs one operation (a JSON-able list such as ``["rename", "a", "b"]``) below
ROOT with plain system calls. The same list of operations is applied in-process to a plain
directory (the model: its snapshot after each step is an acceptable state) and, by running this
file as a script, in a child process against a union mount that the test then crashes:

    python crashops.py ROOT OPS_JSON      # prints "start", then "done I" after each operation

`pattern(seed, size)` is the deterministic content written by "create" and "write". This module
imports nothing from the test suite, so it runs as a plain script.
"""

from __future__ import annotations

import json
import os
import sys

Op = list[object]


def pattern(seed: int, size: int) -> bytes:
    """SIZE bytes that identify SEED (8-byte little-endian seed repeated)."""
    unit = (seed & (2**64 - 1)).to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def _p(root: bytes, rel: object) -> bytes:
    assert isinstance(rel, str)
    return root + b"/" + os.fsencode(rel)


def _int(x: object) -> int:
    assert isinstance(x, int)
    return x


def apply(root: bytes, op: Op) -> None:
    kind = op[0]
    if kind == "open_w":  # open for writing: a copy-up, nothing else
        os.close(os.open(_p(root, op[1]), os.O_WRONLY))
    elif kind == "rename":
        os.rename(_p(root, op[1]), _p(root, op[2]))
    elif kind == "unlink":
        os.unlink(_p(root, op[1]))
    elif kind == "rmdir":
        os.rmdir(_p(root, op[1]))
    elif kind == "mkdir":
        os.mkdir(_p(root, op[1]), 0o755)
    elif kind == "create":  # ["create", path, seed, size]
        fd = os.open(_p(root, op[1]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, pattern(_int(op[2]), _int(op[3])))
        finally:
            os.close(fd)
    elif kind == "write":  # ["write", path, offset, seed, size]
        fd = os.open(_p(root, op[1]), os.O_WRONLY)
        try:
            os.pwrite(fd, pattern(_int(op[3]), _int(op[4])), _int(op[2]))
        finally:
            os.close(fd)
    elif kind == "symlink":  # ["symlink", target, path]
        assert isinstance(op[1], str)
        os.symlink(op[1], _p(root, op[2]))
    elif kind == "link":
        os.link(_p(root, op[1]), _p(root, op[2]))
    elif kind == "chmod":
        os.chmod(_p(root, op[1]), _int(op[2]))
    elif kind == "setxattr":
        assert isinstance(op[2], str) and isinstance(op[3], str)
        os.setxattr(_p(root, op[1]), op[2], op[3].encode())
    elif kind == "truncate":
        os.truncate(_p(root, op[1]), _int(op[2]))
    else:
        raise ValueError(f"unknown operation {op!r}")


def main(argv: list[str]) -> int:
    root = os.fsencode(argv[1])
    ops = json.loads(argv[2])
    print("start", flush=True)  # the clock of a random kill starts here, not at exec
    for i, op in enumerate(ops):
        apply(root, op)
        print(f"done {i}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
