"""Operations called directly, without mounting (test layer 2).

The pyfuse3 adapter is driven from trio tests (pytest-trio) against real branch directories, so
the unprivileged on-disk formats can be forced (`.wh.` whiteouts, `user.overlay.*` xattrs) even
though the suite runs as root, and every test ends with an invariant check: no handler bug, no
open handle left, the work directory empty.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from tests.helpers.mounts import mounted
from unionfs.config import Config
from unionfs.ops import UnionOperations
from unionfs.union import Union

from .conftest import write


class Ctx:
    """Stands in for pyfuse3.RequestContext, which only the kernel can create."""

    def __init__(self, uid: int = 0, gid: int = 0, umask: int = 0o022) -> None:
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, os.getpid()


CTX = Ctx()


class Env:
    def __init__(self, root: Path, privileged_formats: bool) -> None:
        self.lower = root / "lower"
        self.upper = root / "upper"
        self.work = root / "work"
        for d in (self.lower, self.upper, self.work):
            d.mkdir()
        self.root = root
        self.privileged_formats = privileged_formats
        self.ops: UnionOperations | None = None

    def start(self) -> UnionOperations:
        cfg = Config(lowers=(str(self.lower),), mountpoint=str(self.root),
                     upper=str(self.upper), work=str(self.work))
        union = Union(cfg)
        if not self.privileged_formats:
            union.chardev_whiteouts = False
            union.trusted_xattrs = False
        self.ops = UnionOperations(union, timeout=1.0)
        return self.ops

    def check_invariants(self) -> None:
        assert self.ops is not None
        assert self.ops.bugs == 0
        assert self.ops.union.handles == {}, "handles left open"
        assert os.listdir(self.work / "work") == [], "work directory not clean"
        self.ops.union.close()


@pytest.fixture(params=[False, True], ids=["unprivileged-formats", "privileged-formats"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, request.param)
    yield e
    if e.ops is not None:
        e.check_invariants()


async def _lookup(ops: UnionOperations, parent: int, name: bytes) -> int:
    attr = await ops.lookup(parent, name, CTX)
    return int(attr.st_ino)


async def test_unprivileged_formats_round_trip(env: Env, tmp_path: Path) -> None:
    write(env.lower / "gone", b"g")
    write(env.lower / "d" / "old", b"o")
    write(env.lower / "keep", b"k")
    ops = env.start()
    root = pyfuse3.ROOT_INODE
    await ops.unlink(root, b"gone", CTX)
    d = await _lookup(ops, root, b"d")
    await ops.unlink(d, b"old", CTX)
    await ops.rmdir(root, b"d", CTX)
    attr = await ops.mkdir(root, b"d", 0o755, CTX)
    fi, _ = await ops.create(int(attr.st_ino), b"new", 0o644, os.O_WRONLY, CTX)
    assert await ops.write(fi.fh, 0, b"n") == 1
    await ops.release(fi.fh)
    if env.privileged_formats:
        assert stat.S_ISCHR(os.lstat(env.upper / "gone").st_mode)
        assert os.getxattr(env.upper / "d", "trusted.overlay.opaque") == b"y"
    else:
        assert (env.upper / ".wh.gone").is_file()
        assert not (env.upper / "gone").exists()
        assert os.getxattr(env.upper / "d", "user.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(env.upper / "d")
    # the same upper reads back the same under a real mount
    env.check_invariants()
    env.ops = None
    mnt = tmp_path / "mnt"
    with mounted("unionfs", [env.lower], env.upper, env.work, mnt):
        assert sorted(os.listdir(mnt)) == ["d", "keep"]
        assert os.listdir(mnt / "d") == ["new"]
    # fuse-overlayfs reads both encodings too: the upper is portable
    with mounted("fuse-overlayfs", [env.lower], env.upper, env.work, mnt):
        assert sorted(os.listdir(mnt)) == ["d", "keep"]
        assert os.listdir(mnt / "d") == ["new"]


async def test_errors_are_fuse_errors(env: Env) -> None:
    write(env.lower / "f", b"x")
    (env.lower / "dir").mkdir()
    ops = env.start()
    root = pyfuse3.ROOT_INODE
    # a missing name is a negative entry the kernel may cache, not an error
    assert (await ops.lookup(root, b"missing", CTX)).st_ino == 0
    cases = [
        (ops.lookup(root, b"x" * 256, CTX), errno.ENAMETOOLONG),
        (ops.unlink(root, b"dir", CTX), errno.EISDIR),
        (ops.rmdir(root, b"f", CTX), errno.ENOTDIR),
        (ops.mkdir(root, b"f", 0o755, CTX), errno.EEXIST),
        (ops.getattr(987654321, CTX), errno.ESTALE),
        (ops.mknod(root, b"wh", stat.S_IFCHR, 0, CTX), errno.EPERM),
        (ops.setxattr(root, b"trusted.overlay.opaque", b"y", CTX), errno.EPERM),
    ]
    for coro, code in cases:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await coro
        assert ei.value.errno == code


async def test_readdir_offsets_are_stable(env: Env) -> None:
    for i in range(300):
        write(env.lower / "big" / f"f{i:04}", b"")
    ops = env.start()
    big = await _lookup(ops, pyfuse3.ROOT_INODE, b"big")
    assert await ops.opendir(big, CTX) == big  # without dircache, handles are inode numbers
    before = ops.union.readdir(big)
    assert sorted(e.name for e in before.entries) == [b"f%04d" % i for i in range(300)]
    # a reader stopped after 100 entries; the directory changes; it resumes at its offset
    seen = [e.name for e in before.entries[:100]]
    for name in (seen[3], before.entries[150].name, before.entries[299].name):
        await ops.unlink(big, name, CTX)
    await ops.mkdir(big, b"new", 0o755, CTX)
    after = ops.union.readdir(big)
    rest = [e.name for e in after.entries[after.start(before.offsets[99]):]]
    assert not set(seen) & set(rest)
    assert set(seen) | set(rest) >= {e.name for e in after.entries} - {b"new"}
    await ops.releasedir(big)


async def test_lookup_counts_and_forget(env: Env) -> None:
    write(env.lower / "f", b"x")
    ops = env.start()
    ino = await _lookup(ops, pyfuse3.ROOT_INODE, b"f")
    await _lookup(ops, pyfuse3.ROOT_INODE, b"f")
    table = ops.union.inodes.nodes
    assert table[ino].nlookup == 2
    await ops.forget([(ino, 1)])
    assert ino in table
    await ops.forget([(ino, 1)])
    assert ino not in table
    # a later lookup gets the same number: inode numbers are stable for the mount's life
    assert await _lookup(ops, pyfuse3.ROOT_INODE, b"f") == ino
    await ops.forget([(ino, 1)])


async def test_link_counts_of_lower_hard_links_need_no_branch_walk_until_one_is_hidden(
        env: Env) -> None:
    write(env.lower / "d" / "f", b"x")
    os.link(env.lower / "d" / "f", env.lower / "e")
    write(env.lower / "other", b"y")
    ops = env.start()
    lower = ops.union.branches[1]
    d = await _lookup(ops, pyfuse3.ROOT_INODE, b"d")
    f = await ops.lookup(d, b"f", CTX)
    assert f.st_nlink == 2
    # writing elsewhere (copy-up, new files, removing other files) hides no name of a hard link
    info, attr = await ops.create(d, b"new", 0o644, os.O_WRONLY, CTX)
    await ops.release(info.fh)
    await ops.unlink(pyfuse3.ROOT_INODE, b"other", CTX)
    await ops.forget([(attr.st_ino, 1)])
    assert (await ops.getattr(f.st_ino, CTX)).st_nlink == 2
    assert lower._links is None  # the count is the branch's, as in overlayfs: no walk
    # a name of the hard link goes: counts are the union's names from now on
    await ops.unlink(pyfuse3.ROOT_INODE, b"e", CTX)
    assert (await ops.getattr(f.st_ino, CTX)).st_nlink == 1
    assert lower._links is not None
    await ops.forget([(f.st_ino, 1)])


async def test_link_count_of_a_merged_directory_needs_no_merged_listing(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup on the way through a merged directory counts its subdirectories once, from the
    layers' listings, without merging and ordering the names (a large directory's cost); a
    listing, once built, is counted instead; a change counts again."""
    for n in ("a", "b"):
        (env.lower / "d" / n).mkdir(parents=True)
    write(env.lower / "d" / "f", b"x")
    (env.upper / "d" / "c").mkdir(parents=True)
    (env.upper / "d" / "a").mkdir()
    ops = env.start()
    import unionfs.union as union_mod
    merges: list[int] = []
    real_merge = union_mod.merge
    monkeypatch.setattr(union_mod, "merge", lambda ls: merges.append(1) or real_merge(ls))
    d = await ops.lookup(pyfuse3.ROOT_INODE, b"d", CTX)
    assert d.st_nlink == 2 + 3  # a, b, c
    assert (await ops.getattr(d.st_ino, CTX)).st_nlink == 5
    assert merges == []
    fh = await ops.opendir(d.st_ino, CTX)
    assert {e.name for e in ops.union.merged(ops.union.node(d.st_ino))} == {b"a", b"b", b"c", b"f"}
    assert merges == [1]
    info = await ops.mkdir(d.st_ino, b"e", 0o755, CTX)
    assert (await ops.getattr(d.st_ino, CTX)).st_nlink == 6
    await ops.rmdir(d.st_ino, b"a", CTX)  # (leaves a whiteout: a lower one is below)
    assert (await ops.getattr(d.st_ino, CTX)).st_nlink == 5
    assert len(ops.union.merged(ops.union.node(d.st_ino))) == 4  # b, c, e, f
    await ops.releasedir(fh)
    await ops.forget([(info.st_ino, 1), (d.st_ino, 1)])


