"""Extended attributes in the user namespace; a union's own markers never show."""

from __future__ import annotations

import errno
import os

from tests.conformance.support import (
    Dir,
    File,
    Symlink,
    Target,
    expect_errno,
    read_all,
    tree,
    write_file,
)


def user_xattrs(path: object) -> list[str]:
    return sorted(os.listxattr(path, follow_symlinks=False))  # type: ignore[arg-type]


def no_markers(names: list[str]) -> None:
    for n in names:
        assert "overlay" not in n and "fuseoverlayfs" not in n and "unionfs" not in n, names


@tree({"f": File(b"x", xattrs=(("user.lower", b"from lower"),)), "g": b"plain"})
def test_xattr_set_get_list_remove(target: Target) -> None:
    assert os.getxattr(target.path("f"), "user.lower") == b"from lower"
    assert user_xattrs(target.path("f")) == ["user.lower"]
    assert user_xattrs(target.path("g")) == []
    os.setxattr(target.path("f"), "user.added", b"\0binary\xff")
    os.setxattr(target.path("g"), "user.empty", b"")
    assert os.getxattr(target.path("f"), "user.added") == b"\0binary\xff"
    assert os.getxattr(target.path("f"), "user.lower") == b"from lower"  # kept on copy-up
    assert os.getxattr(target.path("g"), "user.empty") == b""
    assert user_xattrs(target.path("f")) == ["user.added", "user.lower"]
    os.removexattr(target.path("f"), "user.lower")
    assert user_xattrs(target.path("f")) == ["user.added"]
    with expect_errno(errno.ENODATA):
        os.getxattr(target.path("f"), "user.lower")
    with expect_errno(errno.ENODATA):
        os.removexattr(target.path("f"), "user.lower")
    assert read_all(target.path("f")) == b"x"


@tree({"f": File(b"x", xattrs=(("user.k", b"v1"),))})
def test_xattr_create_and_replace_flags(target: Target) -> None:
    with expect_errno(errno.EEXIST):
        os.setxattr(target.path("f"), "user.k", b"v2", os.XATTR_CREATE)
    with expect_errno(errno.ENODATA):
        os.setxattr(target.path("f"), "user.new", b"v", os.XATTR_REPLACE)
    os.setxattr(target.path("f"), "user.k", b"v3", os.XATTR_REPLACE)
    assert os.getxattr(target.path("f"), "user.k") == b"v3"
    assert user_xattrs(target.path("f")) == ["user.k"]


@tree({"d": Dir(xattrs=(("user.dir", b"d"),)), "d/x": b"x", "l": Symlink("d")})
def test_xattr_on_directories(target: Target) -> None:
    assert os.getxattr(target.path("d"), "user.dir") == b"d"
    assert os.getxattr(target.path("l"), "user.dir") == b"d"  # follows the link
    os.setxattr(target.path("d"), "user.more", b"m")
    assert user_xattrs(target.path("d")) == ["user.dir", "user.more"]
    assert os.listdir(target.path("d")) == ["x"]


@tree({"d": Dir(), "d/x": b"x", "d/sub": Dir(), "d/sub/y": b"y", "f": b"f"})
def test_no_union_markers_in_xattrs(target: Target) -> None:
    """Whiteouts and opaque directories must not leak into listxattr."""
    os.unlink(target.path("d/x"))  # d now holds a whiteout
    os.unlink(target.path("d/sub/y"))
    os.rmdir(target.path("d/sub"))
    os.mkdir(target.path("d/sub"))  # an opaque directory in a union
    write_file(target.path("f"), b"F", os.O_WRONLY)
    os.link(target.path("f"), target.path("f2"))
    for name in (".", "d", "d/sub", "f", "f2"):
        no_markers(os.listxattr(target.path(name)))
        for key in os.listxattr(target.path(name)):
            os.getxattr(target.path(name), key)  # everything listed can be read
    assert os.listdir(target.path("d")) == ["sub"]
    assert os.listdir(target.path("d/sub")) == []
    with expect_errno(errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM):
        os.getxattr(target.path("d/sub"), "user.overlay.opaque")
