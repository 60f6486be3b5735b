"""The lower index (`unionfs/layerindex.py`): built on generated stacks, it must give the engine
exactly the answers probing gives (both whiteout encodings, opaque directories, redirects),
without reading the lower directories it describes; mounted, the tree must be the one unionfs
shows without it and kernel overlayfs shows; a stale index is refused; and a cold lookup of a
bottom-layer name must make no system call in the other layers (strace)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.differential.harness import ORACLE_OPTIONS, compare_views, snapshot
from tests.differential.settings import diff_settings, require_environment, stack_strategy
from tests.helpers.layers import PATH_POOL, Stack, materialise, to_oci, wide_layers
from tests.helpers.mounts import mounted, unionfs_cmd, unmount
from unionfs import layerindex
from unionfs import sys_linux as sl
from unionfs import union as union_mod
from unionfs.branch import Branch
from unionfs.config import Config
from unionfs.core.resolve import Kind, lower_exists
from unionfs.inodes import ROOT_INO
from unionfs.union import Union

ROOT = os.geteuid() == 0


def _union(lowers: list[Path], upper: Path | None, work: Path | None,
           index: Path | None, check: str = "dirs") -> Union:
    return Union(Config(lowers=tuple(str(p) for p in lowers), mountpoint="/nonexistent",
                        upper=str(upper) if upper else None, work=str(work) if work else None,
                        lowerindex=str(index) if index else None, lowerindex_check=check))


def _attrs(st: os.stat_result) -> tuple[int, ...]:
    """An lstat's fields but the access time (which reading moves)."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
            st.st_rdev, st.st_mtime_ns, st.st_ctime_ns)


def _view(u: Union, paths: list[bytes]) -> dict[bytes, object]:
    """What the engine answers for every path: resolution, branch paths, whether a removal
    would need a whiteout, the attributes of the object in the top branch holding it, and the
    merged listing of directories."""
    out: dict[bytes, object] = {}
    for p in paths:
        found = u._walk(p)
        if found is None:
            out[p] = None
            continue
        parent, name, res, bpaths = found
        _res, entries, _ = u._resolve(parent, name)
        top = res.branches[0] if res.branches else None
        item: tuple[object, ...] = (res.kind, res.branches,
                                    {b: bpaths[b] for b in res.branches},
                                    lower_exists(entries),
                                    None if top is None else
                                    _attrs(u.branches[top].stat(bpaths[top])))
        if res.kind is Kind.DIR:
            node, _st = u._node_for(parent, name, res, bpaths, register=False)
            item += (node.lowers, [(m.name, m.branch, m.is_dir) for m in u.merged(node)])
        out[p] = item
    return out


