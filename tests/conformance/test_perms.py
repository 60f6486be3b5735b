"""chmod/chown and permission checks, the checked calls made by unprivileged users.

`target.as_user(fn)` runs `fn` in a forked child with cwd = the test directory and credentials
USER (1000:1000, no supplementary groups) unless told otherwise, so relative paths are used.
"""

from __future__ import annotations

import errno
import os
import stat

from tests.conformance.support import (
    OTHER,
    USER,
    Dir,
    File,
    Symlink,
    Target,
    expect_errno,
    read_all,
    tree,
    write_file,
)


def mode(path: object) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)  # type: ignore[arg-type]


@tree({"f": b"data", "d": Dir(), "d/g": b"in d"})
def test_other_users_see_the_mount(target: Target) -> None:
    """Needs allow_other on FUSE: without it nobody but the mounter gets past EACCES."""

    def look() -> tuple[list[str], bytes, bytes]:
        os.stat(".")
        return sorted(os.listdir(".")), read_all("f"), read_all("d/g")

    assert target.as_user(look) == (["d", "f"], b"data", b"in d")


@tree({"f": File(b"root's", mode=0o644)})
def test_user_cannot_write_root_0644_file(target: Target) -> None:
    assert target.as_user(lambda: read_all("f")) == b"root's"
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("f", os.O_WRONLY))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("f", os.O_RDWR | os.O_TRUNC))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.truncate("f", 0))
    assert target.as_user(lambda: (os.access("f", os.R_OK), os.access("f", os.W_OK))) == (
        True, False)
    assert read_all(target.path("f")) == b"root's"


@tree({"secret": File(b"s", mode=0o600), "x": File(b"#!/bin/sh\n", mode=0o644)})
def test_user_cannot_read_0600_file(target: Target) -> None:
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("secret", os.O_RDONLY))
    assert target.as_user(lambda: os.access("x", os.X_OK)) is False
    st = target.as_user(lambda: os.stat("secret"))  # stat needs no permission on the file
    assert st.st_size == 1


@tree({".": Dir(mode=0o755), "open": Dir(mode=0o777), "f": b"x"})
def test_user_cannot_create_in_root_0755_dir(target: Target) -> None:
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("new", os.O_WRONLY | os.O_CREAT, 0o644))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.mkdir("newdir"))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.symlink("f", "newlink"))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.unlink("f"))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.rename("f", "open/f"))
    assert sorted(os.listdir(target.root)) == ["f", "open"]

    def create() -> os.stat_result:
        write_file("open/mine", b"m", mode=0o640)
        return os.stat("open/mine")

    st = target.as_user(create)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o640)
    st = os.stat(target.path("open/mine"))
    assert (st.st_uid, st.st_gid) == (USER, USER)


@tree({"d": Dir(mode=0o700), "d/f": b"hidden", "w": Dir(mode=0o733)})
def test_directory_search_and_read_permission(target: Target) -> None:
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.stat("d/f"))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.listdir("d"))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.listdir("w"))  # wx without r: can't list
    target.as_user(lambda: write_file("w/drop", b"ok"))  # but can create
    assert target.as_user(lambda: read_all("w/drop")) == b"ok"


@tree({"f": File(b"g", mode=0o640, gid=USER)})
def test_group_permission(target: Target) -> None:
    assert target.as_user(lambda: read_all("f")) == b"g"  # gid 1000
    with expect_errno(errno.EACCES):
        target.as_user(lambda: read_all("f"), uid=OTHER)
    assert target.as_user(lambda: read_all("f"), uid=OTHER, groups=[USER]) == b"g"


@tree({
    "tmp": Dir(mode=0o1777),
    "tmp/users": File(b"u", mode=0o666, uid=USER, gid=USER),
    "tmp/roots": File(b"r", mode=0o666),
})
def test_sticky_directory(target: Target) -> None:
    assert mode(target.path("tmp")) == 0o1777
    for op in (lambda: os.unlink("tmp/users"), lambda: os.rename("tmp/users", "tmp/taken")):
        with expect_errno(errno.EPERM):
            target.as_user(op, uid=OTHER)
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.unlink("tmp/roots"))
    # a writable file in a sticky dir is still writable by others, just not removable
    target.as_user(lambda: write_file("tmp/users", b"other wrote", os.O_WRONLY), uid=OTHER)

    def own_file() -> None:
        write_file("tmp/others", b"o")
        os.rename("tmp/others", "tmp/others2")
        os.unlink("tmp/others2")

    target.as_user(own_file, uid=OTHER)
    target.as_user(lambda: os.rename("tmp/users", "tmp/users2"))
    target.as_user(lambda: os.unlink("tmp/users2"))
    assert sorted(os.listdir(target.path("tmp"))) == ["roots"]


@tree({"mine": File(b"m", mode=0o644, uid=USER, gid=USER), "roots": File(b"r", mode=0o644)})
def test_owner_chmod_and_non_owner_chmod(target: Target) -> None:
    target.as_user(lambda: os.chmod("mine", 0o600))
    assert mode(target.path("mine")) == 0o600
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.chmod("roots", 0o666))
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.chmod("mine", 0o666), uid=OTHER)
    assert mode(target.path("roots")) == 0o644
    assert mode(target.path("mine")) == 0o600
    # the new mode is enforced
    with expect_errno(errno.EACCES):
        target.as_user(lambda: read_all("mine"), uid=OTHER)


