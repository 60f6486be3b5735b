"""The fixture itself: the declared tree is what a test sees, in the branch the variant says."""

from __future__ import annotations

import os
import stat

from tests.conformance.support import (
    Dir,
    Fifo,
    File,
    Hardlink,
    Symlink,
    Target,
    Tree,
    read_all,
    tree,
    write_file,
)

T = 1_200_000_000_000_000_000
SPEC: Tree = {
    ".": Dir(mode=0o751, uid=1000, gid=1001),
    "plain": b"bytes are a File",
    "f": File(b"contents", mode=0o4750, uid=1000, gid=1001, mtime_ns=T,
              xattrs=(("user.a", b"1"),)),
    "d": Dir(mode=0o700, mtime_ns=T),
    "d/e/deep": b"implied parent",
    "s": Symlink("d/e/deep"),
    "p": Fifo(mode=0o620),
    "h": Hardlink("plain"),
}


@tree(SPEC)
def test_initial_tree_is_visible(target: Target) -> None:
    st = os.lstat(target.root)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o751, 1000, 1001)
    assert sorted(os.listdir(target.root)) == ["d", "f", "h", "p", "plain", "s"]
    assert read_all(target.path("plain")) == b"bytes are a File"
    assert stat.S_IMODE(os.lstat(target.path("plain")).st_mode) == 0o644
    st = os.lstat(target.path("f"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1000, 1001)
    assert st.st_mtime_ns == T
    assert os.getxattr(target.path("f"), "user.a") == b"1"
    st = os.lstat(target.path("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_mtime_ns == T  # set after its children were created
    assert os.listdir(target.path("d/e")) == ["deep"]
    assert stat.S_IMODE(os.lstat(target.path("d/e")).st_mode) == 0o755
    assert os.readlink(target.path("s")) == "d/e/deep"
    assert read_all(target.path("s")) == b"implied parent"
    st = os.lstat(target.path("p"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert os.lstat(target.path("h")).st_ino == os.lstat(target.path("plain")).st_ino
    assert os.lstat(target.path("h")).st_nlink == 2


def test_variant_places_the_test_directory(target: Target) -> None:
    """*-lower: the directory is only in the lower branch until a change copies it up;
    *-fresh: it was created through the mount, so it is only in the upper branch."""
    spec = target.spec
    if spec.kind == "plain":
        assert target.in_lower is None and target.in_upper is None
        return
    assert target.in_lower is not None and target.in_upper is not None
    if spec.variant == "lower":
        assert target.in_lower.is_dir()
        assert not os.path.lexists(target.in_upper)
        write_file(target.path("new"), b"x")
        assert os.path.lexists(target.in_upper)
    else:
        assert not os.path.lexists(target.in_lower)
        assert target.in_upper.is_dir()
        write_file(target.path("new"), b"x")
    assert (target.in_upper / "new").exists()