class _Probes:
    """Counts the directory reads made in lower branches: listings (`scans`) and opaque/
    redirect probes (`infos`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scans: list[tuple[str, bytes]] = []
        self.infos: list[tuple[str, bytes]] = []
        scan, info = Branch._scan, Branch._read_dir_info

        def counted_scan(b: Branch, rel: bytes, *a):  # type: ignore[no-untyped-def]
            if not b.writable:
                self.scans.append((b.path, rel))
            return scan(b, rel, *a)

        def counted_info(b: Branch, rel: bytes, *a):  # type: ignore[no-untyped-def]
            if not b.writable:
                self.infos.append((b.path, rel))
            return info(b, rel, *a)

        monkeypatch.setattr(Branch, "_scan", counted_scan)
        monkeypatch.setattr(Branch, "_read_dir_info", counted_info)

    @property
    def reads(self) -> list[tuple[str, bytes]]:
        return self.scans + self.infos


def _compare_engine(stack: Stack, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = materialise(stack, root / "layers")
    index = root / "lower.idx"
    layerindex.write([str(p) for p in dirs.lowers], str(index))
    paths = [p.encode() for p in PATH_POOL] + [b"", b"missing", b"a/missing"]
    paths = [p for p in paths if p]
    plain = _union(dirs.lowers, dirs.upper, dirs.work, None)
    try:
        want = _view(plain, paths)
    finally:
        plain.close()
    with monkeypatch.context() as m:
        probes = _Probes(m)
        m.setattr(union_mod, "HOLDERS_MIN_LAYERS", 1)  # holder maps from the index's names too
        indexed = _union(dirs.lowers, dirs.upper, dirs.work, index)
        try:
            got = _view(indexed, paths)
        finally:
            indexed.close()
    for p in paths:
        assert got[p] == want[p], f"{p!r}: with the index {got[p]}, probing {want[p]}"
    assert probes.reads == [], f"lower directories read despite the index: {probes.reads}"


@pytest.mark.skipif(not ROOT, reason="trusted.* xattrs and mknod need root")
@diff_settings(40)
@given(stack=stack_strategy(), oci=st.booleans())
def test_index_answers_what_probing_answers(stack: Stack, oci: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="unionfs-lindex-"))
    mp = pytest.MonkeyPatch()
    try:
        _compare_engine(to_oci(stack) if oci else stack, root, mp)
    finally:
        mp.undo()
        shutil.rmtree(root, ignore_errors=True)


def _mkstack(root: Path, n: int) -> list[Path]:
    lowers = [root / f"l{i}" for i in range(n)]
    for p in lowers:
        (p / "d").mkdir(parents=True)
    return lowers


def test_index_records_whiteouts_opaque_and_redirects(scratch: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-made stack with every marker the resolver reads: .wh. files, .wh..wh..opq, a
    user.overlay.opaque directory, a 0/0 device (as root) and a directory moved with
    overlay.redirect (resolved by probing: the index leaves it out and must not be wrong)."""
    l0, l1, l2 = _mkstack(scratch, 3)
    (l2 / "d" / "bottom").write_text("b")
    (l2 / "d" / "hidden").write_text("h")
    (l1 / "d" / ".wh.hidden").touch()
    (l2 / "opq" / "old").mkdir(parents=True)
    (l1 / "opq").mkdir()
    (l1 / "opq" / ".wh..wh..opq").touch()
    (l1 / "opq" / "new").touch()
    (l2 / "xo").mkdir()
    (l2 / "xo" / "below").touch()
    (l0 / "xo").mkdir()
    os.setxattr(l0 / "xo", "user.overlay.opaque", b"y")
    (l2 / "from" / "sub").mkdir(parents=True)
    (l2 / "from" / "sub" / "f").write_text("f")
    (l0 / "to").mkdir()
    os.setxattr(l0 / "to", "user.overlay.redirect", b"/from")
    (l0 / ".wh.from").touch()
    if ROOT:
        (l1 / "d" / "gone").touch()
        os.mknod(l0 / "d" / "gone", 0o600 | 0o020000, 0)
    up, work = scratch / "u", scratch / "w"
    up.mkdir()
    work.mkdir()
    (up / "d").mkdir()
    (up / "d" / "upfile").touch()
    data = layerindex.build([str(p) for p in (l0, l1, l2)])
    index = scratch / "idx"
    index.write_bytes(data)
    # the moved directory is marked, and not descended into
    _, _, _, _, records, redirects, _ = __import__("marshal").loads(data)
    assert redirects == {(0, b"to"): b"/from"}
    assert all(layers[0][1] != b"to" for layers, _, _ in records)

    paths = [b"d", b"d/bottom", b"d/hidden", b"d/gone", b"d/upfile", b"opq", b"opq/old",
             b"opq/new", b"xo", b"xo/below", b"to", b"to/sub", b"to/sub/f", b"from", b"nothing"]
    plain = _union([l0, l1, l2], up, work, None)
    try:
        want = _view(plain, paths)
    finally:
        plain.close()
    indexed = _union([l0, l1, l2], up, work, index)
    try:
        got = _view(indexed, paths)
        indexed.shrink()  # drops what was derived from the index, not the index
        again = _view(indexed, paths)
    finally:
        indexed.close()
    assert got == want
    assert again == want

    def shown(p: bytes) -> bool:
        v = want[p]
        return isinstance(v, tuple) and v[0] is not Kind.MISSING

    assert shown(b"d/bottom") and not shown(b"d/hidden") and shown(b"d/upfile")
    assert not shown(b"opq/old") and shown(b"opq/new") and not shown(b"xo/below")
    assert shown(b"to/sub/f") and not shown(b"from")
    if ROOT:
        assert not shown(b"d/gone")


