"""What the server gives back when the kernel forgets most of its inodes (`Union.shrink`, run
from `forget`): every node is freed and the inode table's dict is copied down to its survivors,
since a dict never shrinks the table of its largest size. In-process."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unionfs.conftest import in_process_union
from unionfs.branch import LOWER_STATS, LOWER_STATS_MIN
from unionfs.statpack import ATTR
from unionfs.union import SHRINK_MIN_NODES, Union

N = SHRINK_MIN_NODES + 1000


@pytest.fixture
def union(tmp_path: Path) -> Iterator[Union]:
    lower = tmp_path / "l"
    lower.mkdir()
    for i in range(N):
        (lower / f"f{i}").touch()
    with in_process_union(tmp_path, [lower]) as u:
        yield u


def test_forgetting_most_inodes_frees_them_and_compacts_the_table(union: Union) -> None:
    inos = []
    for i in range(N):
        node, _ = union.lookup(1, b"f%d" % i)  # counts the kernel's reference
        inos.append(node.ino)
    peak = sys.getsizeof(union.inodes.nodes)
    keep = inos[-10:]
    for ino in inos[:-10]:
        union.forget(ino, 1)
    assert set(union.inodes.nodes) == {1, *keep}
    # the table was copied when the shrink ran (below a quarter of the peak), and again at each
    # further quarter: what is left is sized for the survivors, not for the peak
    assert sys.getsizeof(union.inodes.nodes) * 20 < peak
    for ino in keep:
        assert union.node(ino).name.startswith(b"f")


@pytest.mark.parametrize("nlowers", [1, 2, 64])
def test_lower_stat_caches_share_one_budget(tmp_path: Path, nlowers: int) -> None:
    """The lstat results kept of lower objects (about 600 bytes each) are bounded over all the
    lower branches together: a deep stack does not multiply the server's memory."""
    lowers = [tmp_path / f"l{i}" for i in range(nlowers)]
    for p in lowers:
        p.mkdir()
    names = LOWER_STATS // 2 + 1000  # more than one of two layers' share
    for i in range(names):
        (lowers[-1] / f"f{i}").touch()
    with in_process_union(tmp_path, lowers) as u:
        for i in range(names):
            u.lookup(1, b"f%d" % i)
        kept = len(u.branches[-1]._stats)  # (the bottom layer holds every name)
        assert 0 < kept <= max(LOWER_STATS_MIN, LOWER_STATS // nlowers) < names or nlowers == 1
        assert kept <= LOWER_STATS


STAT_FIELDS = [f for f in dir(os.stat_result) if f.startswith("st_")]


def test_kept_lower_stats_are_packed_and_come_back_field_for_field(tmp_path: Path) -> None:
    """A kept lstat is 84 bytes (`statpack`), not an os.stat_result (650): what a hit returns
    is, field for field (integer and float times included), what lstat returned."""
    lower = tmp_path / "l"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "f").write_bytes(b"x" * 5000)
    (lower / "d" / "s").symlink_to("f")
    os.utime(lower / "d" / "f", ns=(1_234_567_891_234_567_891, 1_700_000_000_123_456_789))
    with in_process_union(tmp_path, [lower]) as u:
        b = u.branches[-1]
        for rel in (b"d", b"d/f", b"d/s"):
            first = b.stat(rel)  # a miss: the live lstat
            assert isinstance(b._stats[rel], bytes) and len(b._stats[rel]) == ATTR.size == 84
            again = b.stat(rel)  # a hit: unpacked
            assert again is not first
            live = os.lstat(lower / rel.decode())
            for f in STAT_FIELDS:
                assert getattr(again, f) == getattr(first, f) == getattr(live, f), (rel, f)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_a_removed_directory_is_kept_open_until_the_kernel_forgets_it(tmp_path: Path) -> None:
    """An upper directory removed while the kernel holds its inode keeps its attributes
    readable (an fstat of an open directory after rmdir) through an fd the server keeps until
    the kernel forgets the inode; a removed file keeps the lstat it had. No fd outlives the
    forget, nor the union."""
    lower = tmp_path / "l"
    (lower / "lowdir").mkdir(parents=True)
    with in_process_union(tmp_path, [lower]) as u:
        d, _ = u.mkdir(1, b"d", 0o750)
        fh, f, fst = u.create(1, b"f", 0o640, os.O_WRONLY)
        u.release(fh)
        low, low_st = u.lookup(1, b"lowdir")
        before = _open_fds()  # (after what the union opens and keeps on its first requests)
        u.rmdir(1, b"d")
        u.unlink(1, b"f")
        u.rmdir(1, b"lowdir")
        kept = _open_fds() - before
        assert len(kept) == 1  # the upper directory's; the lower one is still in its layer
        node, st = u.getattr(d.ino)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
        assert u.nlink(node, st) == 0
        node, st = u.getattr(f.ino)
        assert (st.st_ino, stat.S_IMODE(st.st_mode), u.nlink(node, st)) == (
            fst.st_ino, 0o640, 0)
        node, st = u.getattr(low.ino)
        assert (st.st_ino, u.nlink(node, st)) == (low_st.st_ino, 0)
        u.forget(d.ino, 1)
        assert _open_fds() == before
        with pytest.raises(OSError):
            u.getattr(d.ino)  # (forgotten)
        u.mkdir(1, b"d", 0o700)  # (kept open at its rmdir: closed with the union)
        u.rmdir(1, b"d")
        assert len(_open_fds() - before) == 1
    assert not (_open_fds() - before)  # closed with the union
