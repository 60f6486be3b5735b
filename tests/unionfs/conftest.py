"""Fixtures for mounted unionfs tests: a layer stack in tmp_path, mounted and torn down.

`Stack.mount()` mounts the stack with unionfs (or another kind) and, on the way out, unmounts and
fails the test if the server logged a handler bug (an exception other than OSError).
`in_process_union` gives the engine without a mount, for tests that call it directly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mounts import Mount, mounted
from unionfs.config import Config
from unionfs.union import Union


@contextlib.contextmanager
def in_process_union(tmp_path: Path, lowers: list[Path]) -> Iterator[Union]:
    """A `Union` over LOWERS (top first) with an empty upper and work directory in TMP_PATH,
    closed on the way out."""
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    u = Union(Config(lowers=tuple(map(str, lowers)), mountpoint=str(tmp_path),
                     upper=str(tmp_path / "u"), work=str(tmp_path / "w")))
    try:
        yield u
    finally:
        u.close()


class Stack:
    """Branch directories of one test: lowers l0 (top) .. lN, upper, work, mount point."""

    def __init__(self, root: Path, nlower: int = 2) -> None:
        self.root = root
        self.lowers = [root / f"l{i}" for i in range(nlower)]
        self.upper = root / "upper"
        self.work = root / "work"
        self.mnt = root / "mnt"
        for d in [*self.lowers, self.upper, self.work, self.mnt]:
            d.mkdir()

    @contextlib.contextmanager
    def mount(self, kind: str = "unionfs", upper: bool = True, options: tuple[str, ...] = (),
              lowers: list[Path] | None = None, mnt: Path | None = None) -> Iterator[Mount]:
        log = self.root / f"{kind}.log"
        with mounted(kind, lowers or self.lowers, self.upper if upper else None,
                     self.work if upper else None, mnt or self.mnt, options, log=log) as m:
            yield m
        assert "unionfs bug" not in m.server_log(), m.server_log()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory of its own outside pytest's tmp_path (short paths, and mounts below it are
    never followed by the removal)."""
    d = Path(tempfile.mkdtemp(prefix="unionfs-scratch-"))
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False, timeout=120)


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


def write(path: Path, data: bytes | str = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path
