"""utimensat(2) and the timestamps that writes, chmod and directory changes update."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from tests.conformance.support import (
    OTHER,
    USER,
    UTIME_NOW,
    UTIME_OMIT,
    Dir,
    File,
    Symlink,
    Target,
    expect_errno,
    read_all,
    tree,
    utimensat,
    write_file,
)

OLD = 1_000_000_000_123_456_789  # 2001-09-09 01:46:40.123456789
OLDER = 900_000_000_987_654_321
TICK = 0.05  # longer than the coarse clock's granularity, so "updated" is visible


def ns(s: int) -> tuple[int, int]:
    return divmod(s, 1_000_000_000)


def now_ns() -> int:
    return time.time_ns()


def assert_recent(t_ns: int, since_ns: int) -> None:
    # the file system clock is coarse (jiffies): allow it to lag time.time_ns() by a bit
    assert since_ns - 50_000_000 <= t_ns <= now_ns() + 1_000_000_000, (t_ns, since_ns)


@tree({"f": File(b"x", mtime_ns=OLD)})
def test_utime_explicit_nanoseconds(target: Target) -> None:
    assert os.stat(target.path("f")).st_mtime_ns == OLD
    os.utime(target.path("f"), ns=(OLDER, OLD + 1))
    st = os.stat(target.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLDER, OLD + 1)
    assert read_all(target.path("f")) == b"x"


@tree({"f": File(b"x", mtime_ns=OLD)})
def test_utime_now(target: Target) -> None:
    before = now_ns()
    os.utime(target.path("f"))  # both UTIME_NOW
    st = os.stat(target.path("f"))
    assert_recent(st.st_mtime_ns, before)
    assert_recent(st.st_atime_ns, before)


@tree({"f": File(b"x", mtime_ns=OLD)})
def test_utime_omit_and_now(target: Target) -> None:
    os.utime(target.path("f"), ns=(OLDER, OLD))
    utimensat(target.path("f"), (0, UTIME_OMIT), ns(OLD + 5))
    st = os.stat(target.path("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLDER, OLD + 5)
    before = now_ns()
    utimensat(target.path("f"), (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.stat(target.path("f"))
    assert st.st_atime_ns == OLDER
    assert_recent(st.st_mtime_ns, before)
    utimensat(target.path("f"), ns(OLD), (0, UTIME_OMIT))
    st2 = os.stat(target.path("f"))
    assert st2.st_atime_ns == OLD
    assert st2.st_mtime_ns == st.st_mtime_ns
    ctime = st2.st_ctime_ns
    time.sleep(TICK)
    utimensat(target.path("f"), (0, UTIME_OMIT), (0, UTIME_OMIT))  # changes nothing at all
    st3 = os.stat(target.path("f"))
    assert (st3.st_atime_ns, st3.st_mtime_ns) == (st2.st_atime_ns, st2.st_mtime_ns)
    assert st3.st_ctime_ns == ctime


@tree({"f": File(b"x", mtime_ns=OLD), "l": Symlink("f")})
def test_utime_on_symlink_itself(target: Target) -> None:
    utimensat(target.path("l"), ns(OLDER), ns(OLDER), follow=False)
    assert os.lstat(target.path("l")).st_mtime_ns == OLDER
    assert os.stat(target.path("f")).st_mtime_ns == OLD


@tree({
    "mine": File(b"m", mode=0o644, uid=USER, gid=USER, mtime_ns=OLD),
    "writable": File(b"w", mode=0o666, mtime_ns=OLD),
    "readonly": File(b"r", mode=0o644, mtime_ns=OLD),
})
def test_utime_permissions(target: Target) -> None:
    target.as_user(lambda: os.utime("mine", ns=(OLDER, OLDER)))  # owner: anything
    assert os.stat(target.path("mine")).st_mtime_ns == OLDER
    target.as_user(lambda: os.utime("writable"))  # write access: only "now"
    assert os.stat(target.path("writable")).st_mtime_ns > OLD
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.utime("writable", ns=(OLDER, OLDER)))
    with expect_errno(errno.EACCES):
        target.as_user(lambda: os.utime("readonly"))
    with expect_errno(errno.EPERM):
        target.as_user(lambda: os.utime("mine", ns=(OLD, OLD)), uid=OTHER)
    assert os.stat(target.path("readonly")).st_mtime_ns == OLD


@tree({"f": File(b"data", mtime_ns=OLD)})
def test_write_updates_mtime_and_ctime(target: Target) -> None:
    ctime = os.stat(target.path("f")).st_ctime_ns
    time.sleep(TICK)
    before = now_ns()
    fd = os.open(target.path("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"D", 0)
    finally:
        os.close(fd)
    st = os.stat(target.path("f"))
    assert_recent(st.st_mtime_ns, before)
    assert st.st_ctime_ns > ctime


@tree({"f": File(b"data", mtime_ns=OLD)})
def test_truncate_updates_mtime_and_ctime(target: Target) -> None:
    ctime = os.stat(target.path("f")).st_ctime_ns
    time.sleep(TICK)
    before = now_ns()
    os.truncate(target.path("f"), 2)
    st = os.stat(target.path("f"))
    assert_recent(st.st_mtime_ns, before)
    assert st.st_ctime_ns > ctime


@tree({"f": File(b"data", mtime_ns=OLD)})
def test_chmod_updates_ctime_only(target: Target) -> None:
    st0 = os.stat(target.path("f"))
    time.sleep(TICK)
    os.chmod(target.path("f"), 0o600)
    st = os.stat(target.path("f"))
    assert st.st_mtime_ns == OLD
    assert st.st_ctime_ns > st0.st_ctime_ns
    time.sleep(TICK)
    os.chown(target.path("f"), USER, USER)
    st2 = os.stat(target.path("f"))
    assert st2.st_mtime_ns == OLD
    assert st2.st_ctime_ns > st.st_ctime_ns


@tree({"f": File(b"data", mtime_ns=OLD), "d": Dir(mtime_ns=OLD), "d/x": b"x"})
def test_reads_and_copy_up_keep_mtime(target: Target) -> None:
    assert read_all(target.path("f")) == b"data"
    fd = os.open(target.path("f"), os.O_RDWR)
    os.close(fd)
    os.chmod(target.path("f"), 0o640)  # forces a copy-up in a union
    os.setxattr(target.path("d"), "user.k", b"v")  # copies up the directory
    assert os.stat(target.path("f")).st_mtime_ns == OLD
    assert os.stat(target.path("d")).st_mtime_ns == OLD


@tree({"d": Dir(mtime_ns=OLD), "d/old": b"o", "e": Dir(mtime_ns=OLD)})
def test_directory_mtime_on_create_unlink_rename(target: Target) -> None:
    before = now_ns()
    ctime = os.stat(target.path("d")).st_ctime_ns
    time.sleep(TICK)
    write_file(target.path("d/new"), b"n")
    st = os.stat(target.path("d"))
    assert_recent(st.st_mtime_ns, before)
    assert st.st_ctime_ns > ctime
    actions: list[tuple[str, Callable[[], None]]] = [
        ("unlink", lambda: os.unlink(target.path("d/old"))),
        ("mkdir", lambda: os.mkdir(target.path("d/sub"))),
        ("rmdir", lambda: os.rmdir(target.path("d/sub"))),
        ("symlink", lambda: os.symlink("x", target.path("d/link"))),
        ("rename", lambda: os.rename(target.path("d/link"), target.path("d/link2"))),
    ]
    for what, action in actions:
        os.utime(target.path("d"), ns=(OLD, OLD))
        action()
        assert os.stat(target.path("d")).st_mtime_ns > OLD, f"{what} left the mtime alone"
    os.utime(target.path("d"), ns=(OLD, OLD))
    os.rename(target.path("d/new"), target.path("e/new"))
    assert os.stat(target.path("d")).st_mtime_ns > OLD
    assert os.stat(target.path("e")).st_mtime_ns > OLD
