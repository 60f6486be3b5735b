"""Directories that merge no lower one (made through the union, or opaque): a name there is
resolved by the upper branch alone, so no `.wh.NAME` beside a non-directory is looked for (it could
not hide anything); directories and merged parents still are. In-process, counting the probes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.spy import record_calls
from tests.unionfs.conftest import in_process_union
from unionfs import branch as branch_mod
from unionfs.union import Union


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    (tmp_path / "l" / "merged").mkdir(parents=True)
    (tmp_path / "l" / "merged" / "low").write_text("low")
    os.umask(0o022)
    with in_process_union(tmp_path, [tmp_path / "l"]) as u:
        yield u


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    return record_calls(monkeypatch, branch_mod, "_exists")  # (dirfd, name): the names


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


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The names `Union._resolve` is asked to classify from now on."""
    seen: list[bytes] = []
    real = Union._resolve

    def spy(self: Union, parent: object, name: bytes) -> object:
        seen.append(name)
        return real(self, parent, name)  # type: ignore[arg-type]

    monkeypatch.setattr(Union, "_resolve", spy)
    return seen


def test_readdirplus_knows_upper_only_entries_without_resolving(
        union: Union, tmp_path: Path, resolved: list[bytes]) -> None:
    d, _ = union.mkdir(1, b"new", 0o755)
    for n in (b"a", b"b", b"gone"):
        fh, _, _ = union.create(d.ino, n, 0o644, os.O_WRONLY)
        union.release(fh)
    union.mkdir(d.ino, b"sub", 0o755)
    union._changed(d)
    listing = union.readdir(d.ino)
    os.unlink(tmp_path / "u" / "new" / "gone")  # behind the union's back, after the listing
    resolved.clear()
    got = {}
    for e in listing.entries:
        try:
            node, st = union.lookup_listed(d, e)
        except FileNotFoundError:
            got[e.name] = None
            continue
        got[e.name] = (node.ino, st.st_ino, node.is_dir, node.nlookup)
    assert sorted(resolved) == [b"gone", b"sub"]  # the vanished name and the directory only
    assert got[b"gone"] is None
    for n in (b"a", b"b"):
        ino, st_ino, is_dir, nlookup = got[n]  # type: ignore[misc]
        assert not is_dir and nlookup == 2  # create's reference and this one
        assert st_ino == (tmp_path / "u" / "new" / n.decode()).stat().st_ino
        assert union.lookup(d.ino, n)[0].ino == ino  # the same node as a plain lookup
    assert got[b"sub"] is not None and got[b"sub"][2]


def test_readdirplus_takes_lower_files_of_merged_directories_from_the_listing(
        union: Union, tmp_path: Path, resolved: list[bytes]) -> None:
    """In a merged directory, a non-directory a lower branch supplies is not resolved again: the
    merged listing chose its branch. Upper names there (a `.wh.NAME` could matter), directories
    and hard links (a copied-up link may have to be linked) still are."""
    low = tmp_path / "l" / "merged"
    (low / "sub").mkdir()
    (low / "hl").write_text("x")
    os.link(low / "hl", low / "hl2")
    m, _ = union.lookup(1, b"merged")
    fh, _, _ = union.create(m.ino, b"up", 0o644, os.O_WRONLY)
    union.release(fh)
    union.copy_up(union.lookup(m.ino, b"hl")[0])  # its other name is now to be linked
    union._changed(m)
    listing = union.readdir(m.ino)
    resolved.clear()
    got = {e.name: union.lookup_listed(m, e) for e in listing.entries}
    assert set(resolved) == {b"hl", b"hl2", b"sub", b"up"}  # (hl2 twice: resolved, linked)
    up = tmp_path / "u" / "merged"
    assert (up / "hl2").stat().st_ino == (up / "hl").stat().st_ino  # linked to hl's copy
    node, st = got[b"low"]
    assert not node.is_dir and node.nlookup == 1
    assert st.st_ino == (low / "low").stat().st_ino
    assert union.lookup(m.ino, b"low")[0] is node  # the same node as a plain lookup
    assert node.nlookup == 2
