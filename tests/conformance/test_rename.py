"""rename(2) and renameat2(2) corner cases, on files and directories from the initial tree."""

from __future__ import annotations

import errno
import os
import stat

from tests.conformance.support import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    Hardlink,
    Symlink,
    Target,
    expect_errno,
    read_all,
    renameat2,
    tree,
    write_file,
)

FILES = {"a": b"content of a", "b": b"content of b"}


def ls(target: Target, rel: str = ".") -> list[str]:
    return sorted(os.listdir(target.path(rel)))


@tree(FILES)
def test_rename_file_to_new_name(target: Target) -> None:
    ino = os.stat(target.path("a")).st_ino
    os.rename(target.path("a"), target.path("c"))
    assert ls(target) == ["b", "c"]
    assert read_all(target.path("c")) == b"content of a"
    assert os.stat(target.path("c")).st_ino == ino
    with expect_errno(errno.ENOENT):
        os.stat(target.path("a"))


@tree(FILES)
def test_rename_file_over_existing_file(target: Target) -> None:
    fd = os.open(target.path("b"), os.O_RDONLY)  # the replaced file lives on while open
    try:
        os.rename(target.path("a"), target.path("b"))
        assert ls(target) == ["b"]
        assert read_all(target.path("b")) == b"content of a"
        assert os.pread(fd, 100, 0) == b"content of b"
        # st_nlink of the replaced file is not checked: kernel overlayfs shows the lower file's
        # unchanged count through an fd opened read-only (test_open checks a read-write fd)
    finally:
        os.close(fd)
    assert os.stat(target.path("b")).st_nlink == 1


@tree(FILES)
def test_rename_then_recreate_old_name(target: Target) -> None:
    os.rename(target.path("a"), target.path("c"))
    write_file(target.path("a"), b"new a")
    assert ls(target) == ["a", "b", "c"]
    assert read_all(target.path("a")) == b"new a"
    assert read_all(target.path("c")) == b"content of a"


@tree({**FILES, "d": Dir(), "d/x": b"x", "l": Hardlink("a")})
def test_rename_onto_itself_is_a_noop(target: Target) -> None:
    os.rename(target.path("a"), target.path("a"))
    os.rename(target.path("d"), target.path("d"))
    os.rename(target.path("d"), target.path("d/../d"))
    # two links to the same file: POSIX says rename does nothing, both names stay
    os.rename(target.path("a"), target.path("l"))
    assert ls(target) == ["a", "b", "d", "l"]
    assert read_all(target.path("a")) == b"content of a"
    assert os.stat(target.path("a")).st_nlink == 2
    assert ls(target, "d") == ["x"]


@tree({"src": Dir(), "src/f": b"f", "src/sub": Dir(), "src/sub/g": b"g", "dst": Dir()})
def test_rename_dir_over_empty_dir(target: Target) -> None:
    os.rename(target.path("src"), target.path("dst"))
    assert ls(target) == ["dst"]
    assert ls(target, "dst") == ["f", "sub"]
    assert read_all(target.path("dst/sub/g")) == b"g"


@tree({"src": Dir(), "src/f": b"f", "dst": Dir(), "dst/old": b"old"})
def test_rename_dir_over_non_empty_dir(target: Target) -> None:
    with expect_errno(errno.ENOTEMPTY, errno.EEXIST):
        os.rename(target.path("src"), target.path("dst"))
    assert ls(target, "dst") == ["old"]
    assert ls(target, "src") == ["f"]
    # once emptied (in a union: only whiteouts left) the target can be replaced
    os.unlink(target.path("dst/old"))
    os.rename(target.path("src"), target.path("dst"))
    assert ls(target) == ["dst"]
    assert ls(target, "dst") == ["f"]


@tree({"f": b"file", "d": Dir(), "d/x": b"x", "e": Dir()})
def test_rename_file_over_dir_and_dir_over_file(target: Target) -> None:
    with expect_errno(errno.EISDIR):
        os.rename(target.path("f"), target.path("e"))
    with expect_errno(errno.ENOTDIR):
        os.rename(target.path("d"), target.path("f"))
    assert ls(target) == ["d", "e", "f"]
    assert read_all(target.path("f")) == b"file"