def test_stale_index_is_refused(scratch: Path) -> None:
    lowers = _mkstack(scratch, 3)
    (lowers[2] / "d" / "x").touch()
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    _union(lowers, None, None, index).close()  # fresh: accepted

    time.sleep(0.01)
    (lowers[2] / "d" / "late").touch()  # deep in the bottom layer
    with pytest.raises(layerindex.LowerIndexError, match=r"stale.*'d'"):
        _union(lowers, None, None, index)
    # only the roots compared: that change goes unnoticed (the documented trade-off) ...
    Union(Config(lowers=tuple(map(str, lowers)), mountpoint="/x", lowerindex=str(index),
                 lowerindex_check="roots")).close()
    # ... but a change at a root does not
    (lowers[1] / "new").touch()
    with pytest.raises(layerindex.LowerIndexError, match="changed at its root"):
        Union(Config(lowers=tuple(map(str, lowers)), mountpoint="/x", lowerindex=str(index),
                     lowerindex_check="roots"))
    layerindex.write([str(p) for p in lowers], str(index))
    with pytest.raises(layerindex.LowerIndexError, match="other layers"):
        _union([lowers[1], lowers[0], lowers[2]], None, None, index)
    with pytest.raises(layerindex.LowerIndexError, match="built for 3 layers"):
        _union(lowers[:2], None, None, index)
    index.write_bytes(b"garbage")
    with pytest.raises(layerindex.LowerIndexError, match="not an index file"):
        _union(lowers, None, None, index)
    # damaged where it still unmarshals: a directory's packed names changed in place
    (lowers[0] / "d" / "zq-name0").touch()
    layerindex.write([str(p) for p in lowers], str(index))
    data = bytearray(index.read_bytes())
    data[data.index(b"zq-name0") + 7] = ord("9")  # (inside d/'s packed names)
    index.write_bytes(bytes(data))
    with pytest.raises(layerindex.LowerIndexError, match="damaged"):
        _union(lowers, None, None, index)
    # a directory replaced by another of the same name (new inode)
    layerindex.write([str(p) for p in lowers], str(index))
    os.rename(lowers[0] / "d", scratch / "old-d")
    (lowers[0] / "d").mkdir()
    with pytest.raises(layerindex.LowerIndexError, match="stale"):
        _union(lowers, None, None, index)


