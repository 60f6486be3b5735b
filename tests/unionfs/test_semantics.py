"""Mounted tests of the union's own semantics: fall-through, whiteouts, opaque directories,
copy-up, and the on-disk formats it reads and writes."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from pathlib import Path

import pytest

from .conftest import Stack, write


def _chardev_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def test_lookup_falls_through_top_first(stack: Stack) -> None:
    write(stack.lowers[0] / "a", "top")
    write(stack.lowers[1] / "a", "bottom")
    write(stack.lowers[1] / "only-bottom", "b")
    write(stack.lowers[1] / "d" / "x", "x")
    write(stack.lowers[0] / "d" / "y", "y")
    with stack.mount():
        m = stack.mnt
        assert (m / "a").read_text() == "top"
        assert (m / "only-bottom").read_text() == "b"
        assert sorted(os.listdir(m / "d")) == ["x", "y"]
        assert sorted(os.listdir(m)) == ["a", "d", "only-bottom"]


@pytest.mark.parametrize("encoding", ["chardev", "oci", "xattr-whiteout"])
def test_whiteout_encodings_hide_lower_names(stack: Stack, encoding: str) -> None:
    write(stack.lowers[1] / "gone", "data")
    write(stack.lowers[1] / "kept", "data")
    top = stack.lowers[0]
    if encoding == "chardev":
        _chardev_whiteout(top / "gone")
    elif encoding == "oci":
        write(top / ".wh.gone")
    else:
        os.setxattr(top, "trusted.overlay.opaque", b"x")
        write(top / "gone")
        os.setxattr(top / "gone", "trusted.overlay.whiteout", b"")
    with stack.mount():
        m = stack.mnt
        assert sorted(os.listdir(m)) == ["kept"]
        assert not (m / "gone").exists()
        assert not (m / ".wh.gone").exists()
        with pytest.raises(FileNotFoundError):
            os.lstat(m / "gone")


def test_oci_whiteout_applies_below_its_own_layer_only(stack: Stack) -> None:
    # an OCI layer may whiteout NAME and add NAME again in the same layer
    write(stack.lowers[1] / "f", "old")
    write(stack.lowers[0] / ".wh.f")
    write(stack.lowers[0] / "f", "new")
    write(stack.lowers[1] / "d" / "old", "o")
    write(stack.lowers[0] / ".wh.d")
    write(stack.lowers[0] / "d" / "new", "n")
    with stack.mount():
        assert (stack.mnt / "f").read_text() == "new"
        assert os.listdir(stack.mnt / "d") == ["new"]


@pytest.mark.parametrize("encoding", ["trusted", "user", "fuseoverlayfs", "marker"])
def test_opaque_encodings_hide_lower_directory(stack: Stack, encoding: str) -> None:
    write(stack.lowers[1] / "d" / "below", "b")
    d = stack.lowers[0] / "d"
    write(d / "above", "a")
    if encoding == "marker":
        write(d / ".wh..wh..opq")
    else:
        name = {"trusted": "trusted.overlay.opaque", "user": "user.overlay.opaque",
                "fuseoverlayfs": "user.fuseoverlayfs.opaque"}[encoding]
        os.setxattr(d, name, b"y")
    with stack.mount():
        m = stack.mnt
        assert os.listdir(m / "d") == ["above"]
        assert not (m / "d" / "below").exists()
        assert all(not n.startswith(("trusted.overlay", "user.overlay", "user.fuseoverlayfs"))
                   for n in os.listxattr(m / "d"))


def test_markers_are_never_shown(stack: Stack) -> None:
    write(stack.lowers[0] / ".wh..wh..opq")
    write(stack.lowers[0] / ".wh.x")
    os.setxattr(stack.lowers[0], "user.overlay.opaque", b"y")
    write(stack.lowers[0] / "plain", "p")
    os.setxattr(stack.lowers[0] / "plain", "user.mine", b"1")
    os.setxattr(stack.lowers[0] / "plain", "user.overlay.origin", b"secret")
    with stack.mount():
        m = stack.mnt
        assert os.listdir(m) == ["plain"]
        assert os.listxattr(m / "plain") == ["user.mine"]
        with pytest.raises(OSError) as ei:
            os.getxattr(m / "plain", "user.overlay.origin")
        assert ei.value.errno == errno.ENODATA
        for name in (".wh..wh..opq", ".wh.x"):
            assert not (m / name).exists()


def test_copy_up_on_write_keeps_metadata_and_lower_intact(stack: Stack) -> None:
    f = write(stack.lowers[1] / "dir" / "f", b"hello", mode=0o640)
    os.chown(f, 1234, 4321)
    os.setxattr(f, "user.k", b"v")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    with stack.mount():
        m = stack.mnt
        with open(m / "dir" / "f", "r+b") as fh:
            fh.seek(0, 2)
            fh.write(b" world")
        assert (m / "dir" / "f").read_bytes() == b"hello world"
    assert f.read_bytes() == b"hello"
    up = stack.upper / "dir" / "f"
    assert up.read_bytes() == b"hello world"
    st = up.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert os.getxattr(up, "user.k") == b"v"
    assert list(os.listdir(stack.work / "work")) == []


def test_copy_up_keeps_holes(stack: Stack) -> None:
    f = stack.lowers[0] / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"middle")
    with stack.mount():
        with open(stack.mnt / "sparse", "r+b") as fh:
            fh.write(b"x")
        with open(stack.mnt / "sparse", "rb") as fh:
            fh.seek(32 << 20)
            assert fh.read(6) == b"middle"
    st = (stack.upper / "sparse").stat()
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 4 << 20, "copy-up filled the holes"


@pytest.mark.parametrize("change", ["chmod", "chown", "utime", "setxattr", "removexattr",
                                    "truncate", "link"])
def test_every_change_copies_up(stack: Stack, change: str) -> None:
    f = write(stack.lowers[0] / "f", b"data")
    os.setxattr(f, "user.a", b"1")
    with stack.mount():
        p = stack.mnt / "f"
        if change == "chmod":
            os.chmod(p, 0o600)
        elif change == "chown":
            os.chown(p, 7, 8)
        elif change == "utime":
            os.utime(p, ns=(5, 6))
        elif change == "setxattr":
            os.setxattr(p, "user.b", b"2")
        elif change == "removexattr":
            os.removexattr(p, "user.a")
        elif change == "truncate":
            os.truncate(p, 2)
        else:
            os.link(p, stack.mnt / "g")
    assert (stack.upper / "f").exists(), "no copy-up"
    assert f.read_bytes() == b"data" and os.getxattr(f, "user.a") == b"1", "lower changed"


def test_unlink_lower_file_leaves_whiteout_without_copying_data(stack: Stack) -> None:
    write(stack.lowers[1] / "d" / "big", b"x" * 100_000)
    with stack.mount():
        os.unlink(stack.mnt / "d" / "big")
        assert not (stack.mnt / "d" / "big").exists()
        assert os.listdir(stack.mnt / "d") == []
    wh = stack.upper / "d" / "big"
    st = os.lstat(wh)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "expected a 0/0 whiteout"
    assert (stack.lowers[1] / "d" / "big").exists()


def test_rmdir_lower_directory(stack: Stack) -> None:
    write(stack.lowers[1] / "d" / "sub" / "f", b"1")
    with stack.mount():
        m = stack.mnt
        with pytest.raises(OSError) as ei:
            os.rmdir(m / "d" / "sub")
        assert ei.value.errno == errno.ENOTEMPTY
        os.unlink(m / "d" / "sub" / "f")
        os.rmdir(m / "d" / "sub")
        assert os.listdir(m / "d") == []
    st = os.lstat(stack.upper / "d" / "sub")
    assert stat.S_ISCHR(st.st_mode)


def test_mkdir_over_whiteout_is_opaque(stack: Stack) -> None:
    write(stack.lowers[0] / "d" / "old", b"1")
    with stack.mount():
        m = stack.mnt
        os.unlink(m / "d" / "old")
        os.rmdir(m / "d")
        os.mkdir(m / "d")
        assert os.listdir(m / "d") == []
        write(m / "d" / "new", b"2")
    with stack.mount():
        assert os.listdir(stack.mnt / "d") == ["new"]
    assert os.getxattr(stack.upper / "d", "trusted.overlay.opaque") == b"y"


def test_create_over_whiteout_and_rename_lower_file(stack: Stack) -> None:
    write(stack.lowers[0] / "a", b"lower-a")
    with stack.mount():
        m = stack.mnt
        os.rename(m / "a", m / "b")
        assert not (m / "a").exists()
        assert (m / "b").read_bytes() == b"lower-a"
        write(m / "a", b"new-a")
        assert (m / "a").read_bytes() == b"new-a"
        assert sorted(os.listdir(m)) == ["a", "b"]


def test_inode_numbers_are_stable_across_copy_up(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"1")
    write(stack.lowers[1] / "g", b"2")
    with stack.mount():
        m = stack.mnt
        before = os.lstat(m / "f").st_ino
        other = os.lstat(m / "g").st_ino
        assert before != other
        with open(m / "f", "ab") as fh:
            fh.write(b"more")
        assert os.lstat(m / "f").st_ino == before
        fd = os.open(m / "f", os.O_RDONLY)
        try:
            assert os.fstat(fd).st_ino == before
        finally:
            os.close(fd)


def test_unlinked_open_file_reads_and_has_zero_links(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"payload")
    with stack.mount():
        m = stack.mnt
        fd = os.open(m / "f", os.O_RDONLY)
        try:
            os.unlink(m / "f")
            assert os.pread(fd, 100, 0) == b"payload"
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        fd = os.open(m / "n", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"new")
            os.unlink(m / "n")
            assert os.pread(fd, 10, 0) == b"new"
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)


def test_names_and_limits(stack: Stack) -> None:
    with stack.mount():
        m = stack.mnt
        write(m / ("n" * 255), b"ok")
        with pytest.raises(OSError) as ei:
            os.open(m / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o600)
        assert ei.value.errno == errno.ENAMETOOLONG
        assert os.statvfs(m).f_namemax <= 251
        with pytest.raises(OSError) as ei:
            os.open(m / ".wh.sneaky", os.O_CREAT | os.O_WRONLY, 0o600)
        assert ei.value.errno == errno.EINVAL


def test_directory_link_counts_include_merged_subdirs(stack: Stack) -> None:
    (stack.lowers[0] / "d" / "a").mkdir(parents=True)
    (stack.lowers[1] / "d" / "b").mkdir(parents=True)
    (stack.lowers[1] / "d" / "c").mkdir(parents=True)
    with stack.mount():
        assert os.lstat(stack.mnt / "d").st_nlink == 5
        os.rmdir(stack.mnt / "d" / "c")
        os.mkdir(stack.mnt / "d" / "e")
        os.mkdir(stack.mnt / "d" / "f")
        assert os.lstat(stack.mnt / "d").st_nlink == 6


def test_read_only_mount_without_upper(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"1")
    with stack.mount(upper=False):
        m = stack.mnt
        assert (m / "f").read_bytes() == b"1"
        for op in (lambda: write(m / "g", b"x"), lambda: os.unlink(m / "f"),
                   lambda: os.mkdir(m / "d")):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EROFS


def test_shared_writable_mmap(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"a" * 8192)
    with stack.mount():
        p = stack.mnt / "f"
        with open(p, "r+b") as fh:
            mm = mmap.mmap(fh.fileno(), 8192)
            mm[100:105] = b"HELLO"
            mm.flush()
            mm.close()
        assert (p.read_bytes())[100:105] == b"HELLO"
    assert (stack.upper / "f").read_bytes()[100:105] == b"HELLO"


def test_reader_opened_before_copy_up_sees_new_data(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"old!")
    with stack.mount():
        p = stack.mnt / "f"
        r = os.open(p, os.O_RDONLY)
        try:
            w = os.open(p, os.O_WRONLY)
            os.pwrite(w, b"new!", 0)
            os.close(w)
            assert os.pread(r, 4, 0) == b"new!"
        finally:
            os.close(r)


def test_hard_links_made_through_the_mount(stack: Stack) -> None:
    write(stack.lowers[0] / "f", b"one")
    with stack.mount():
        m = stack.mnt
        os.link(m / "f", m / "g")
        assert os.lstat(m / "f").st_ino == os.lstat(m / "g").st_ino
        assert os.lstat(m / "g").st_nlink == 2
        with open(m / "g", "wb") as fh:
            fh.write(b"two")
        assert (m / "f").read_bytes() == b"two"
        os.unlink(m / "f")
        assert os.lstat(m / "g").st_nlink == 1


def test_special_files(stack: Stack) -> None:
    with stack.mount():
        m = stack.mnt
        os.mkfifo(m / "fifo")
        assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
        os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.lstat(m / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        os.symlink("/etc/passwd", m / "ln")
        assert os.readlink(m / "ln") == "/etc/passwd"
        assert os.lstat(m / "ln").st_size == len("/etc/passwd")


def test_rename_lower_directory_moves_merged_content_without_copying_data(stack: Stack) -> None:
    write(stack.lowers[1] / "src" / "deep" / "f", b"bottom")
    write(stack.lowers[0] / "src" / "g", b"top")
    write(stack.lowers[1] / "dst" / "stale", b"must stay hidden")
    with stack.mount():
        m = stack.mnt
        os.unlink(m / "dst" / "stale")
        os.rename(m / "src", m / "dst")
        assert not (m / "src").exists()
        assert sorted(os.listdir(m / "dst")) == ["deep", "g"]
        assert (m / "dst" / "deep" / "f").read_bytes() == b"bottom"
        os.rename(m / "dst", m / "moved")
        assert sorted(os.listdir(m)) == ["moved"]
    regular = [p for p in stack.upper.rglob("*") if p.is_file() and not p.is_symlink()]
    assert regular == [], f"file data was copied up: {regular}"
    with stack.mount():  # the move persists across a remount
        assert sorted(os.listdir(stack.mnt / "moved")) == ["deep", "g"]
        assert (stack.mnt / "moved" / "g").read_bytes() == b"top"
        assert not (stack.mnt / "src").exists()


def test_upper_interoperates_with_kernel_overlayfs_both_ways(stack: Stack) -> None:
    write(stack.lowers[1] / "keep", b"k")
    write(stack.lowers[1] / "gone", b"g")
    write(stack.lowers[1] / "d" / "old", b"o")
    write(stack.lowers[1] / "mv" / "inner", b"i")
    with stack.mount():
        m = stack.mnt
        os.unlink(m / "gone")
        os.unlink(m / "d" / "old")
        os.rmdir(m / "d")
        os.mkdir(m / "d")
        write(m / "d" / "new", b"n")
        with open(m / "keep", "ab") as fh:
            fh.write(b"+u")
        os.rename(m / "mv", m / "moved")
    with stack.mount("overlay", options=("redirect_dir=on",)):
        m = stack.mnt
        assert sorted(os.listdir(m)) == ["d", "keep", "moved"]
        assert os.listdir(m / "d") == ["new"]
        assert (m / "keep").read_bytes() == b"k+u"
        assert (m / "moved" / "inner").read_bytes() == b"i"
        # now kernel overlayfs writes, unionfs reads
        os.unlink(m / "keep")
        write(m / "by-kernel", b"kk")
        os.unlink(m / "moved" / "inner")
    with stack.mount():
        m = stack.mnt
        assert sorted(os.listdir(m)) == ["by-kernel", "d", "moved"]
        assert (m / "by-kernel").read_bytes() == b"kk"
        assert os.listdir(m / "moved") == []


@pytest.mark.parametrize("how", ["rename", "rmdir", "exchange", "whiteout"])
def test_a_directory_path_reused_after_the_directory_moved_or_went(stack: Stack, how: str) -> None:
    """Upper directory fds are cached by path (Branch.dir_fd): after a directory there moves
    or goes, its path (and paths below it) must reach whatever holds the path now."""
    write(stack.lowers[0] / "low" / "x", b"lower")
    with stack.mount():
        m = stack.mnt
        (m / "d" / "sub").mkdir(parents=True)
        write(m / "d" / "sub" / "old", b"old")
        write(m / "low" / "new", b"n")  # the upper now holds low/ too
        if how == "rename":
            os.rename(m / "d", m / "e")
        elif how == "exchange":
            (m / "e").mkdir()
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.renameat2(-100, bytes(m / "d"), -100, bytes(m / "e"), 2) == 0  # EXCHANGE
            os.rename(m / "d", m / "gone")
        elif how == "whiteout":
            os.unlink(m / "low" / "x")
            os.unlink(m / "low" / "new")
            os.rmdir(m / "low")
            (m / "low").mkdir()
            write(m / "low" / "again", b"a")
        else:
            os.unlink(m / "d" / "sub" / "old")
            os.rmdir(m / "d" / "sub")
            os.rmdir(m / "d")
        if how != "whiteout":
            (m / "d" / "sub").mkdir(parents=True)
            write(m / "d" / "sub" / "fresh", b"f")
            assert os.listdir(m / "d" / "sub") == ["fresh"]
            assert sorted(os.listdir(stack.upper / "d" / "sub")) == ["fresh"]
        else:
            assert os.listdir(m / "low") == ["again"]
            assert "again" in os.listdir(stack.upper / "low")
            assert "x" not in os.listdir(stack.upper / "low")
        if how in ("rename", "exchange"):
            assert (m / "e" / "sub" / "old").read_bytes() == b"old"
            assert os.listdir(stack.upper / "e" / "sub") == ["old"]
