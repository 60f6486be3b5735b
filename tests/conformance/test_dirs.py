"""mkdir(2), rmdir(2), directory link counts and readdir."""

from __future__ import annotations

import errno
import os
import stat

from tests.conformance.support import (
    DT_DIR,
    DT_FIFO,
    DT_LNK,
    DT_REG,
    Dir,
    Fifo,
    File,
    Symlink,
    Target,
    Tree,
    assert_dir_nlink,
    expect_errno,
    getdents,
    read_all,
    tree,
    write_file,
)


def ls(target: Target, rel: str = ".") -> list[str]:
    return sorted(os.listdir(target.path(rel)))


@tree({"f": b"x", "d": Dir(), "l": Symlink("nowhere")})
def test_mkdir(target: Target) -> None:
    os.mkdir(target.path("new"), 0o750)
    st = os.stat(target.path("new"))
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert ls(target, "new") == []
    for existing in ("f", "d", "l", "new"):  # a dangling symlink also counts as existing
        with expect_errno(errno.EEXIST):
            os.mkdir(target.path(existing))
    with expect_errno(errno.ENOENT):
        os.mkdir(target.path("missing/sub"))
    with expect_errno(errno.ENOTDIR):
        os.mkdir(target.path("f/sub"))
    assert not os.path.lexists(target.path("nowhere"))


@tree({"d": Dir(), "d/f": b"lower child", "d/sub": Dir(), "d/sub/g": b"g"})
def test_rmdir_non_empty_then_empty(target: Target) -> None:
    with expect_errno(errno.ENOTEMPTY, errno.EEXIST):
        os.rmdir(target.path("d"))
    with expect_errno(errno.ENOTEMPTY, errno.EEXIST):
        os.rmdir(target.path("d/sub"))
    os.unlink(target.path("d/sub/g"))
    os.rmdir(target.path("d/sub"))
    with expect_errno(errno.ENOTEMPTY, errno.EEXIST):
        os.rmdir(target.path("d"))
    os.unlink(target.path("d/f"))
    assert ls(target, "d") == []
    os.rmdir(target.path("d"))
    assert ls(target) == []
    with expect_errno(errno.ENOENT):
        os.stat(target.path("d"))


@tree({"d": Dir(), "d/old": b"old", "d/sub": Dir(), "d/sub/deeper": b"x"})
def test_recreated_directory_is_empty(target: Target) -> None:
    os.unlink(target.path("d/sub/deeper"))
    os.rmdir(target.path("d/sub"))
    os.unlink(target.path("d/old"))
    os.rmdir(target.path("d"))
    os.mkdir(target.path("d"))
    assert ls(target, "d") == []
    with expect_errno(errno.ENOENT):
        os.stat(target.path("d/old"))
    os.mkdir(target.path("d/sub"))
    assert ls(target, "d/sub") == []
    write_file(target.path("d/old"), b"new")
    assert read_all(target.path("d/old")) == b"new"
    assert ls(target, "d") == ["old", "sub"]


@tree({"f": b"x", "d": Dir(), "l": Symlink("d")})
def test_rmdir_errors(target: Target) -> None:
    with expect_errno(errno.ENOTDIR):
        os.rmdir(target.path("f"))
    with expect_errno(errno.ENOTDIR):
        os.rmdir(target.path("l"))
    with expect_errno(errno.ENOENT):
        os.rmdir(target.path("missing"))
    with expect_errno(errno.EINVAL):  # (pathlib would drop the "/.")
        os.rmdir(os.path.join(target.root, "d/."))
    with expect_errno(errno.EINVAL):
        os.rmdir(os.path.join(target.root, "."))
    assert ls(target) == ["d", "f", "l"]


@tree({"d": Dir(), "d/a": Dir(), "d/b": Dir(), "d/b/c": Dir(), "d/f": b"f", "e": Dir()})
def test_directory_nlink(target: Target) -> None:
    assert_dir_nlink(target, target.root)
    assert_dir_nlink(target, target.path("d"))
    assert_dir_nlink(target, target.path("d/b"))
    assert_dir_nlink(target, target.path("e"))
    os.mkdir(target.path("d/new"))
    assert_dir_nlink(target, target.path("d"))
    assert_dir_nlink(target, target.path("d/new"))
    os.rmdir(target.path("d/a"))
    assert_dir_nlink(target, target.path("d"))
    os.rename(target.path("d/new"), target.path("e/moved"))
    assert_dir_nlink(target, target.path("d"))
    assert_dir_nlink(target, target.path("e"))


def test_fresh_directory_nlink_is_exact(target: Target) -> None:
    os.mkdir(target.path("d"))
    assert os.stat(target.path("d")).st_nlink == 2
    for i in range(3):
        os.mkdir(target.path(f"d/s{i}"))
    write_file(target.path("d/f"), b"")
    assert os.stat(target.path("d")).st_nlink == 5
    os.rmdir(target.path("d/s0"))
    assert os.stat(target.path("d")).st_nlink == 4


