"""The lower cache (`unionfs/lowercache.py`) and the holder maps of deep directories
(`Union._holding_layers`): a mount that reads its layers' directories from what an earlier mount
learnt must answer exactly what probing answers, without reading those directories again; a
layer changed between the mounts is read afresh; files that are not ours, not for this layer or
garbage are ignored; what two mounts learn is merged; the command line's `lowercache=`; and, on
a real mount, a cold lookup in a deep stack whose layers were learnt reads no directory of the
layers that do not hold the name (strace)."""

from __future__ import annotations

import json
import marshal
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.util import catches_signal
from tests.differential.settings import diff_settings, stack_strategy
from tests.helpers.layers import PATH_POOL, Stack, materialise, to_oci, wide_layers
from tests.helpers.mounts import Mount, mounted
from tests.helpers.spy import record_calls
from tests.unionfs.test_layerindex import _Probes as _Reads
from tests.unionfs.test_layerindex import _traced_lookup, _view
from unionfs import cli, lowercache, lowercheck
from unionfs import sys_linux as sl
from unionfs import union as union_mod
from unionfs.branch import Branch
from unionfs.config import Config
from unionfs.union import Union

ROOT = os.geteuid() == 0


def _union(lowers: list[Path], cache: Path | None, upper: Path | None = None,
           work: Path | None = None) -> Union:
    return Union(Config(lowers=tuple(map(str, lowers)), mountpoint="/nonexistent",
                        upper=str(upper) if upper else None, work=str(work) if work else None,
                        lowercache=str(cache) if cache else None))


def _xwhiteout_dir(path: str, rel: bytes) -> bool:
    """Whether the directory may hold xattr whiteouts (opaque=x): never cached."""
    p = os.path.join(path, os.fsdecode(rel))
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(p, name) == b"x":
                return True
        except OSError:
            pass
    return False


def _view_of(lowers: list[Path], upper: Path, work: Path, cache: Path | None,
             paths: list[bytes], ahead: bool = False) -> dict[bytes, object]:
    """AHEAD: the cache's records checked by a helper first (`Union.check_ahead`)."""
    u = _union(lowers, cache, upper, work)
    try:
        if ahead:
            u.check_ahead()
            if u.ahead is None:  # (only when no layer has a record to check)
                assert not any(c.ahead_work() for c in u.lcaches)
            deadline = time.monotonic() + 20
            while u.ahead is not None and not u.ahead.done:
                assert time.monotonic() < deadline, "the helper did not finish"
                time.sleep(0.002)
        return _view(u, paths)
    finally:
        u.close()


