"""Lower branches keep O_PATH fds of their recently used directories (`Branch.dir_fd`): opening a
lower file again costs no openat2 path walk, the cache is bounded (LOWER_DIRFDS shared by all
lower branches, at least LOWER_DIRFD_MIN each) and a shrink closes it. In-process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unionfs.conftest import in_process_union
from unionfs import sys_linux as sl
from unionfs.branch import LOWER_DIRFD_MIN, LOWER_DIRFDS
from unionfs.union import Union

NDIRS = 60


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    lowers = [tmp_path / f"l{i}" for i in range(3)]
    for p in lowers:
        p.mkdir()
    for d in range(NDIRS):
        (lowers[2] / f"d{d}").mkdir()
        (lowers[2] / f"d{d}" / "f").write_text(str(d))
    with in_process_union(tmp_path, lowers) as u:
        yield u


def _open_all(u: Union) -> None:
    for d in range(NDIRS):
        dn, _ = u.lookup(1, b"d%d" % d)
        fn, _ = u.lookup(dn.ino, b"f")
        fh = u.open(fn.ino, os.O_RDONLY)
        assert u.read(fh, 0, 10) == str(d).encode()
        u.release(fh)


def test_lower_directory_fds_are_shared_out_and_bounded(union: Union) -> None:
    bottom = union.branches[3]
    share = max(LOWER_DIRFD_MIN, LOWER_DIRFDS // 3)
    assert bottom.dirfd_max == share < NDIRS
    _open_all(union)
    assert len(bottom._dirfds) == share
    union.shrink()
    assert len(bottom._dirfds) == 0


def test_a_second_open_in_a_lower_directory_walks_no_path(
        union: Union, monkeypatch: pytest.MonkeyPatch) -> None:
    dn, _ = union.lookup(1, b"d0")
    fn, _ = union.lookup(dn.ino, b"f")
    union.release(union.open(fn.ino, os.O_RDONLY))
    walks: list[bytes] = []
    real = sl.openat2

    def spy(dirfd: int, path: bytes, *args: int) -> int:
        walks.append(path)
        return real(dirfd, path, *args)

    monkeypatch.setattr(sl, "openat2", spy)
    for _ in range(3):
        union.release(union.open(fn.ino, os.O_RDONLY))
    union.getattr(fn.ino)
    assert walks == []
