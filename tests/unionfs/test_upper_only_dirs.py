"""Directories that merge no lower one (made through the union, or opaque): a name there is
resolved by the upper branch alone, so no `.wh.NAME` beside a non-directory is looked for (it could
not hide anything); directories and merged parents still are. In-process, counting the probes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs import branch as branch_mod
from unionfs.config import Config
from unionfs.union import Union


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    for d in ("l", "u", "w"):
        (tmp_path / d).mkdir()
    (tmp_path / "l" / "merged").mkdir()
    (tmp_path / "l" / "merged" / "low").write_text("low")
    os.umask(0o022)
    u = Union(Config(lowers=(str(tmp_path / "l"),), mountpoint=str(tmp_path),
                     upper=str(tmp_path / "u"), work=str(tmp_path / "w")))
    try:
        yield u
    finally:
        u.close()


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    seen: list[bytes] = []
    real = branch_mod._exists

    def spy(dirfd: int, name: bytes) -> bool:
        seen.append(name)
        return real(dirfd, name)

    monkeypatch.setattr(branch_mod, "_exists", spy)
    return seen


def test_a_file_in_a_new_directory_is_found_without_a_whiteout_probe(
        union: Union, probes: list[bytes]) -> None:
    d, _ = union.mkdir(1, b"new", 0o755)
    fh, node, _ = union.create(d.ino, b"f", 0o644, os.O_WRONLY)
    union.release(fh)
    union._changed(d)  # forget what the create taught the directory
    probes.clear()
    found, _ = union.lookup(d.ino, b"f")
    assert found.ino == node.ino
    with pytest.raises(FileNotFoundError):
        union.lookup(d.ino, b"missing")
    union.unlink(d.ino, b"f")
    assert probes == []


def test_a_subdirectory_of_a_new_directory_is_still_probed(union: Union,
                                                           probes: list[bytes]) -> None:
    d, _ = union.mkdir(1, b"new", 0o755)
    union.mkdir(d.ino, b"sub", 0o755)
    union._changed(d)
    probes.clear()
    union.lookup(d.ino, b"sub")
    assert b".wh.sub" in probes


def test_names_in_a_merged_directory_are_probed(union: Union, probes: list[bytes]) -> None:
    m, _ = union.lookup(1, b"merged")
    fh, _, _ = union.create(m.ino, b"up", 0o644, os.O_WRONLY)
    union.release(fh)
    union._changed(m)
    probes.clear()
    union.lookup(m.ino, b"up")
    assert b".wh.up" in probes