def _compare(stack: Stack, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = materialise(stack, root / "layers")
    cache = root / "cache"
    paths = [p.encode() for p in PATH_POOL if p] + [b"missing", b"a/missing"]
    with monkeypatch.context() as m:
        m.setattr(union_mod, "HOLDERS_MIN_LAYERS", 1 << 30)  # every layer probed
        want = _view_of(dirs.lowers, dirs.upper, dirs.work, None, paths)
    # every directory resolved through its holder map, learning, then from the cache
    monkeypatch.setattr(union_mod, "HOLDERS_MIN_LAYERS", 1)
    learnt = _view_of(dirs.lowers, dirs.upper, dirs.work, cache, paths)
    files = list(cache.iterdir())
    assert len(files) == len(dirs.lowers), files
    with monkeypatch.context() as m:
        reads = _Reads(m)
        seen = _ByName(m)
        cached = _view_of(dirs.lowers, dirs.upper, dirs.work, cache, paths)
    with monkeypatch.context() as m:  # the records checked ahead by a helper (lowercheck)
        m.setattr(lowercheck, "MIN_LAYERS", 1)
        m.setattr(lowercheck, "MIN_RECORDS", 1)
        ahead = _view_of(dirs.lowers, dirs.upper, dirs.work, cache, paths, ahead=True)
    for p in paths:
        assert learnt[p] == want[p], f"{p!r}: learning {learnt[p]}, probing {want[p]}"
        assert cached[p] == want[p], f"{p!r}: from the cache {cached[p]}, probing {want[p]}"
        assert ahead[p] == want[p], f"{p!r}: checked ahead {ahead[p]}, probing {want[p]}"
    assert reads.infos == [], f"opaque/redirect read again: {reads.infos}"
    again = [r for r in reads.scans if not _xwhiteout_dir(*r)]
    assert again == [], f"lower directories read again despite the cache: {again}"
    # lower files the first mount stat'ed are stat'ed through their handles (outside the
    # uncached directories), and with the same attributes (in the views)
    named = [rel for rel in seen.named
             if not any(_xwhiteout_dir(str(p), rel.rpartition(b"/")[0]) for p in dirs.lowers)]
    assert named == [], f"stat'ed by name again despite a kept handle: {named}"


@pytest.mark.skipif(not ROOT, reason="trusted.* xattrs and mknod need root (and file handles)")
@diff_settings(40)
@given(stack=stack_strategy(), oci=st.booleans())
def test_cached_and_holder_answers_are_what_probing_answers(stack: Stack, oci: bool) -> None:
    """OCI: whiteouts as `.wh.` files, which a listing keeps as the names it hides."""
    root = Path(tempfile.mkdtemp(prefix="unionfs-lcache-"))
    mp = pytest.MonkeyPatch()
    try:
        _compare(to_oci(stack) if oci else stack, root, mp)
    finally:
        mp.undo()
        shutil.rmtree(root, ignore_errors=True)


def test_a_directory_looked_up_again_keeps_its_holder_map(scratch: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel looks a directory up again (readdirplus of its parent, a dropped dentry): its
    node keeps the layers tuple its holder map is keyed by, so the map is not made again from
    every layer's listing."""
    lowers = _mkstack(scratch, union_mod.HOLDERS_MIN_LAYERS + 2)
    u = _union(lowers, None)
    try:
        d, _ = u.lookup(1, b"d")
        u.lookup(d.ino, b"only0")
        kept = d.lowers
        assert u._lower_map(d).holders is not None
        assert u.lookup(1, b"d")[0] is d
        assert d.lowers is kept
        probed = record_calls(monkeypatch, Branch, "entry", 0)  # (branch, rel, name)
        assert u.lookup(d.ino, b"only1")[1].st_size == 1
        assert [b.index for b in probed] == [1], probed  # the layer holding only1 only
    finally:
        u.close()


def test_holder_maps_from_the_cache_keep_the_names_whiteout_files_hide(scratch: Path) -> None:
    """A deep directory's holder map is made from the names the cache recorded, without
    decoding its listings (`LayerCache.names`): a `.wh.NAME` file (OCI) of an upper layer is
    recorded as a name it hides, and the map must send the lookup of NAME to that layer too,
    else the copy below would show through."""
    n = union_mod.HOLDERS_MIN_LAYERS + 1
    lowers = _mkstack(scratch, n)
    (lowers[0] / "d" / ".wh.only3").write_text("")  # OCI whiteout of layer 3's file
    cache = scratch / "cache"
    for mount in ("learning", "from the cache"):
        u = _union(lowers, cache)
        try:
            d, _ = u.lookup(1, b"d")
            assert len(d.lowers) == n
            with pytest.raises(FileNotFoundError):
                u.lookup(d.ino, b"only3")
            assert u.lookup(d.ino, b"only2")[1].st_size == 1
            hits = sum(c.hits for c in u.lcaches)
            assert (hits > 0) == (mount == "from the cache"), (mount, hits)
        finally:
            u.close()


def _mkstack(root: Path, n: int) -> list[Path]:
    lowers = [root / f"l{i}" for i in range(n)]
    for i, p in enumerate(lowers):
        (p / "d" / "sub").mkdir(parents=True)
        (p / "d" / f"only{i}").write_text(str(i))
    return lowers


PATHS = [b"d", b"d/sub", b"d/only0", b"d/only1", b"d/only2", b"d/new", b"d/sub/x", b"e",
         b"e/f", b"d/missing"]


def _records(f: Path) -> tuple[str, dict[bytes, Any]]:
    """The layer path a cache file is for, and its records unpacked."""
    data = marshal.loads(f.read_bytes())
    return data[2][0], {rel: marshal.loads(blob) for rel, blob in data[3].items()}


def _stale_paths(cache: Path) -> dict[str, dict[bytes, tuple[int, int, int]]]:
    out = {}
    for f in cache.iterdir():
        layer, records = _records(f)
        out[layer] = {rel: d[:3] for rel, d in records.items()}
    return out


@pytest.mark.parametrize("change", ["add", "whiteout", "opaque-marker", "opaque-xattr",
                                    "replace-dir", "remove-dir", "root"])
def test_layer_changed_between_mounts_is_read_afresh(scratch: Path, change: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lowers = _mkstack(scratch, 3)
    (lowers[2] / "d" / "sub" / "x").write_text("x")
    cache = scratch / "cache"
    _view_of_ro = lambda c: _view_ro(lowers, c)  # noqa: E731
    before = _view_of_ro(cache)
    assert _view_of_ro(cache) == before  # from the cache: the same
    time.sleep(0.01)  # (a new mtime even on coarse clocks)
    top, mid = lowers[0], lowers[1]
    if change == "add":
        (mid / "d" / "new").write_text("n")
    elif change == "whiteout":
        (top / "d" / ".wh.only2").touch()
    elif change == "opaque-marker":
        (mid / "d" / "sub" / ".wh..wh..opq").touch()
    elif change == "opaque-xattr":
        os.setxattr(mid / "d" / "sub", "user.overlay.opaque", b"y")
    elif change == "replace-dir":
        os.rename(top / "d", scratch / "old-d")
        (top / "d").mkdir()
        (top / "d" / "new").write_text("n")
    elif change == "remove-dir":
        shutil.rmtree(mid / "d")
    elif change == "root":
        (mid / "e").mkdir()
        (mid / "e" / "f").touch()
    fresh = _view_ro(lowers, None)
    assert fresh != before, "the change must show (else the test proves nothing)"
    with monkeypatch.context() as m:
        reads = _Reads(m)
        got = _view_of_ro(cache)
    assert got == fresh
    assert reads.scans or reads.infos, "a changed directory must be read again"
    # the stale records were replaced: a third mount reads nothing and answers the same
    with monkeypatch.context() as m:
        reads = _Reads(m)
        assert _view_of_ro(cache) == fresh
    assert reads.scans == [] and reads.infos == []


def _view_ro(lowers: list[Path], cache: Path | None, paths: list[bytes] = PATHS
             ) -> dict[bytes, object]:
    u = _union(lowers, cache)
    try:
        return _view(u, paths)
    finally:
        u.close()


def _handles(cache: Path) -> dict[str, dict[bytes, dict[bytes, bytes]]]:
    """The file handles each layer's cache file keeps, per directory."""
    out = {}
    for f in cache.glob("*.layer"):
        layer, records = _records(f)
        out[layer] = {rel: d[5] for rel, d in records.items() if d[5]}
    return out


class _ByName:
    """Counts the lower non-directories stat'ed by name (each then offered to the cache's
    `learn_handle`) and those stat'ed through a kept handle."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.named: list[bytes] = []
        self.handled: list[bytes] = []
        learn, by_handle = lowercache.LayerCache.learn_handle, lowercache.LayerCache.stat_by_handle

        def counted_learn(c: lowercache.LayerCache, rel: bytes, *a):  # type: ignore[no-untyped-def]
            self.named.append(rel)
            return learn(c, rel, *a)

        def counted_stat(c: lowercache.LayerCache, rel: bytes):  # type: ignore[no-untyped-def]
            st = by_handle(c, rel)
            if st is not None:
                self.handled.append(rel)
            return st

        monkeypatch.setattr(lowercache.LayerCache, "learn_handle", counted_learn)
        monkeypatch.setattr(lowercache.LayerCache, "stat_by_handle", counted_stat)


HANDLES = pytest.mark.skipif(not ROOT, reason="opening by file handle needs CAP_DAC_READ_SEARCH")


@HANDLES
def test_lower_files_are_stat_ed_through_kept_handles_with_live_attributes(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second mount stats the lower files it learnt through their handles, never by name,
    and gets what lstat gets now: a file changed in place (mode, size, times, links) between
    mounts shows its new attributes."""
    lowers = _mkstack(scratch, 3)
    cache = scratch / "cache"
    files = [b"d/only0", b"d/only1", b"d/only2"]
    want = _view_ro(lowers, None)
    assert _view_ro(lowers, cache) == want  # learns listings and handles
    kept = _handles(cache)
    for i, p in enumerate(lowers):
        assert set(kept[str(p)]) == {b"d"}, kept  # directories' own handles are never kept
        assert set(kept[str(p)][b"d"]) == {f"only{i}".encode()}
    with monkeypatch.context() as m:
        seen = _ByName(m)
        assert _view_ro(lowers, cache) == want
    assert sorted(seen.handled) == files and seen.named == []
    # changed in place: no directory changes, the attributes do
    time.sleep(0.01)
    (lowers[1] / "d" / "only1").chmod(0o600)
    with open(lowers[2] / "d" / "only2", "a") as f:
        f.write("more")
    os.link(lowers[0] / "d" / "only0", scratch / "another-name")
    fresh = _view_ro(lowers, None)
    assert fresh != want, "the change must show (else the test proves nothing)"
    with monkeypatch.context() as m:
        seen = _ByName(m)
        assert _view_ro(lowers, cache) == fresh
    assert sorted(seen.handled) == files and seen.named == []


@HANDLES
def test_a_stale_handle_falls_back_to_the_name_and_is_replaced(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    want = _view_ro(lowers, None)
    assert _view_ro(lowers, cache) == want
    # the handle of a file removed since, in place of only0's
    (scratch / "gone").touch()
    fd = os.open(scratch, os.O_PATH)
    try:
        gone = sl.name_to_handle_at(fd, b"gone")[0]
    finally:
        os.close(fd)
    (scratch / "gone").unlink()
    (f,) = [f for f in cache.glob("*.layer") if marshal.loads(f.read_bytes())[2][0] ==
            str(lowers[0])]
    data = marshal.loads(f.read_bytes())
    record = marshal.loads(data[3][b"d"])
    good = record[5][b"only0"]
    record[5][b"only0"] = gone
    data[3][b"d"] = marshal.dumps(record)
    f.write_bytes(lowercache.seal(marshal.dumps(data)))
    with monkeypatch.context() as m:
        seen = _ByName(m)
        assert _view_ro(lowers, cache) == want
    assert seen.named == [b"d/only0"] and seen.handled == [b"d/only1"]
    assert _handles(cache)[str(lowers[0])][b"d"][b"only0"] == good  # learnt again
    with monkeypatch.context() as m:
        seen = _ByName(m)
        assert _view_ro(lowers, cache) == want
    assert seen.named == [] and sorted(seen.handled) == [b"d/only0", b"d/only1"]


def test_where_handles_cannot_be_opened_nothing_is_loaded_or_kept_for_them(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that may not open by handle (as rootless ones find out at their first try,
    tested in a user namespace below) neither loads nor checks a record to look for a handle,
    and keeps none."""
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    want = _view_ro(lowers, None)
    for _ in range(2):  # learning, then from the cache
        u = _union(lowers, cache)
        try:
            for c in u.lcaches:
                c._opener = False
            with monkeypatch.context() as m:
                records = record_calls(m, lowercache.LayerCache, "_record")
                assert all(c.stat_by_handle(b"d/only0") is None for c in u.lcaches)
            assert records == []
            assert _view(u, PATHS) == want
        finally:
            u.close()
        assert _handles(cache) == {str(p): {} for p in lowers}


@HANDLES
def test_handles_two_mounts_learn_are_merged(scratch: Path) -> None:
    """Two mounts of the same layers stat different files of one directory: the cache file
    keeps both handles, whichever mount writes last."""
    lowers = _mkstack(scratch, 2)
    (lowers[0] / "d" / "x").write_text("x")
    (lowers[0] / "d" / "y").write_text("y")
    cache = scratch / "cache"
    _view_ro(lowers, cache, [b"d"])  # the records, without any file's handle
    a, b = _union(lowers, cache), _union(lowers, cache)
    try:
        _view(a, [b"d/x"])
        _view(b, [b"d/y"])
    finally:
        a.close()
        b.close()
    assert set(_handles(cache)[str(lowers[0])][b"d"]) == {b"x", b"y"}


@HANDLES
@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount(8)")
def test_no_handle_is_kept_for_what_is_mounted_over_a_layer_file(scratch: Path) -> None:
    """A handle found on another mount than the layer's (a file bind-mounted over one of its
    names) would be opened on the wrong file system: it is not kept."""
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    other = Path(tempfile.mkdtemp(prefix="unionfs-bind-", dir="/dev/shm"))
    try:
        (other / "f").write_text("from elsewhere")
        target = lowers[0] / "d" / "only0"
        subprocess.run(["mount", "--bind", str(other / "f"), str(target)], check=True,
                       timeout=30)
        try:
            _view_ro(lowers, cache)
        finally:
            subprocess.run(["umount", "-l", str(target)], check=True, timeout=30)
    finally:
        shutil.rmtree(other, ignore_errors=True)
    kept = _handles(cache)
    assert b"d" not in kept.get(str(lowers[0]), {}), kept
    assert set(kept[str(lowers[1])][b"d"]) == {b"only1"}  # (the control)


def test_untrusted_foreign_and_garbage_files_are_ignored(scratch: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    want = _view_ro(lowers, None)
    assert _view_ro(lowers, cache) == want
    files = sorted(cache.iterdir())
    assert len(files) == 2
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    def reads_with(prepare) -> _Reads:  # type: ignore[no-untyped-def]
        prepare()
        with monkeypatch.context() as m:
            r = _Reads(m)
            assert _view_ro(lowers, cache) == want
        return r

    assert reads_with(lambda: None).scans == []  # the control: used as it is
    # writable by others: not trusted (and rewritten by this mount)
    assert reads_with(lambda: files[0].chmod(0o666)).scans != []
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert reads_with(lambda: None).scans == []
    # garbage, truncated, one byte changed (the checksum), no checksum; sealed: another
    # version, another layer's file under this name, a record not packed, a packed record of
    # another shape, one that is not a marshal
    good = files[0].read_bytes()
    data = marshal.loads(good)
    record = marshal.loads(data[3][b"d"])
    # (a name changed in place: the file still unmarshals, and says d/ holds only9)
    at = good.index(b"only") + 4
    flipped = bytearray(good)
    flipped[at] = ord("9")
    sealed = lowercache.seal
    for bad in (b"garbage", good[: len(good) // 2], bytes(flipped), good[:-4],
                sealed(marshal.dumps((data[0], data[1] + 1, *data[2:]))),
                sealed(marshal.dumps((data[0], data[1], (data[2][0], data[2][1],
                                                         data[2][2] + 1), data[3]))),
                sealed(marshal.dumps((*data[:3], {b"d": (1, 2, 3, ("bad",), None)}))),
                sealed(marshal.dumps((*data[:3], {**data[3], b"d": marshal.dumps(record[:5])}))),
                sealed(marshal.dumps((*data[:3], {**data[3], b"d": b"\xffgarbage"})))):
        r = reads_with(lambda bad=bad: files[0].write_bytes(bad))
        assert r.scans != [], bad[:40]
    if ROOT:  # not our file (owned by someone else)
        os.chown(files[1], 12345, 12345)
        assert reads_with(lambda: None).scans != []


def test_a_new_cache_directory_is_private_and_its_new_parents_writable_by_no_one_else(
        scratch: Path) -> None:
    """The server runs with umask 0: the directories it makes for the cache are 0700 (the
    cache) and 0755 (its missing parents, e.g. /var/cache/unionfs), never 0777."""
    lowers = _mkstack(scratch, 1)
    cache = scratch / "a" / "b" / "layers"
    old = os.umask(0)
    try:
        _view_ro(lowers, cache)  # (written at unmount)
    finally:
        os.umask(old)
    assert list(cache.glob("*.layer"))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE((scratch / "a" / "b").stat().st_mode) == 0o755
    assert stat.S_IMODE((scratch / "a").stat().st_mode) == 0o755


def test_an_unwritable_cache_directory_costs_nothing_but_the_cache(scratch: Path) -> None:
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    cache.write_text("not a directory")
    assert _view_ro(lowers, cache) == _view_ro(lowers, None)
    assert cache.read_text() == "not a directory"


def test_what_two_mounts_learn_is_merged(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lowers = _mkstack(scratch, 3)
    (lowers[0] / "e").mkdir()
    cache = scratch / "cache"
    a = _union(lowers, cache)
    b = _union(lowers, cache)
    try:
        _view(a, [b"d/only0"])  # learns / and d
        _view(b, [b"e/x"])  # learns / and e
    finally:
        a.close()
        b.close()
    learnt = _stale_paths(cache)
    assert set(learnt[str(lowers[0])]) >= {b"", b"d", b"e"}, learnt
    both = [b"d/only0", b"e/x"]
    want = _view_ro(lowers, None, both)
    with monkeypatch.context() as m:
        reads = _Reads(m)
        u = _union(lowers, cache)
        try:
            assert _view(u, both) == want
        finally:
            u.close()
    assert reads.scans == [] and reads.infos == [], (reads.scans, reads.infos)


def test_shrink_writes_what_was_learnt_and_forgets_it(scratch: Path) -> None:
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    u = _union(lowers, cache)
    try:
        first = _view(u, PATHS)
        assert not list(cache.glob("*.layer"))
        u.shrink()
        assert len(list(cache.glob("*.layer"))) == 2
        assert all(not c.dirty and c._loaded is None for c in u.lcaches)
        assert _view(u, PATHS) == first
        assert sum(c.hits for c in u.lcaches) > 0  # read back from the file
    finally:
        u.close()


def test_the_first_load_asks_for_every_layer_file_at_once(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load of a layer's file (at mount: the root merges every layer) advises the
    kernel to read every layer's (one batch for the disk), once per mount; the files are still
    read one at a time, each checked."""
    lowers = _mkstack(scratch, 3)
    cache = scratch / "cache"
    want = _view_ro(lowers, cache)  # learns, writes the files
    advised = record_calls(monkeypatch, lowercache.os, "posix_fadvise", arg=3)
    read = record_calls(monkeypatch, lowercache, "_read", arg=0)
    u = _union(lowers, cache)
    try:
        assert advised == [os.POSIX_FADV_WILLNEED] * 3
        assert _view(u, PATHS) == want
        assert sorted(read) == sorted(c.path for c in u.lcaches)
        u.shrink()  # written and forgotten: read again, not advised again
        assert _view(u, PATHS) == want
        assert len(advised) == 3 and len(read) == 6
    finally:
        u.close()
    os.unlink(u.lcaches[1].path)  # a layer without a file yet: the others are advised
    advised.clear()
    assert _view_ro(lowers, cache) == want
    assert advised == [os.POSIX_FADV_WILLNEED] * 2


def test_no_cache_with_a_lower_index_or_when_off(scratch: Path) -> None:
    from unionfs import layerindex
    lowers = _mkstack(scratch, 2)
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    cache = scratch / "cache"
    u = Union(Config(lowers=tuple(map(str, lowers)), mountpoint="/x", lowerindex=str(index),
                     lowercache=str(cache)))
    try:
        _view(u, PATHS)
        assert u.lcaches == []
    finally:
        u.close()
    assert not cache.exists()


def test_command_line(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lower = scratch / "l"
    mnt = scratch / "m"
    lower.mkdir()
    mnt.mkdir()

    def config(*opts: str) -> Config:
        settings = cli.parse_options([",".join([f"lowerdir={lower}", *opts])])
        return cli.check(settings, str(mnt), foreground=True, debug=False)

    monkeypatch.setenv("UNIONFS_LOWER_CACHE", str(scratch / "env"))
    assert config().lowercache == str(scratch / "env")
    assert config("lowercache=off").lowercache is None
    monkeypatch.chdir(scratch)
    assert config("lowercache=rel").lowercache == str(scratch / "rel")
    (scratch / "file").touch()
    with pytest.raises(cli.UsageError, match="not a directory"):
        config(f"lowercache={scratch / 'file'}")
    with pytest.raises(cli.UsageError, match="empty"):
        config("lowercache=")
    monkeypatch.setenv("UNIONFS_LOWER_CACHE", "")
    assert config().lowercache is None
    # its records checked ahead by a helper (lowercheck) or at first use
    assert config().lowercache_check == "ahead"
    assert config("lowercache_check=inline").lowercache_check == "inline"
    assert config("lowercache_check=ahead").lowercache_check == "ahead"
    with pytest.raises(cli.UsageError, match="lowercache_check: expected ahead or inline"):
        config("lowercache_check=later")


def test_default_directory(monkeypatch: pytest.MonkeyPatch, scratch: Path) -> None:
    monkeypatch.delenv("UNIONFS_LOWER_CACHE", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert lowercache.default_dir() == "/var/cache/unionfs/layers"  # (this machine's root)
    full, userns = scratch / "full", scratch / "userns"
    full.write_text("         0          0 4294967295\n")
    userns.write_text("         0       1000          1\n         1     100000      65536\n")
    assert lowercache.default_dir(str(full)) == "/var/cache/unionfs/layers"
    assert lowercache.default_dir(str(scratch / "absent")) == "/var/cache/unionfs/layers"
    # root of a user namespace (rootless podman runs its mount program so): the user's cache
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert lowercache.default_dir(str(userns)) == "/home/u/.cache/unionfs/layers"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x/cache")
    assert lowercache.default_dir() == "/x/cache/unionfs/layers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert lowercache.default_dir() == "/home/u/.cache/unionfs/layers"
    monkeypatch.delenv("HOME")
    assert lowercache.default_dir() is None


def test_a_mount_unpacks_only_the_records_it_uses(scratch: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each directory's record is packed on its own: a lookup decodes and checks the records
    of the directories on its way, not the whole file (which grows with the image)."""
    lowers = wide_layers(scratch, 2, 40)
    cache = scratch / "cache"
    paths = [b"d07/f0", b"d07/f1", b"d07/sub", b"d31/f1"]
    want = _view_ro(lowers, None, paths)
    assert _view_ro(lowers, cache, paths + [b"d%02d/sub" % d for d in range(40)]) != {}
    assert all(len(records) == 81 for _, records in map(_records, cache.iterdir()))
    unpacked = record_calls(monkeypatch, lowercache, "_unpack", arg=0)
    assert _view_ro(lowers, cache, paths) == want
    # per layer: the root, d07, d07/sub, d31 (nothing else of its 81 records)
    assert len(unpacked) == 2 * 4, len(unpacked)


@pytest.mark.skipif(shutil.which("strace") is None or not ROOT or not os.path.exists("/dev/fuse"),
                    reason="needs strace, root and /dev/fuse")
def test_cold_lookup_with_the_cache_reads_no_other_layer_directory(scratch: Path) -> None:
    """16 layers that all hold d/: after one mount learnt them, a cold lookup of a bottom-layer
    name (and of a missing one) reads no directory of the other layers (no getdents, no
    xattr): at most one lstat of each layer's d/ checks the cache."""
    n = 16
    lowers = [scratch / "layers" / f"l{i}" for i in range(n)]
    for i, p in enumerate(lowers):
        (p / "d").mkdir(parents=True)
        (p / "d" / f"only{i}").touch()
    (lowers[-1] / "d" / "bottom").write_text("x")
    others = [str(p) for p in lowers[:-1]]
    cache = scratch / "cache"
    opts = [f"lowercache={cache}"]

    def reads_of_others(trace: list[str]) -> list[str]:
        return [p for p in trace if any(p.startswith(o + "/") or p == o for o in others)]

    first = _traced_lookup(scratch, lowers, "d/bottom", opts)
    assert len({p for p in reads_of_others(first)}) >= n - 1, first  # the control
    assert len(list(cache.glob("*.layer"))) == n
    second = _traced_lookup_calls(scratch, lowers, "d/bottom", opts)
    bad = [c for c in second if reads_of_others([c[1]]) and c[0] not in ("fstat", "newfstatat",
                                                                         "openat2", "close")]
    assert bad == [], f"calls in other layers despite the cache: {bad}"
    assert any(c[0] in ("fstat", "newfstatat") and reads_of_others([c[1]]) for c in second), \
        "the cache is checked with an lstat per layer directory"


def _traced_lookup_calls(scratch: Path, lowers: list[Path], name: str, options: list[str]
                         ) -> list[tuple[str, str]]:
    """(system call, path) of every call on a path during one cold lookup of NAME."""
    import re
    _traced_lookup(scratch, lowers, name, options)
    text = (scratch / "strace.txt").read_text(errors="replace")
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:\d+\s+)?(\w+)\((.*)", line)
        if m:
            for p in re.findall(r"<(/[^>]*)>", m.group(2)) + re.findall(r'"(/[^"]*)"',
                                                                         m.group(2)):
                out.append((m.group(1), p))
    return out


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
def test_mounted_tree_same_from_the_cache(scratch: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    """Mounted twice over 6 layers (holder maps on), the second mount answering from the
    cache and stat'ing the lower files through their kept handles (its stats say so): both
    trees are the one kernel overlayfs shows."""
    stats = scratch / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    lowers = _mkstack(scratch, 6)
    (lowers[5] / "d" / "sub" / "deep").write_text("deep")
    os.mknod(lowers[1] / "d" / "only3", 0o600 | stat.S_IFCHR, 0)  # overlayfs' whiteout
    os.setxattr(lowers[2] / "d" / "sub", "trusted.overlay.opaque", b"y")
    (lowers[2] / "d" / "sub" / "mid").write_text("m")
    cache = scratch / "cache"
    mnt = scratch / "mnt"
    mnt.mkdir()

    def tree(root: Path) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for d in dirnames:
                out[os.path.join(rel, d)] = None
            for f in filenames:
                out[os.path.join(rel, f)] = Path(dirpath, f).read_text()
        return out

    with mounted("overlay", lowers, None, None, mnt, []):
        want = tree(mnt)
    assert "d/only3" not in want and "d/sub/deep" not in want and want["d/sub/mid"] == "m"
    hits, handled = [], []
    for _ in range(2):
        with mounted("unionfs", lowers, None, None, mnt, [f"lowercache={cache}"]) as m:
            assert tree(mnt) == want
            dump = _dump(m, stats)
            hits.append(dump["lowercache_hits"])
            handled.append(dump["lowercache_handle_stats"])
        assert len(list(cache.glob("*.layer"))) == 6
    assert hits[0] == 0 and hits[1] >= 12, hits  # / and d/ of every layer, at least
    # the files the first mount stat'ed, stat'ed through their handles by the second
    assert handled[0] == 0 and handled[1] >= len([v for v in want.values() if v]), handled


def _dump(m: Mount, path: Path) -> dict[str, Any]:
    """The server's stats (SIGUSR1 dump, see unionfs.mount)."""
    assert m.server is not None
    deadline = time.monotonic() + 10
    while not catches_signal(m.server.pid, signal.SIGUSR1):
        assert time.monotonic() < deadline, "server never installed its SIGUSR1 handler"
        time.sleep(0.02)
    path.unlink(missing_ok=True)
    os.kill(m.server.pid, signal.SIGUSR1)
    while True:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline, "no stats dump"
        time.sleep(0.02)


def test_files_of_layers_unused_for_a_month_are_pruned(scratch: Path) -> None:
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    _view_ro(lowers, cache)
    used, other = sorted(cache.glob("*.layer"))
    month = lowercache.UNUSED_DAYS * 86400
    old = time.time() - month - 3600
    gone = cache / ("0" * 40 + ".layer")  # a layer deleted long ago
    gone.write_bytes(b"x")
    tmp = cache / ("1" * 40 + ".layer.123.tmp")  # left by a killed writer
    tmp.write_bytes(b"x")
    fresh_tmp = cache / ("2" * 40 + ".layer.124.tmp")  # another mount writing now
    fresh_tmp.write_bytes(b"x")
    for f in (used, other, gone, tmp):
        os.utime(f, (old, old))
    # a mount that reads the layers' files marks them used (and writes nothing new) ...
    _view_ro(lowers, cache)
    assert used.stat().st_mtime > old + 3600 and other.stat().st_mtime > old + 3600
    assert gone.exists() and tmp.exists()  # (pruned only by a mount that wrote)
    # ... and one that learns something prunes what nobody used
    (lowers[0] / "new").mkdir()
    _view_ro(lowers, cache)
    assert sorted(cache.iterdir()) == sorted([used, other, fresh_tmp])
    # a month and more later, all of it goes
    assert lowercache.prune(str(cache), now=time.time() + month + 86400 * 2) == 3
    assert list(cache.iterdir()) == []


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse") or shutil.which("unshare") is None,
                    reason="needs root (to make the user namespace here), unshare and FUSE")
def test_root_of_a_user_namespace_keeps_the_cache_in_its_home(scratch: Path) -> None:
    """As rootless podman runs its mount program: uid 0 of a user namespace (mapped to one
    outside uid), HOME the user's. The cache goes to $HOME/.cache/unionfs/layers, without file
    handles (which only the real root may open)."""
    lowers = _mkstack(scratch, 2)
    home, mnt = scratch / "home", scratch / "mnt"
    home.mkdir()
    mnt.mkdir()
    lowerdir = ":".join(map(str, lowers))
    script = (f'unionfs_cmd="$1"; "$unionfs_cmd" -m unionfs -f -o lowerdir={lowerdir} {mnt} & '
              'pid=$!; trap "kill $pid 2>/dev/null" EXIT; i=0; '
              f'while ! mountpoint -q {mnt}; do sleep 0.05; i=$((i+1)); '
              '[ $i -gt 400 ] && exit 3; done; '
              f'cat {mnt}/d/only1 && umount {mnt} && wait $pid')
    env = {k: v for k, v in os.environ.items() if k not in ("UNIONFS_LOWER_CACHE",
                                                             "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    r = subprocess.run(["unshare", "-U", "-r", "-m", "--propagation", "private", "sh", "-c",
                        script, "sh", sys.executable], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1"
    files = list((home / ".cache" / "unionfs" / "layers").glob("*.layer"))
    assert len(files) == 2, files
    # the host's file system refuses open_by_handle_at to a user namespace's root: the mount
    # found out at its first try and kept no handle
    assert _handles(home / ".cache" / "unionfs" / "layers") == {str(p): {} for p in lowers}


# --- lowerindex=auto ---------------------------------------------------------------------------

def _auto(lowers: list[Path], cache: Path, check: str = "dirs") -> Union:
    return Union(Config(lowers=tuple(map(str, lowers)), mountpoint="/x", lowerindex="auto",
                        lowerindex_check=check, lowercache=str(cache)))


def test_auto_index_is_built_after_the_first_mount_and_used_by_the_next(
        scratch: Path) -> None:
    lowers = _mkstack(scratch, 3)
    (lowers[2] / "d" / "sub" / "x").write_text("x")
    cache = scratch / "cache"
    want = _view_ro(lowers, None)

    def mount_and_view(check: str = "dirs") -> tuple[bool, bool, dict[bytes, object]]:
        u = _auto(lowers, cache, check)
        try:
            return u.lindex is not None, bool(u.lcaches), _view(u, PATHS)
        finally:
            u.close()

    assert mount_and_view() == (False, True, want)  # none yet: the lower cache, then built
    indexes = list(cache.glob("*.index"))
    assert len(indexes) == 1
    assert mount_and_view() == (True, False, want)
    u = _auto(lowers, cache, "roots")
    try:
        assert u.lindex is not None and u.lindex.attrs  # attributes served under roots
        assert _view(u, PATHS) == want
    finally:
        u.close()
    # a layer changed: the index is stale, the mount goes on without it and rebuilds it
    time.sleep(0.01)
    (lowers[1] / "d" / "new").write_text("n")
    want = _view_ro(lowers, None)
    assert mount_and_view() == (False, True, want)
    assert mount_and_view() == (True, False, want)
    # another stack (other order) gets an index of its own
    lowers.reverse()
    u = _auto(lowers, cache)
    try:
        assert u.lindex is None
    finally:
        u.close()
    assert len(list(cache.glob("*.index"))) == 2
    # an index file others may write is not trusted: rebuilt
    lowers.reverse()
    indexes[0].chmod(0o666)
    assert mount_and_view()[0] is False
    assert stat.S_IMODE(indexes[0].stat().st_mode) & 0o022 == 0
    assert mount_and_view()[0] is True


def test_auto_index_command_line(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lower, mnt = scratch / "l", scratch / "m"
    lower.mkdir()
    mnt.mkdir()
    monkeypatch.setenv("UNIONFS_LOWER_CACHE", str(scratch / "c"))

    def config(*opts: str) -> Config:
        settings = cli.parse_options([",".join([f"lowerdir={lower}", *opts])])
        return cli.check(settings, str(mnt), foreground=True, debug=False)

    c = config("lowerindex=auto", "lowerindex_check=roots")
    assert (c.lowerindex, c.lowerindex_check, c.lowercache) == ("auto", "roots",
                                                                 str(scratch / "c"))
    with pytest.raises(cli.UsageError, match="lowerindex=auto keeps the index"):
        config("lowerindex=auto", "lowercache=off")


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
def test_mounted_auto_index(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the command line, as podman's mountopt would give it: the first mount runs
    without an index and leaves one; the second uses it (its stats say so), same tree."""
    stats = scratch / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    lowers = _mkstack(scratch, 5)
    (lowers[4] / "d" / "sub" / "deep").write_text("deep")
    cache = scratch / "cache"
    mnt = scratch / "mnt"
    mnt.mkdir()
    seen = []
    for _ in range(2):
        with mounted("unionfs", lowers, None, None, mnt,
                     [f"lowercache={cache}", "lowerindex=auto",
                      "lowerindex_check=roots"]) as m:
            tree = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
            assert (mnt / "d" / "sub" / "deep").read_text() == "deep"
            seen.append((_dump(m, stats)["lowerindex"], tree))
        assert len(list(cache.glob("*.index"))) == 1  # built after the unmount, before exit
    assert [s[0] for s in seen] == [False, True]
    assert seen[0][1] == seen[1][1]


def test_cache_command(scratch: Path) -> None:
    """`unionfs cache dir|list|prune|clear`, on a cache two mounts filled."""
    lowers = _mkstack(scratch, 2)
    cache = scratch / "cache"
    u = _auto(lowers, cache)
    u.close()  # builds the stack's index
    _view_ro(lowers, cache)
    opt = ["-o", f"lowercache={cache}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "unionfs", "cache", *args],
                              capture_output=True, text=True, timeout=60)

    r = run("dir", *opt)
    assert (r.returncode, r.stdout) == (0, f"{cache}\n")
    env_dir = run("dir")  # the suite's UNIONFS_LOWER_CACHE
    assert env_dir.stdout.strip() == os.environ["UNIONFS_LOWER_CACHE"]
    r = run("list", *opt)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 3, r.stdout
    assert sorted(line.split()[0] for line in lines) == ["index", "layer", "layer"]
    index_line = next(line for line in lines if line.startswith("index"))
    assert index_line.split()[-1] == ":".join(map(str, lowers))
    assert {line.split()[-1] for line in lines if line.startswith("layer")} == set(
        map(str, lowers))
    r = run("prune", *opt)
    assert r.returncode == 0 and r.stdout.startswith("removed 0 file(s)")
    old = time.time() - 40 * 86400
    os.utime(next(cache.glob("*.index")), (old, old))
    assert run("prune", *opt).stdout.startswith("removed 1 file(s)")
    assert run("prune", "--days", "0", *opt).stdout.startswith("removed 2 file(s)")
    _view_ro(lowers, cache)
    assert run("clear", *opt).stdout.startswith("removed 2 file(s)")
    assert list(cache.iterdir()) == []
    for bad in (["frob"], ["list", "--days", "3"], ["dir", "-o", "lowercache=off"],
                ["prune", "--days", "-1"]):
        r = run(*bad, *([] if "-o" in bad else opt))
        assert r.returncode in (1, 2) and r.stderr and not r.stdout, (bad, r)


def test_cache_file_names_are_sha256_as_before(tmp_path: Path) -> None:
    """The files are named by SHA-256 of the layer's key (CPython's own module, not hashlib, at
    start-up): the names must be what hashlib gives, so the files earlier mounts wrote are
    still found."""
    import hashlib

    layer = tmp_path / "l0"
    layer.mkdir()
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        key = lowercache.layer_key(str(layer), fd)
        name = os.path.basename(lowercache.LayerCache(str(tmp_path / "c"), str(layer), fd,
                                                      lambda rel: fd).path)
        index = os.path.basename(lowercache.index_path(str(tmp_path / "c"), [(str(layer), fd)]))
    finally:
        os.close(fd)
    assert name == hashlib.sha256(repr(key).encode()).hexdigest()[:40] + ".layer"
    assert index == hashlib.sha256(repr([key]).encode()).hexdigest()[:40] + ".index"
    for data in (b"", b"abc", bytes(range(256)) * 9):
        assert lowercache.sha256_hex(data) == hashlib.sha256(data).hexdigest()
