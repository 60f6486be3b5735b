"""unlink(2), link(2) and link counts, symlink(2) / readlink(2) / lstat(2)."""

from __future__ import annotations

import errno
import os
import stat

from tests.conformance.support import (
    Dir,
    Hardlink,
    Symlink,
    Target,
    expect_errno,
    read_all,
    tree,
    write_file,
)


@tree({"f": b"lower file", "g": b"stays"})
def test_unlink_file(target: Target) -> None:
    os.unlink(target.path("f"))
    assert os.listdir(target.root) == ["g"]
    with expect_errno(errno.ENOENT):
        os.stat(target.path("f"))
    with expect_errno(errno.ENOENT):
        os.unlink(target.path("f"))
    # a new file of the same name does not bring the old content back
    fd = os.open(target.path("f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.read(fd, 100) == b""
    finally:
        os.close(fd)
    assert sorted(os.listdir(target.root)) == ["f", "g"]
    assert stat.S_IMODE(os.stat(target.path("f")).st_mode) == 0o600


@tree({"d": Dir(), "d/x": b"x", "e": Dir()})
def test_unlink_directory(target: Target) -> None:
    with expect_errno(errno.EISDIR):  # Linux; POSIX also allows EPERM
        os.unlink(target.path("d"))
    with expect_errno(errno.EISDIR):
        os.unlink(target.path("e"))
    assert sorted(os.listdir(target.root)) == ["d", "e"]


@tree({"f": b"x"})
def test_unlink_errors(target: Target) -> None:
    with expect_errno(errno.ENOENT):
        os.unlink(target.path("missing"))
    with expect_errno(errno.ENOTDIR):
        os.unlink(target.path("f/x"))


@tree({"f": b"shared"})
def test_link_and_link_counts(target: Target) -> None:
    st = os.stat(target.path("f"))
    assert st.st_nlink == 1
    os.link(target.path("f"), target.path("g"))
    f, g = os.stat(target.path("f")), os.stat(target.path("g"))
    assert (f.st_nlink, g.st_nlink) == (2, 2)
    assert f.st_ino == g.st_ino == st.st_ino
    os.link(target.path("g"), target.path("h"))
    assert os.stat(target.path("f")).st_nlink == 3
    # one file: a write through one name shows through the others
    write_file(target.path("g"), b"changed via g", os.O_WRONLY | os.O_TRUNC)
    assert read_all(target.path("f")) == b"changed via g"
    assert read_all(target.path("h")) == b"changed via g"
    os.chmod(target.path("h"), 0o600)
    assert stat.S_IMODE(os.stat(target.path("f")).st_mode) == 0o600
    os.unlink(target.path("f"))
    assert os.stat(target.path("g")).st_nlink == 2
    assert os.stat(target.path("h")).st_nlink == 2
    os.unlink(target.path("h"))
    assert os.stat(target.path("g")).st_nlink == 1
    assert os.listdir(target.root) == ["g"]
    assert read_all(target.path("g")) == b"changed via g"


@tree({"a": b"one inode", "b": Hardlink("a"), "other": b"o"})
def test_hard_links_from_the_initial_tree(target: Target) -> None:
    """Two names of one lower file stay one file after a write (overlayfs needs index=on)."""
    a, b = os.stat(target.path("a")), os.stat(target.path("b"))
    assert a.st_ino == b.st_ino
    assert (a.st_nlink, b.st_nlink) == (2, 2)
    write_file(target.path("a"), b"written via a", os.O_WRONLY | os.O_TRUNC)
    assert read_all(target.path("b")) == b"written via a"
    assert os.stat(target.path("b")).st_ino == a.st_ino
    os.unlink(target.path("a"))
    assert os.stat(target.path("b")).st_nlink == 1
    assert read_all(target.path("b")) == b"written via a"


@tree({"d": Dir(), "f": b"x", "g": b"y"})
def test_link_errors(target: Target) -> None:
    with expect_errno(errno.EPERM):
        os.link(target.path("d"), target.path("d2"))
    with expect_errno(errno.EEXIST):
        os.link(target.path("f"), target.path("g"))
    with expect_errno(errno.EEXIST):
        os.link(target.path("f"), target.path("d"))
    with expect_errno(errno.ENOENT):
        os.link(target.path("missing"), target.path("h"))
    assert sorted(os.listdir(target.root)) == ["d", "f", "g"]
    assert os.stat(target.path("f")).st_nlink == 1


@tree({"d": Dir(), "d/f": b"deep"})
def test_link_into_other_directory(target: Target) -> None:
    os.mkdir(target.path("e"))
    os.link(target.path("d/f"), target.path("e/f"))
    assert os.stat(target.path("e/f")).st_nlink == 2
    os.unlink(target.path("d/f"))
    assert os.listdir(target.path("d")) == []
    assert read_all(target.path("e/f")) == b"deep"
    assert os.stat(target.path("e/f")).st_nlink == 1


@tree({"f": b"x", "l": Symlink("f")})
def test_link_to_symlink_links_the_symlink(target: Target) -> None:
    os.link(target.path("l"), target.path("l2"), follow_symlinks=False)
    st = os.lstat(target.path("l2"))
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_nlink == 2
    assert os.readlink(target.path("l2")) == "f"


def test_symlink_readlink_lstat(target: Target) -> None:
    write_file(target.path("file"), b"pointed at")
    os.symlink("file", target.path("l"))
    os.symlink("../" + target.root.name + "/file", target.path("rel"))
    assert os.readlink(target.path("l")) == "file"
    st = os.lstat(target.path("l"))
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("file")
    assert stat.S_ISREG(os.stat(target.path("l")).st_mode)
    assert read_all(target.path("l")) == b"pointed at"
    assert read_all(target.path("rel")) == b"pointed at"


@tree({
    "file": b"f",
    "dir": Dir(),
    "dir/inside": b"in",
    "to_file": Symlink("file"),
    "to_dir": Symlink("dir"),
    "dangling": Symlink("nowhere/at/all"),
    "abs": Symlink("/nonexistent-conformance-target"),
    "chain": Symlink("to_file"),
    "loop": Symlink("loop"),
})
def test_symlinks_from_the_initial_tree(target: Target) -> None:
    for name, dest in [("to_file", "file"), ("to_dir", "dir"), ("dangling", "nowhere/at/all"),
                       ("abs", "/nonexistent-conformance-target"), ("chain", "to_file"),
                       ("loop", "loop")]:
        assert os.readlink(target.path(name)) == dest
        st = os.lstat(target.path(name))
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len(dest.encode())
    assert read_all(target.path("chain")) == b"f"
    assert os.listdir(target.path("to_dir")) == ["inside"]
    assert read_all(target.path("to_dir/inside")) == b"in"
    for name in ("dangling", "abs"):
        with expect_errno(errno.ENOENT):
            os.stat(target.path(name))
    with expect_errno(errno.ELOOP):
        os.stat(target.path("loop"))
    # the target directory, not the link, gets the new entry
    write_file(target.path("to_dir/new"), b"n")
    assert sorted(os.listdir(target.path("dir"))) == ["inside", "new"]


@tree({"f": b"x", "l": Symlink("f"), "d": Dir()})
def test_symlink_errors(target: Target) -> None:
    for existing in ("f", "l", "d"):
        with expect_errno(errno.EEXIST):
            os.symlink("whatever", target.path(existing))
    with expect_errno(errno.EINVAL):
        os.readlink(target.path("f"))
    with expect_errno(errno.EINVAL):
        os.readlink(target.path("d"))
    with expect_errno(errno.ENOENT):
        os.readlink(target.path("missing"))
    with expect_errno(errno.ENOENT):
        os.symlink("f", target.path("nodir/l"))


def test_long_symlink_target(target: Target) -> None:
    dest = "x/" * 2047 + "y"  # 4095 bytes: the longest Linux allows
    os.symlink(dest, target.path("long"))
    assert os.readlink(target.path("long")) == dest
    assert os.lstat(target.path("long")).st_size == 4095
    with expect_errno(errno.ENAMETOOLONG):
        os.symlink(dest + "z", target.path("toolong"))


@tree({"l": Symlink("old target"), "f": b"keep"})
def test_replace_symlink(target: Target) -> None:
    os.unlink(target.path("l"))
    os.symlink("f", target.path("l"))
    assert os.readlink(target.path("l")) == "f"
    assert os.lstat(target.path("l")).st_size == 1
    assert read_all(target.path("l")) == b"keep"
    os.symlink("new target", target.path("tmp"))
    os.rename(target.path("tmp"), target.path("l"))
    assert os.readlink(target.path("l")) == "new target"
    assert sorted(os.listdir(target.root)) == ["f", "l"]
