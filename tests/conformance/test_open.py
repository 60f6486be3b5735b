"""open(2) flags, reads and writes at offsets, sparse files, truncate, open-unlinked files."""

from __future__ import annotations

import errno
import mmap
import os
import stat

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

OLD_NS = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds
BIG = bytes(range(256)) * 64  # 16 KiB, not all zeros


def test_creat_new_file(target: Target) -> None:
    fd = os.open(target.path("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_size == 0
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert os.write(fd, b"hello") == 5
    finally:
        os.close(fd)
    assert read_all(target.path("new")) == b"hello"
    assert os.listdir(target.root) == ["new"]


def test_creat_mode_honours_umask(target: Target) -> None:
    os.umask(0o027)
    fd = os.open(target.path("f"), os.O_WRONLY | os.O_CREAT, 0o777)
    os.close(fd)
    assert stat.S_IMODE(os.stat(target.path("f")).st_mode) == 0o750


@tree({"f": b"old content", "l": Symlink("dangling"), "d": Dir()})
def test_o_excl_on_existing(target: Target) -> None:
    for name in ("f", "l", "d"):  # O_EXCL never follows a symlink, even a dangling one
        with expect_errno(errno.EEXIST):
            os.open(target.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    assert read_all(target.path("f")) == b"old content"
    assert not os.path.lexists(target.path("dangling"))


@tree({"f": b"old content"})
def test_o_creat_on_existing_keeps_content(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.read(fd, 100) == b"old content"
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(target.path("f")).st_mode) == 0o644


@tree({"l": Symlink("sub/target"), "sub": Dir()})
def test_o_creat_through_dangling_symlink_creates_target(target: Target) -> None:
    write_file(target.path("l"), b"via link")
    assert read_all(target.path("sub/target")) == b"via link"
    assert os.readlink(target.path("l")) == "sub/target"
    assert sorted(os.listdir(target.path("sub"))) == ["target"]


@tree({"f": BIG})
def test_o_trunc(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"short")
    finally:
        os.close(fd)
    assert os.stat(target.path("f")).st_size == 5
    assert read_all(target.path("f")) == b"short"


@tree({"f": File(b"0123456789", mtime_ns=OLD_NS)})
def test_open_for_write_without_writing_changes_nothing(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    os.close(fd)
    st = os.stat(target.path("f"))
    assert st.st_mtime_ns == OLD_NS
    assert st.st_size == 10
    assert read_all(target.path("f")) == b"0123456789"


@tree({"f": b"start"})
def test_o_append_writes_at_end(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_WRONLY | os.O_APPEND)
    other = os.open(target.path("f"), os.O_WRONLY)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"-one")
        os.write(other, b"XX")  # overwrites the start; the next append still goes to the end
        os.write(fd, b"-two")
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(b"XXart-one-two")
        os.pwrite(other, b"!", 0)
    finally:
        os.close(fd)
        os.close(other)
    assert read_all(target.path("f")) == b"!Xart-one-two"


@tree({"f": b"data"})
def test_o_directory_on_file(target: Target) -> None:
    with expect_errno(errno.ENOTDIR):
        os.open(target.path("f"), os.O_RDONLY | os.O_DIRECTORY)


@tree({"f": b"data", "l": Symlink("f"), "ld": Symlink("d"), "d": Dir()})
def test_o_nofollow_on_symlink(target: Target) -> None:
    with expect_errno(errno.ELOOP):
        os.open(target.path("l"), os.O_RDONLY | os.O_NOFOLLOW)
    with expect_errno(errno.ENOTDIR):  # Linux checks O_DIRECTORY first
        os.open(target.path("ld"), os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    # only the last component is not followed
    fd = os.open(target.path("ld/../f"), os.O_RDONLY | os.O_NOFOLLOW)
    os.close(fd)
    # O_PATH|O_NOFOLLOW opens the link itself
    fd = os.open(target.path("l"), os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


@tree({"d": Dir(), "d/x": b"x"})
def test_open_directory_for_write(target: Target) -> None:
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT, os.O_RDWR | os.O_TRUNC):
        with expect_errno(errno.EISDIR):
            os.open(target.path("d"), flags, 0o644)
    fd = os.open(target.path("d"), os.O_RDONLY)
    os.close(fd)


@tree({"f": b"data"})
def test_open_missing(target: Target) -> None:
    with expect_errno(errno.ENOENT):
        os.open(target.path("missing"), os.O_RDONLY)
    with expect_errno(errno.ENOENT):
        os.open(target.path("nodir/new"), os.O_WRONLY | os.O_CREAT, 0o644)
    with expect_errno(errno.ENOTDIR):
        os.open(target.path("f/x"), os.O_RDONLY)
    with expect_errno(errno.ENOTDIR):
        os.open(target.path("f/x"), os.O_WRONLY | os.O_CREAT, 0o644)


@tree({"f": BIG})
def test_read_lower_content_at_offsets(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 0) == BIG[:10]
        assert os.pread(fd, 100, 5000) == BIG[5000:5100]
        assert os.pread(fd, 100, len(BIG) - 10) == BIG[-10:]
        assert os.pread(fd, 100, len(BIG)) == b""
        assert os.pread(fd, 100, len(BIG) + 1000) == b""
        os.lseek(fd, 100, os.SEEK_SET)
        assert os.read(fd, 3) == BIG[100:103]
        assert os.lseek(fd, 0, os.SEEK_END) == len(BIG)
    finally:
        os.close(fd)


@tree({"f": BIG})
def test_write_at_offsets(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"MIDDLE", 8000) == 6
        assert os.pwrite(fd, b"END", len(BIG) - 1) == 3
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"AB")
        assert os.fstat(fd).st_size == len(BIG) + 2
    finally:
        os.close(fd)
    want = bytearray(BIG)
    want[8000:8006] = b"MIDDLE"
    want[len(BIG) - 1:] = b"END"
    want[0:2] = b"AB"
    assert read_all(target.path("f")) == bytes(want)


def test_sparse_file(target: Target) -> None:
    off = (1 << 20) + 10
    fd = os.open(target.path("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"head", 0)
        os.pwrite(fd, b"tail", off)
        st = os.fstat(fd)
        assert st.st_size == off + 4
        assert os.pread(fd, 4096, 8192) == b"\0" * 4096
    finally:
        os.close(fd)
    data = read_all(target.path("sparse"))
    assert len(data) == off + 4
    assert data[:4] == b"head"
    assert data[off:] == b"tail"
    assert data[4:off].count(0) == off - 4
    st = os.stat(target.path("sparse"))
    assert st.st_blocks * 512 < 1 << 20, "the hole takes up space"


@tree({"f": b"lower data"})
def test_extend_lower_file_leaves_hole(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"far", 100_000)
    finally:
        os.close(fd)
    data = read_all(target.path("f"))
    assert len(data) == 100_003
    assert data[:10] == b"lower data"
    assert data[10:100_000] == b"\0" * 99_990
    assert data[100_000:] == b"far"


@tree({"f": BIG})
def test_truncate_shrink_and_grow(target: Target) -> None:
    os.truncate(target.path("f"), 100)
    assert os.stat(target.path("f")).st_size == 100
    assert read_all(target.path("f")) == BIG[:100]
    os.truncate(target.path("f"), 5000)
    assert os.stat(target.path("f")).st_size == 5000
    assert read_all(target.path("f")) == BIG[:100] + b"\0" * 4900
    os.truncate(target.path("f"), 0)
    assert read_all(target.path("f")) == b""


@tree({"f": BIG})
def test_ftruncate_shrink_and_grow(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        assert os.fstat(fd).st_size == 10
        assert os.pread(fd, 100, 0) == BIG[:10]
        os.ftruncate(fd, 20)
        assert os.pread(fd, 100, 0) == BIG[:10] + b"\0" * 10
        # a shrink and regrow zeroes the cut-off part, also in the page cache
        os.pwrite(fd, b"x" * 20, 0)
        os.ftruncate(fd, 5)
        os.ftruncate(fd, 20)
        assert os.pread(fd, 100, 0) == b"x" * 5 + b"\0" * 15
    finally:
        os.close(fd)
    assert os.stat(target.path("f")).st_size == 20


@tree({"d": Dir()})
def test_truncate_errors(target: Target) -> None:
    with expect_errno(errno.EISDIR):
        os.truncate(target.path("d"), 0)
    with expect_errno(errno.ENOENT):
        os.truncate(target.path("missing"), 0)
    fd = os.open(target.path("f"), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        with expect_errno(errno.EINVAL, errno.EBADF):
            os.ftruncate(fd, 0)  # not open for writing
    finally:
        os.close(fd)
    with expect_errno(errno.EINVAL):
        os.truncate(target.path("f"), -1)


@tree({"f": b"still here"})
def test_unlinked_open_file_stays_readable(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    try:
        os.unlink(target.path("f"))
        assert not os.path.lexists(target.path("f"))
        assert os.listdir(target.root) == []
        assert os.pread(fd, 100, 0) == b"still here"
        st = os.fstat(fd)
        assert st.st_nlink == 0
        assert st.st_size == 10
        os.pwrite(fd, b"!", 10)
        assert os.pread(fd, 100, 0) == b"still here!"
        assert os.fstat(fd).st_size == 11
        # the name is free again, for a different file
        write_file(target.path("f"), b"new")
        assert os.pread(fd, 100, 0) == b"still here!"
        assert read_all(target.path("f")) == b"new"
    finally:
        os.close(fd)


@tree({"f": b"read me after unlink"})
def test_unlinked_readonly_fd_keeps_reading(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDONLY)
    try:
        os.unlink(target.path("f"))
        assert os.pread(fd, 100, 0) == b"read me after unlink"
        assert os.fstat(fd).st_size == 20
        # (st_nlink is not checked here: kernel overlayfs reports the lower file's count)
    finally:
        os.close(fd)
    assert os.listdir(target.root) == []


@tree({"f": b"lower"})
def test_readonly_fd_sees_later_writes(target: Target) -> None:
    """An fd opened for reading before another fd writes sees the new data (coherence)."""
    ro = os.open(target.path("f"), os.O_RDONLY)
    try:
        assert os.pread(ro, 100, 0) == b"lower"
        write_file(target.path("f"), b"UPPER!", os.O_WRONLY)
        assert os.pread(ro, 100, 0) == b"UPPER!"
        assert os.fstat(ro).st_size == 6
    finally:
        os.close(ro)


@tree({"f": b"lower"})
def test_fd_survives_rename(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        os.rename(target.path("f"), target.path("g"))
        os.pwrite(fd, b"L", 0)
        assert os.fstat(fd).st_ino == ino
    finally:
        os.close(fd)
    assert read_all(target.path("g")) == b"Lower"


@tree({"f": b"A" * 8192})
def test_mmap_shared_write(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR)
    try:
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            assert m[:4] == b"AAAA"
            m[4096:4100] = b"BBBB"
            m.flush()
        assert os.pread(fd, 4, 4096) == b"BBBB"
    finally:
        os.close(fd)
    assert read_all(target.path("f")) == b"A" * 4096 + b"BBBB" + b"A" * 4092


def test_fsync_and_fdatasync(target: Target) -> None:
    fd = os.open(target.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(target.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