@tree({"d": Dir(), "d/sub": Dir(), "d/sub/x": b"x"})
def test_rename_into_own_subdirectory(target: Target) -> None:
    with expect_errno(errno.EINVAL):
        os.rename(target.path("d"), target.path("d/sub/d"))
    with expect_errno(errno.EINVAL):
        os.rename(target.path("d"), target.path("d/new"))
    assert ls(target) == ["d"]
    assert ls(target, "d/sub") == ["x"]


@tree({"f": b"x", "d": Dir()})
def test_rename_missing_and_bad_paths(target: Target) -> None:
    with expect_errno(errno.ENOENT):
        os.rename(target.path("missing"), target.path("g"))
    with expect_errno(errno.ENOENT):
        os.rename(target.path("f"), target.path("nodir/g"))
    with expect_errno(errno.ENOTDIR):
        os.rename(target.path("f"), target.path("f/g"))
    with expect_errno(errno.EBUSY, errno.EINVAL):  # (pathlib would drop the "/.")
        os.rename(os.path.join(target.root, "d/."), target.path("e"))
    assert ls(target) == ["d", "f"]


@tree({"d1": Dir(), "d1/f": b"moved", "d2": Dir(), "d2/other": b"o"})
def test_rename_file_across_directories(target: Target) -> None:
    os.rename(target.path("d1/f"), target.path("d2/g"))
    assert ls(target, "d1") == []
    assert ls(target, "d2") == ["g", "other"]
    assert read_all(target.path("d2/g")) == b"moved"
    os.rmdir(target.path("d1"))  # really empty now


@tree({"d": Dir(), "d/f": b"f", "d/sub": Dir(), "d/sub/g": b"g", "d/l": Symlink("f")})
def test_rename_directory_with_contents(target: Target) -> None:
    """A directory from the lower branch: kernel overlayfs needs redirect_dir for this."""
    os.rename(target.path("d"), target.path("e"))
    assert ls(target) == ["e"]
    assert ls(target, "e") == ["f", "l", "sub"]
    assert read_all(target.path("e/sub/g")) == b"g"
    assert read_all(target.path("e/l")) == b"f"
    # the old name is free and a new directory there is empty
    os.mkdir(target.path("d"))
    assert ls(target, "d") == []
    write_file(target.path("e/new"), b"n")
    assert ls(target, "e") == ["f", "l", "new", "sub"]
    # and moving it back over the new, empty directory works too
    os.rename(target.path("e"), target.path("d"))
    assert ls(target) == ["d"]
    assert ls(target, "d") == ["f", "l", "new", "sub"]


@tree({"a": b"a", "d": Dir(), "d/inner": Dir(), "d/inner/x": b"x"})
def test_rename_subdirectory_up_and_down(target: Target) -> None:
    os.rename(target.path("d/inner"), target.path("inner"))
    assert ls(target) == ["a", "d", "inner"]
    assert ls(target, "d") == []
    os.rename(target.path("d"), target.path("inner/d"))
    assert ls(target, "inner") == ["d", "x"]
    assert ls(target) == ["a", "inner"]


@tree(FILES)
def test_rename_noreplace(target: Target) -> None:
    with expect_errno(errno.EEXIST):
        renameat2(target.path("a"), target.path("b"), RENAME_NOREPLACE)
    assert read_all(target.path("b")) == b"content of b"
    renameat2(target.path("a"), target.path("c"), RENAME_NOREPLACE)
    assert ls(target) == ["b", "c"]
    assert read_all(target.path("c")) == b"content of a"


@tree({**FILES, "d": Dir(), "d/x": b"x"})
def test_rename_exchange(target: Target) -> None:
    ino_a = os.stat(target.path("a")).st_ino
    renameat2(target.path("a"), target.path("b"), RENAME_EXCHANGE)
    assert read_all(target.path("a")) == b"content of b"
    assert read_all(target.path("b")) == b"content of a"
    assert os.stat(target.path("b")).st_ino == ino_a
    # a file and a directory swap too
    renameat2(target.path("a"), target.path("d"), RENAME_EXCHANGE)
    assert stat.S_ISDIR(os.stat(target.path("a")).st_mode)
    assert ls(target, "a") == ["x"]
    assert read_all(target.path("d")) == b"content of b"
    assert ls(target) == ["a", "b", "d"]
    with expect_errno(errno.ENOENT):
        renameat2(target.path("b"), target.path("missing"), RENAME_EXCHANGE)
    with expect_errno(errno.EINVAL):
        renameat2(target.path("b"), target.path("d"), RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert ls(target) == ["a", "b", "d"]
