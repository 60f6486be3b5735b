"""Copy-up of a lower hard link links its other names lazily (unionfs/linkindex.py).

Claims: the copy-up itself links no other name (no walk of the branch); a lookup of another
name links the copy there first, so every name shows the copy's data and inode, as kernel
overlayfs with index=on does; before an unlink, rename or link every remaining name is linked
(link counts then become exact); at unmount every name is linked and the record is gone, so
the upper directory is self-contained; after a SIGKILL the next mount links the names.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.helpers.mounts import unmount

from .conftest import Stack, write

ORACLE = ("index=on", "redirect_dir=on")


def _hard_linked(stack: Stack) -> None:
    """l1 holds a, d/b and e/f/c, one inode, plus a link outside the branch (a link farm)."""
    a = write(stack.lowers[1] / "a", b"old")
    for rel in ("d/b", "e/f/c"):
        (stack.lowers[1] / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(a, stack.lowers[1] / rel)
    os.link(a, stack.root / "outside")
    write(stack.lowers[0] / "top", b"t")


def _records(stack: Stack) -> list[str]:
    return sorted(os.listdir(stack.work / "links"))


def _append(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"new")


def test_copy_up_links_no_other_name_until_looked_up(stack: Stack) -> None:
    _hard_linked(stack)
    with stack.mount() as m:
        mnt = m.mnt
        assert os.lstat(mnt / "a").st_nlink == 4
        _append(mnt / "a")
        # the copy is in place and recorded; no other name was linked by the copy-up
        assert (stack.upper / "a").read_bytes() == b"oldnew"
        assert not (stack.upper / "d").exists()
        assert len(_records(stack)) == 1
        assert os.lstat(mnt / "a").st_nlink == 4  # names still pending count, the record not
        # a lookup of another name links the copy there
        assert (mnt / "d" / "b").read_bytes() == b"oldnew"
        assert os.lstat(stack.upper / "d" / "b").st_ino == os.lstat(stack.upper / "a").st_ino
        assert os.lstat(mnt / "d" / "b").st_ino == os.lstat(mnt / "a").st_ino
        assert os.lstat(mnt / "d" / "b").st_nlink == 4
        assert not (stack.upper / "e").exists()
    # unmount linked the name never looked up and removed the record
    assert os.lstat(stack.upper / "e" / "f" / "c").st_ino == os.lstat(stack.upper / "a").st_ino
    assert os.lstat(stack.upper / "a").st_nlink == 3
    assert _records(stack) == []
    assert (stack.lowers[1] / "a").read_bytes() == b"old"


def test_views_match_overlayfs_with_index(stack: Stack) -> None:
    """Same layers, same operations: data, inode identity and link counts of every name."""
    _hard_linked(stack)
    seen = {}
    for kind, opts in (("unionfs", ()), ("overlay", ORACLE)):
        for d in (stack.upper, stack.work):
            for p in sorted(d.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        with stack.mount(kind=kind, options=opts) as m:
            mnt = m.mnt
            _append(mnt / "d" / "b")
            names = ("a", "d/b", "e/f/c")
            seen[kind] = [
                ((mnt / n).read_bytes(), os.lstat(mnt / n).st_nlink,
                 os.lstat(mnt / n).st_ino == os.lstat(mnt / "a").st_ino) for n in names]
    assert seen["unionfs"] == seen["overlay"]
    assert seen["unionfs"][0] == (b"oldnew", 4, True)


@pytest.mark.parametrize("op", ["unlink", "rename", "link"])
def test_name_changes_link_every_name_first(stack: Stack, op: str) -> None:
    _hard_linked(stack)
    with stack.mount() as m:
        mnt = m.mnt
        _append(mnt / "a")
        if op == "unlink":
            os.unlink(mnt / "a")
            left = ["d/b", "e/f/c"]
        elif op == "rename":
            os.rename(mnt / "a", mnt / "z")
            left = ["z", "d/b", "e/f/c"]
        else:
            os.link(mnt / "a", mnt / "z")
            left = ["a", "z", "d/b", "e/f/c"]
        assert _records(stack) == []
        inos = {os.lstat(mnt / n).st_ino for n in left}
        assert len(inos) == 1
        for n in left:
            assert (mnt / n).read_bytes() == b"oldnew"
            # exact from now on: the names the union shows (the outside link is not one)
            assert os.lstat(mnt / n).st_nlink == len(left)
        assert os.lstat(stack.upper / "e" / "f" / "c").st_nlink == len(left)


def _copy_up_then_kill(stack: Stack) -> None:
    """Copy up `a` through a mount whose server is then SIGKILLed (no unmount-time linking)."""
    _hard_linked(stack)
    with stack.mount() as m:
        _append(m.mnt / "a")
        assert m.server is not None
        os.killpg(m.server.pid, signal.SIGKILL)
        m.server.wait(timeout=30)
        unmount(m.mnt)


def test_names_linked_at_the_next_mount_after_a_kill(stack: Stack) -> None:
    _copy_up_then_kill(stack)
    assert len(_records(stack)) == 1
    assert not (stack.upper / "d").exists()
    with stack.mount() as m:
        # linked while mounting, before any lookup
        assert os.lstat(stack.upper / "d" / "b").st_ino == os.lstat(stack.upper / "a").st_ino
        assert _records(stack) == []
        assert (m.mnt / "e" / "f" / "c").read_bytes() == b"oldnew"
        assert os.lstat(m.mnt / "e" / "f" / "c").st_nlink == 3


def test_a_record_of_a_missing_branch_is_dropped(stack: Stack) -> None:
    _copy_up_then_kill(stack)
    # mounted again without the branch the record names: it cannot be completed
    with stack.mount(lowers=stack.lowers[:1]) as m:
        assert _records(stack) == []
        assert (m.mnt / "a").read_bytes() == b"oldnew"
        assert not (m.mnt / "d").exists()