async def test_caches_go_when_the_kernel_forgets_most_inodes(env: Env) -> None:
    from unionfs.union import SHRINK_MIN_NODES
    n = SHRINK_MIN_NODES + 100
    for i in range(n):
        write(env.lower / f"d{i % 50}" / f"f{i}", b"")
    ops = env.start()
    union, lower = ops.union, ops.union.branches[1]
    seen: list[int] = []
    for d in range(50):
        dino = await _lookup(ops, pyfuse3.ROOT_INODE, b"d%d" % d)
        seen.append(dino)
        for e in union.readdir(dino).entries:
            seen.append((await ops.lookup(dino, e.name, CTX)).st_ino)
    assert len(union.inodes.nodes) == n + 51
    assert lower._listings and lower._stats
    # the kernel forgets the first half: caches stay (it may come back for them)
    await ops.forget([(i, 1) for i in seen[: len(seen) // 2]])
    assert lower._listings and union.inodes.nodes[pyfuse3.ROOT_INODE].children
    # ... and then nearly all of it: what was learnt about the branches goes too
    await ops.forget([(i, 1) for i in seen[len(seen) // 2:]])
    assert len(union.inodes.nodes) == 1
    assert not lower._listings and not lower._stats
    assert union.inodes.nodes[pyfuse3.ROOT_INODE].children is None
    # and is learnt again on demand
    d7 = await _lookup(ops, pyfuse3.ROOT_INODE, b"d7")
    assert sorted(e.name for e in union.readdir(d7).entries) == sorted(
        b"f%d" % i for i in range(n) if i % 50 == 7)
    await ops.forget([(d7, 1)])


async def test_per_inode_io_keeps_few_files_open_but_every_removed_one(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import unionfs.union as u
    monkeypatch.setattr(u, "IMPLICIT_MAX", 4)
    for i in range(12):
        write(env.lower / f"f{i}", b"lower %d" % i)
    ops = env.start()
    union = ops.union
    union.per_inode_io = True
    inos = [await _lookup(ops, pyfuse3.ROOT_INODE, b"f%d" % i) for i in range(12)]
    # an upper file the kernel knows, removed while (maybe) open: its fd must stay
    await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o755, CTX)
    gone = union.mknod(union.lookup(pyfuse3.ROOT_INODE, b"d")[0].ino, b"g",
                       stat.S_IFREG | 0o644, 0)[0]
    assert union.write_inode(gone.ino, 0, b"kept") == 4
    await ops.unlink(union.lookup(pyfuse3.ROOT_INODE, b"d")[0].ino, b"g", CTX)
    for ino in inos:
        assert union.read_inode(ino, 0, 5) == b"lower"
    assert len(union._implicit) <= 4
    assert sum(1 for h in union.handles.values()) <= 5  # 4 recent + the removed file's
    assert union.read_inode(gone.ino, 0, 4) == b"kept"
    for ino in inos:
        await ops.forget([(ino, 1)])
    union.forget(gone.ino, gone.nlookup)
    assert not union.handles  # the kernel forgot them all: every fd closed


async def test_readdir_of_a_lower_directory_reads_its_stats_in_one_pass(env: Env) -> None:
    for i in range(20):
        write(env.lower / "d" / f"f{i}", b"")
    ops = env.start()
    lower = ops.union.branches[1]
    d = await _lookup(ops, pyfuse3.ROOT_INODE, b"d")
    lower._stats.clear()
    ops.union.readdir(d)
    assert {k for k in lower._stats if k.startswith(b"d/")} == {b"d/f%d" % i for i in range(20)}