@tree({"f": File(b"f", mode=0o644)})
def test_chmod_by_root_is_enforced(target: Target) -> None:
    os.chmod(target.path("f"), 0o600)
    assert mode(target.path("f")) == 0o600
    with expect_errno(errno.EACCES):
        target.as_user(lambda: read_all("f"))
    os.chmod(target.path("f"), 0o666)
    target.as_user(lambda: write_file("f", b"user wrote", os.O_WRONLY | os.O_TRUNC))
    assert read_all(target.path("f")) == b"user wrote"
    st = os.stat(target.path("f"))
    assert (st.st_uid, st.st_gid) == (0, 0)


@tree({"f": File(b"x", mode=0o2755, uid=USER, gid=0)})
def test_chmod_setgid_cleared_when_not_in_group(target: Target) -> None:
    target.as_user(lambda: os.chmod("f", 0o2775))  # owner, but not in group 0
    assert mode(target.path("f")) == 0o775


@tree({"f": File(b"x", mode=0o6777)})
def test_write_by_non_owner_clears_setid_bits(target: Target) -> None:
    assert mode(target.path("f")) == 0o6777
    target.as_user(lambda: write_file("f", b"y", os.O_WRONLY))
    assert mode(target.path("f")) & (stat.S_ISUID | stat.S_ISGID) == 0
    assert read_all(target.path("f")) == b"y"


@tree({"mine": File(b"m", uid=USER, gid=0), "roots": b"r"})
def test_chown_by_non_root(target: Target) -> None:
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.chown("mine", OTHER, -1))
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.chown("roots", USER, USER))
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.chown("mine", -1, OTHER))  # not a member of OTHER
    target.as_user(lambda: os.chown("mine", -1, USER))  # own group: allowed
    target.as_user(lambda: os.chown("mine", USER, -1))  # to self: a no-op, allowed
    st = os.stat(target.path("mine"))
    assert (st.st_uid, st.st_gid) == (USER, USER)
    st = os.stat(target.path("roots"))
    assert (st.st_uid, st.st_gid) == (0, 0)


@tree({"f": File(b"content", mode=0o4755), "d": Dir(), "d/x": b"x"})
def test_chown_by_root(target: Target) -> None:
    os.chown(target.path("f"), USER, OTHER)
    st = os.stat(target.path("f"))
    assert (st.st_uid, st.st_gid) == (USER, OTHER)
    assert stat.S_IMODE(st.st_mode) & stat.S_ISUID == 0  # chown clears set-user-ID
    assert read_all(target.path("f")) == b"content"
    os.chown(target.path("d"), OTHER, USER)
    st = os.stat(target.path("d"))
    assert (st.st_uid, st.st_gid) == (OTHER, USER)
    assert os.listdir(target.path("d")) == ["x"]
    # the new owner now has the owner's rights
    target.as_user(lambda: os.chmod("f", 0o600))
    target.as_user(lambda: os.mkdir("d/sub"), uid=OTHER)


@tree({"f": b"target", "l": Symlink("f")})
def test_lchown_changes_the_link_not_the_target(target: Target) -> None:
    os.chown(target.path("l"), USER, USER, follow_symlinks=False)
    assert os.lstat(target.path("l")).st_uid == USER
    assert os.stat(target.path("l")).st_uid == 0


@tree({"mine": File(b"m", mode=0o600, uid=USER, gid=USER)})
def test_user_owned_file_permissions(target: Target) -> None:
    """Ownership recorded in the lower branch is honoured, also after copy-up."""
    assert target.as_user(lambda: read_all("mine")) == b"m"
    with expect_errno(errno.EACCES):
        target.as_user(lambda: read_all("mine"), uid=OTHER)
    target.as_user(lambda: write_file("mine", b"changed", os.O_WRONLY | os.O_TRUNC))
    st = os.stat(target.path("mine"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o600)
    with expect_errno(errno.EACCES):
        target.as_user(lambda: read_all("mine"), uid=OTHER)


@tree({"d": Dir(mode=0o755, uid=USER, gid=USER), "d/f": b"x"})
def test_user_owned_directory(target: Target) -> None:
    def work() -> list[str]:
        os.unlink("d/f")
        os.mkdir("d/sub")
        write_file("d/sub/g", b"g")
        os.chmod("d", 0o700)
        return sorted(os.listdir("d"))

    assert target.as_user(work) == ["sub"]
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.listdir("d"), uid=OTHER)
    assert os.stat(target.path("d/sub")).st_uid == USER


@tree({"wo": File(b"", mode=0o622)})
def test_write_only_file(target: Target) -> None:
    """-rw--w--w-: others may write but not read (a writeback cache must not need to read)."""

    def append() -> None:
        write_file("wo", b"one,", os.O_WRONLY | os.O_APPEND)
        write_file("wo", b"two", os.O_WRONLY | os.O_APPEND)

    target.as_user(append)
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("wo", os.O_RDONLY))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.open("wo", os.O_RDWR))
    target.as_user(lambda: write_file("wo", b"TW", os.O_WRONLY), uid=OTHER)
    assert read_all(target.path("wo")) == b"TWe,two"