def test_cli_builds_and_mount_refuses_stale(scratch: Path) -> None:
    lowers = _mkstack(scratch, 2)
    (lowers[1] / "d" / "f").write_text("data")
    index = scratch / "idx"
    opt = "lowerdir=" + ":".join(map(str, lowers))
    r = subprocess.run([*unionfs_cmd(), "index", "build", "-o", opt, str(index)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert index.stat().st_size > 0
    r = subprocess.run([*unionfs_cmd(), "index", "build", str(index)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "missing -o lowerdir" in r.stderr
    r = subprocess.run([*unionfs_cmd(), "index"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr
    if not (ROOT and os.path.exists("/dev/fuse")):
        return
    mnt = scratch / "mnt"
    mnt.mkdir()
    with mounted("unionfs", lowers, None, None, mnt, [f"lowerindex={index}"]):
        assert (mnt / "d" / "f").read_text() == "data"
    (lowers[0] / "d" / "new").touch()
    try:
        r = subprocess.run([*unionfs_cmd(), "-o", f"{opt},lowerindex={index}", str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert "stale" in r.stderr and "unionfs index build" in r.stderr
    finally:
        unmount(mnt)


# --- attributes ------------------------------------------------------------------------------

STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
               "st_rdev", "st_blocks", "st_blksize", "st_atime", "st_mtime", "st_ctime",
               "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


def _attr_stack(root: Path) -> list[Path]:
    """Three layers with every kind of object and attribute the union shows: hard links (in one
    directory and across two), a symlink, a fifo, devices, a sparse file, owners, setuid,
    nanosecond and pre-1970 times, a name shadowed by an upper layer, a whiteout."""
    lowers = _mkstack(root, 3)
    top, mid, bottom = lowers
    d = bottom / "d"
    (d / "data").write_bytes(b"x" * 5000)
    os.utime(d / "data", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    (d / "old").touch()
    os.utime(d / "old", ns=(-86_400_123_456_789, -1_000_000_001))
    os.link(d / "data", d / "link")
    (bottom / "e").mkdir()
    os.link(d / "data", bottom / "e" / "far")
    (d / "sym").symlink_to("data")
    os.mkfifo(d / "fifo")
    if ROOT:
        os.mknod(d / "chr", 0o640 | 0o020000, os.makedev(1, 3))
        os.mknod(d / "blk", 0o600 | 0o060000, os.makedev(7, 0))
        os.chown(d / "data", 1234, 5678)
        os.chown(bottom / "e", 42, 43)
        os.chown(d / "sym", 7, 8, follow_symlinks=False)
    os.chmod(d / "data", 0o4755)
    with open(d / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    (d / "shadowed").write_text("bottom")
    (mid / "d" / "shadowed").write_text("middle, longer")
    (mid / "d" / "gone").write_text("hidden below")
    if ROOT:  # the whiteout kernel overlayfs reads too
        os.mknod(top / "d" / "gone", 0o600 | 0o020000, 0)
    else:
        (top / "d" / ".wh.gone").touch()
    (top / "d" / "topfile").write_text("top")
    os.chmod(bottom / "d", 0o751)
    return lowers


def _real(lowers: list[Path], branch: int, rel: bytes) -> os.stat_result:
    return os.lstat(os.path.join(os.fsencode(lowers[branch]), rel))


def _same_stat(got: os.stat_result, want: os.stat_result) -> list[str]:
    return [f"{f}: {getattr(got, f)!r} != {getattr(want, f)!r}" for f in STAT_FIELDS
            if getattr(got, f) != getattr(want, f)]


LOWER_NAMES = [(2, b"d/data"), (2, b"d/link"), (2, b"e/far"), (2, b"d/old"), (2, b"d/sym"),
               (2, b"d/fifo"), (2, b"d/sparse"), (2, b"d/shadowed"), (1, b"d/shadowed"),
               (1, b"d/gone"), (0, b"d/topfile"), (0, b"d"), (1, b"d"), (2, b"d"), (2, b"e")]


class _NoSyscalls:
    """Makes every stat, open and openat2 fail while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch

    def __enter__(self) -> None:
        def fail(*_a: object, **_k: object) -> None:
            raise AssertionError("a system call despite the index's attributes")

        for mod, name in ((os, "stat"), (os, "lstat"), (os, "fstat"), (os, "open"),
                          (sl, "openat2"), (os, "scandir"), (os, "listxattr")):
            self.mp.setattr(mod, name, fail)

    def __exit__(self, *_exc: object) -> None:
        self.mp.undo()


@pytest.mark.parametrize("check", ["files", "roots"])
def test_index_attributes_are_the_real_lstat_without_a_syscall(
        scratch: Path, check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lowers = _attr_stack(scratch)
    names = LOWER_NAMES + ([(2, b"d/chr"), (2, b"d/blk")] if ROOT else [])
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    u = _union(lowers, None, None, index, check)
    try:
        # Branch.stat of every lower object the index describes: the real lstat, field by
        # field, ns and float times included, and no system call
        for branch, rel in names:
            want = _real(lowers, branch, rel)
            with _NoSyscalls(monkeypatch):
                got = u.branches[branch].stat(rel)
            assert not _same_stat(got, want), (rel, _same_stat(got, want))
            assert got == want
        # the engine: cold lookups and getattr of bottom-layer names make no system call
        with _NoSyscalls(monkeypatch):
            d, dst = u.lookup(ROOT_INO, b"d")
            seen = {}
            for name in (b"data", b"link", b"old", b"sym", b"fifo", b"sparse", b"shadowed"):
                node, st = u.lookup(d.ino, name)
                assert u.getattr(node.ino)[1] == st
                seen[name] = (node, st)
            with pytest.raises(OSError):
                u.lookup(d.ino, b"gone")
            with pytest.raises(OSError):
                u.lookup(d.ino, b"missing")
            e, _ = u.lookup(ROOT_INO, b"e")
            far, far_st = u.lookup(e.ino, b"far")
        assert dst == _real(lowers, 0, b"d")
        assert seen[b"shadowed"][1] == _real(lowers, 1, b"d/shadowed")
        assert seen[b"data"][1] == _real(lowers, 2, b"d/data")
        # hard links: one inode, the real link count
        assert seen[b"data"][0] is seen[b"link"][0] is far
        assert far_st.st_nlink == 3 == u.nlink(far, far_st)
    finally:
        u.close()


def test_index_attributes_policy_and_staleness(scratch: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """dirs (the default) never serves attributes from the index, so an in-place change of a
    lower file shows; files refuses the index then; roots trusts it (immutable layers)."""
    lowers = _attr_stack(scratch)
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    data = lowers[2] / "d" / "data"
    time.sleep(0.01)
    with open(data, "r+b") as f:  # in place: no directory changes
        f.write(b"y" * 6000)
    real = os.lstat(data)
    u = _union(lowers, None, None, index)  # default: dirs check passes...
    try:
        assert u.lindex is not None and not u.lindex.attrs
        d, _ = u.lookup(ROOT_INO, b"d")
        _, st = u.lookup(d.ino, b"data")
        assert st == real  # ... and the attributes are the file's, stat'ed live
    finally:
        u.close()
    with pytest.raises(layerindex.LowerIndexError,
                       match=r"stale: layer .* changed at 'd/(data|link)'.*unionfs index build"):
        _union(lowers, None, None, index, "files")
    # roots: the layers are trusted to be immutable, the index is believed
    u = _union(lowers, None, None, index, "roots")
    try:
        assert u.lindex is not None and u.lindex.attrs
        d, _ = u.lookup(ROOT_INO, b"d")
        _, st = u.lookup(d.ino, b"data")
        assert st.st_size == 5000 != real.st_size
    finally:
        u.close()
    # every kind of in-place change is caught by files: mode, owner, link count, times
    changes = [lambda: os.chmod(lowers[2] / "d" / "sparse", 0o600),
               lambda: os.utime(lowers[2] / "d" / "old", ns=(0, 0)),
               lambda: os.link(lowers[0] / "d" / "topfile", scratch / "outside")]
    if ROOT:
        changes.append(lambda: os.chown(lowers[1] / "d" / "gone", 1, 1))
    for change in changes:
        layerindex.write([str(p) for p in lowers], str(index))
        _union(lowers, None, None, index, "files").close()
        time.sleep(0.01)
        change()
        with pytest.raises(layerindex.LowerIndexError, match="stale"):
            _union(lowers, None, None, index, "files")
    # the access time is not compared (reading a lower file moves it)
    layerindex.write([str(p) for p in lowers], str(index))
    before = os.lstat(data)
    assert before.st_atime_ns < before.st_mtime_ns  # so a read moves it (relatime)
    data.read_bytes()
    if os.lstat(data).st_atime_ns == before.st_atime_ns:
        pytest.skip("this file system did not update the access time on read")
    _union(lowers, None, None, index, "files").close()


def test_copy_up_copies_the_file_not_the_index(scratch: Path) -> None:
    """Even when the index (trusted with `roots`) is behind the file, a copy-up copies the
    whole file as it is (copy-up stats afresh)."""
    lowers = _attr_stack(scratch)
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    with open(lowers[2] / "d" / "sparse", "ab") as f:
        f.write(b"appended after the build")
    up, work = scratch / "u", scratch / "w"
    up.mkdir()
    work.mkdir()
    u = _union(lowers, up, work, index, "roots")
    try:
        d, _ = u.lookup(ROOT_INO, b"d")
        node, st = u.lookup(d.ino, b"sparse")
        assert st.st_size == (1 << 20) + 3  # what the index says
        u.copy_up(node)
    finally:
        u.close()
    assert (up / "d" / "sparse").read_bytes() == (lowers[2] / "d" / "sparse").read_bytes()


# --- mounted ---------------------------------------------------------------------------------

@pytest.mark.timeout(900)
@diff_settings(6)
@given(stack=stack_strategy(), oci=st.booleans())
def test_mounted_tree_same_with_index_without_and_overlayfs(stack: Stack, oci: bool) -> None:
    require_environment()
    root = Path(tempfile.mkdtemp(prefix="unionfs-lindex-"))
    try:
        sut = materialise(to_oci(stack) if oci else stack, root / "sut")
        orc = materialise(stack, root / "orc")
        index = root / "lower.idx"
        layerindex.write([str(p) for p in sut.lowers], str(index))
        with mounted("unionfs", sut.lowers, sut.upper, sut.work, root / "m1",
                     [f"lowerindex={index}"]):
            with_index = snapshot(root / "m1")
        with mounted("unionfs", sut.lowers, sut.upper, sut.work, root / "m2"):
            without = snapshot(root / "m2")
        with mounted("overlay", orc.lowers, orc.upper, orc.work, root / "m3",
                     ORACLE_OPTIONS):
            kernel = snapshot(root / "m3")
        diffs = compare_views(with_index, without, "unionfs-index", "unionfs")
        # mtimes and inode numbers too: the index must not change what is stat'ed
        diffs += [f"{p!r}: mtime" for p in with_index
                  if p in without and with_index[p].mtime_ns != without[p].mtime_ns]
        diffs += compare_views(with_index, kernel, "unionfs-index", "overlay",
                               nlink_model=True)
        assert not diffs, "\n".join(diffs)
    finally:
        for m in ("m1", "m2", "m3"):
            unmount(root / m)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=120)


# --- syscalls of a cold lookup -----------------------------------------------------------------

def _traced_lookup(scratch: Path, lowers: list[Path], name: str, options: list[str]
                   ) -> list[str]:
    """Paths the server's system calls touched (strace -y) during one cold lookup of NAME."""
    mnt = scratch / "mnt"
    mnt.mkdir(exist_ok=True)
    out = scratch / "strace.txt"
    with mounted("unionfs", lowers, None, None, mnt, options) as m:
        assert m.server is not None
        # the mount root's attributes, which the kernel asks for once per mount, before the
        # trace: `mounted` only waits for the mount table (its realpath of the mount point
        # stats the root only if the mount was already there), so otherwise the traced lookup
        # sometimes carried the root's getattr too (one fstat of the top layer's root)
        os.stat(mnt)
        tracer = subprocess.Popen(["strace", "-f", "-y", "-qq", "-o", str(out), "-p",
                                   str(m.server.pid)], stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # attached (strace has no readiness signal; generous)
            os.lstat(mnt / name)
            with pytest.raises(FileNotFoundError):
                os.lstat(mnt / (name + ".missing"))
            time.sleep(0.3)
        finally:
            tracer.terminate()
            tracer.wait(timeout=30)
    text = out.read_text(errors="replace")
    assert "stat" in text or "/dev/fuse" in text, f"nothing traced:\n{text[:2000]}"
    return re.findall(r"<(/[^>]*)>", text) + re.findall(r'"(/[^"]*)"', text)


def _bottom_name_stack(scratch: Path, n: int) -> tuple[list[Path], Path]:
    """N layers that all hold d/, each a name of its own, the bottom one d/bottom; indexed."""
    lowers = _mkstack(scratch / "layers", n)
    for i, p in enumerate(lowers):
        (p / "d" / f"only{i}").touch()
    (lowers[-1] / "d" / "bottom").write_text("x")
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    return lowers, index


@pytest.mark.skipif(shutil.which("strace") is None or not ROOT or not os.path.exists("/dev/fuse"),
                    reason="needs strace, root and /dev/fuse")
def test_cold_lookup_with_index_touches_only_the_holding_layer(scratch: Path) -> None:
    n = 16
    lowers, index = _bottom_name_stack(scratch, n)
    # the lookup of "d" stats it in its top layer (a directory's attributes), nothing else there
    top = str(lowers[0])
    others = [str(p) for p in lowers[1:-1]]

    def touched_others(paths: list[str]) -> set[str]:
        out = {o for o in others for p in paths if p == o or p.startswith(o + "/")}
        return out | {p for p in paths if p.startswith(top + "/") and p != top + "/d"}

    without = _traced_lookup(scratch, lowers, "d/bottom", [])
    # the control: without the index the lookup reads the other layers (so the trace sees them)
    assert len(touched_others(without)) >= n - 2, without
    with_index = _traced_lookup(scratch, lowers, "d/bottom", [f"lowerindex={index}"])
    assert not touched_others(with_index), \
        f"with the index the lookup touched other layers: {sorted(touched_others(with_index))}"
    assert any(p.startswith(str(lowers[-1])) for p in with_index), with_index


@pytest.mark.skipif(shutil.which("strace") is None or not ROOT or not os.path.exists("/dev/fuse"),
                    reason="needs strace, root and /dev/fuse")
@pytest.mark.parametrize("check", ["files", "roots"])
def test_cold_lookup_with_index_attributes_touches_no_layer(scratch: Path, check: str) -> None:
    """With the attributes served from the index, a cold lookup and stat of a bottom-layer
    name (and of its directory) makes no system call in any layer; without them (dirs) it
    stats the name in the holding layer."""
    n = 16
    lowers, index = _bottom_name_stack(scratch, n)
    layer_paths = [str(p) for p in lowers]

    def touched(paths: list[str]) -> set[str]:
        return {p for p in paths for lp in layer_paths if p == lp or p.startswith(lp + "/")}

    control = _traced_lookup(scratch, lowers, "d/bottom", [f"lowerindex={index}"])
    assert any(p.startswith(str(lowers[-1]) + "/d") for p in touched(control)), control
    with_attrs = _traced_lookup(scratch, lowers, "d/bottom",
                                [f"lowerindex={index}", f"lowerindex_check={check}"])
    assert not touched(with_attrs), f"layers touched: {sorted(touched(with_attrs))}"


def _lstat_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """lstat of every name under ROOT (no file read: access times stay), with the inode
    numbers as classes (which names share one) instead of values."""
    stats: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            stats.setdefault(os.path.relpath(p, root), os.lstat(p))
    first: dict[int, str] = {}
    for rel in sorted(stats):
        first.setdefault(stats[rel].st_ino, rel)
    # a symlink's access time moves when it is read (the union reads lower symlinks on lookup),
    # which the index, keeping the build's, does not follow: documented, not compared
    skip = ("st_ino", "st_dev")
    return {rel: (*(getattr(st, f) for f in STAT_FIELDS
                    if f not in skip and not (stat.S_ISLNK(st.st_mode) and "atime" in f)),
                  first[st.st_ino]) for rel, st in stats.items()}


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
def test_mounted_attributes_same_with_index_without_and_overlayfs(scratch: Path) -> None:
    """Every lstat field (times in ns, blocks, devices, link counts, which names share an
    inode) through the index's attributes is what unionfs without them and kernel overlayfs
    show."""
    require_environment()
    lowers = _attr_stack(scratch / "layers")
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    views = {}
    for label, kind, options in (
            ("files", "unionfs", [f"lowerindex={index}", "lowerindex_check=files"]),
            ("roots", "unionfs", [f"lowerindex={index}", "lowerindex_check=roots"]),
            ("plain", "unionfs", []),
            ("overlay", "overlay", ORACLE_OPTIONS)):
        mnt = scratch / f"m-{label}"
        with mounted(kind, lowers, None, None, mnt, options):
            views[label] = _lstat_tree(mnt)
    assert "d/data" in views["files"] and "d/fifo" in views["files"]
    # a merged directory's link count: overlayfs says 1, unionfs counts the subdirectories
    views["overlay"] = {p: (v[0], views["files"][p][1], *v[2:])
                        if stat.S_ISDIR(int(v[0])) and p in views["files"] else v  # type: ignore[call-overload]
                        for p, v in views["overlay"].items()}
    for label in ("roots", "plain", "overlay"):
        diffs = [f"{p}: {views['files'].get(p)} != {label} {views[label].get(p)}"
                 for p in sorted(set(views["files"]) | set(views[label]))
                 if views["files"].get(p) != views[label].get(p)]
        assert not diffs, "\n".join(diffs)


@contextlib.contextmanager
def _indexed_union(scratch: Path, lowers: list[Path]
                   ) -> Iterator[tuple[Union, Collection[layerindex._Record]]]:
    """A union over LOWERS with their index (built in SCRATCH), and the index's records."""
    index = scratch / "idx"
    layerindex.write([str(p) for p in lowers], str(index))
    u = _union(lowers, None, None, index)
    try:
        assert u.lindex is not None
        yield u, u.lindex.records.values()
    finally:
        u.close()


def test_a_mount_unpacks_only_the_directory_records_it_uses(scratch: Path) -> None:
    """Each directory's names are packed on their own: loading the index decodes none of
    them, a lookup those of the directories on its way, and `drop_caches` lets them go."""
    with _indexed_union(scratch, wide_layers(scratch, 2, 30)) as (u, records):
        assert len(records) == 61  # the root, 30 directories, their sub/

        def unpacked() -> list[object]:
            return [rec.layers[0][1] for rec in records if rec._names is not None]

        assert unpacked() == []
        found = u._walk(b"d07/sub")
        assert found is not None and found[2].kind is Kind.DIR
        assert sorted(unpacked()) == [b"", b"d07"]  # (the root's and d07's, which hold them)
        u.lindex.drop_caches()
        assert unpacked() == []
        f1, f2 = u._walk(b"d07/f1"), u._walk(b"d07/f2")
        assert f1 is not None and f1[2].kind is Kind.OTHER and f1[2].branches == (1,)
        assert f2 is not None and f2[2].kind is Kind.MISSING


def test_loading_a_rootfs_size_index_decodes_no_directory(scratch: Path) -> None:
    """A rootfs-size stack (20k names in 2k directories over 4 layers): loading its index and
    checking it decodes no directory's names (what made a load grow with the image: 37 ms for
    100,000 names), and a lookup then decodes those on its way. (How long loads take is the
    benchmarks' business, see benchmarks/README.md, not a timed test's.)"""
    lowers = [scratch / f"l{i}" for i in range(4)]
    for i, p in enumerate(lowers):
        for d in range(500):
            dd = p / f"d{d % 500:03d}" / f"s{i}"
            dd.mkdir(parents=True)
            for f in range(10):
                (dd / f"f{f}").touch()
    with _indexed_union(scratch, lowers) as (u, records):
        assert len(records) == 1 + 500 + 2000
        assert not any(rec._names is not None for rec in records)
        found = u._walk(b"d123/s2/f7")
        assert found is not None and found[2].kind is Kind.OTHER and found[2].branches == (2,)
        assert sum(rec._names is not None for rec in records) == 3  # /, d123, d123/s2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