TYPES_TREE: Tree = {
    "file": File(b"f"),
    "dir": Dir(),
    "dir/inner": b"i",
    "link": Symlink("file"),
    "fifo": Fifo(),
    "gone": b"to be deleted",
    "gonedir": Dir(),
    "changed": b"to be rewritten",
}


@tree(TYPES_TREE)
def test_readdir_lists_exactly_the_entries(target: Target) -> None:
    os.unlink(target.path("gone"))
    os.rmdir(target.path("gonedir"))
    write_file(target.path("changed"), b"rewritten")
    write_file(target.path("added"), b"a")
    os.mkdir(target.path("addeddir"))
    os.chmod(target.path("dir"), 0o700)  # copy-up of a directory
    want = {"file": DT_REG, "dir": DT_DIR, "link": DT_LNK, "fifo": DT_FIFO,
            "changed": DT_REG, "added": DT_REG, "addeddir": DT_DIR}
    entries = getdents(target.root)
    names = [name for _, _, name in entries]
    assert sorted(names) == sorted([b".", b"..", *(n.encode() for n in want)]), names
    for ino, dtype, name in entries:
        if name in (b".", b".."):
            continue
        st = os.lstat(target.path(name.decode()))
        assert dtype == want[name.decode()], name
        assert ino == st.st_ino, f"d_ino of {name!r} is {ino}, st_ino {st.st_ino}"
    assert ls(target) == sorted(want)
    with os.scandir(target.root) as it:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it}
    assert kinds["dir"] == (True, False)
    assert kinds["link"] == (False, True)
    assert ls(target, "dir") == ["inner"]


@tree({f"lower-{i:04d}-{'x' * 60}": b"" for i in range(300)})
def test_readdir_large_directory(target: Target) -> None:
    for i in range(0, 300, 3):
        os.unlink(target.path(f"lower-{i:04d}-{'x' * 60}"))
    for i in range(200):
        write_file(target.path(f"upper-{i:04d}-{'y' * 60}"), b"")
    want = sorted([f"lower-{i:04d}-{'x' * 60}" for i in range(300) if i % 3]
                  + [f"upper-{i:04d}-{'y' * 60}" for i in range(200)])
    # small buffers: many getdents calls, each resuming at the offset the previous one left
    entries = getdents(target.root, bufsize=1024)
    names = [n.decode() for _, _, n in entries if n not in (b".", b"..")]
    assert len(names) == len(set(names)), "duplicate entries"
    assert sorted(names) == want
    assert ls(target) == want


@tree({"d": Dir(), "d/a": b"a", "d/b": b"b", "d/c": b"c"})
def test_readdir_after_changes_while_open(target: Target) -> None:
    """Entries neither added nor removed during the listing are reported exactly once."""
    fd = os.open(target.path("d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as it:
            first = next(it).name
            os.unlink(target.path(f"d/{first}"))
            rest = [e.name for e in it]
    finally:
        os.close(fd)
    seen = [first, *rest]
    assert len(seen) == len(set(seen))
    assert {"a", "b", "c"} - {first} <= set(rest)
    assert ls(target, "d") == sorted({"a", "b", "c"} - {first})


@tree({"d": Dir(mode=0o711, uid=1000, gid=1000), "d/x": b""})
def test_directory_mode_and_owner_from_tree(target: Target) -> None:
    st = os.stat(target.path("d"))
    assert stat.S_IMODE(st.st_mode) == 0o711
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    write_file(target.path("d/y"), b"")  # copies the directory up, keeps its attributes
    st = os.stat(target.path("d"))
    assert stat.S_IMODE(st.st_mode) == 0o711
    assert (st.st_uid, st.st_gid) == (1000, 1000)


@tree({"f": b"was a file", "d": Dir(), "d/x": b"x"})
def test_entry_changes_type(target: Target) -> None:
    os.unlink(target.path("f"))
    os.mkdir(target.path("f"))
    assert stat.S_ISDIR(os.lstat(target.path("f")).st_mode)
    assert ls(target, "f") == []
    os.unlink(target.path("d/x"))
    os.rmdir(target.path("d"))
    write_file(target.path("d"), b"now a file")
    assert stat.S_ISREG(os.lstat(target.path("d")).st_mode)
    assert read_all(target.path("d")) == b"now a file"
    with expect_errno(errno.ENOTDIR):
        os.stat(target.path("d/x"))
    assert ls(target) == ["d", "f"]
    entries = {name: dtype for _, dtype, name in getdents(target.root)}
    assert (entries[b"f"], entries[b"d"]) == (DT_DIR, DT_REG)
