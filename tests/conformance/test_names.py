"""Name and path lengths, special files (mknod), inode numbers and st_dev."""

from __future__ import annotations

import errno
import os
import stat

from tests.conformance.support import (
    Dir,
    Fifo,
    File,
    Target,
    expect_errno,
    parent_fd,
    read_all,
    tree,
    write_file,
)

NAME_MAX = 255
LONG = "n" * NAME_MAX
LONG_LOWER = "l" * NAME_MAX

COMPONENT = 200
# 19 levels of 200-byte names: 3819 bytes, plus the file name, from the test directory (and
# still under PATH_MAX from the mount root, whose test directory names are short)
DEPTH = 19
DEEP_DIR = "/".join(f"{i:02d}" + "d" * (COMPONENT - 2) for i in range(DEPTH))
DEEP_FILE = DEEP_DIR + "/leaf-" + "f" * 100


def test_deep_path_constants() -> None:
    assert 3900 < len(DEEP_FILE) < 4096 - 100


@tree({LONG_LOWER: b"lower long", "dir": Dir(), f"dir/{LONG_LOWER}": Dir()})
def test_name_max(target: Target) -> None:
    write_file(target.path(LONG), b"long name")
    assert read_all(target.path(LONG)) == b"long name"
    assert LONG in os.listdir(target.root)
    os.mkdir(target.path("d" * NAME_MAX))
    os.symlink(LONG, target.path("s" * NAME_MAX))
    assert os.readlink(target.path("s" * NAME_MAX)) == LONG
    os.rename(target.path(LONG), target.path("r" * NAME_MAX))
    for too_long in ("x" * (NAME_MAX + 1), "y" * 1000):
        with expect_errno(errno.ENAMETOOLONG):
            os.open(target.path(too_long), os.O_WRONLY | os.O_CREAT, 0o644)
        with expect_errno(errno.ENAMETOOLONG):
            os.stat(target.path(too_long))
        with expect_errno(errno.ENAMETOOLONG):
            os.mkdir(target.path(too_long))
        with expect_errno(errno.ENAMETOOLONG):
            os.rename(target.path("r" * NAME_MAX), target.path(too_long))
    # names of the longest length from the initial tree can be removed (a union must be able
    # to hide them although ".wh." + name would be too long)
    assert read_all(target.path(LONG_LOWER)) == b"lower long"
    os.unlink(target.path(LONG_LOWER))
    os.rmdir(target.path(f"dir/{LONG_LOWER}"))
    assert sorted(os.listdir(target.root)) == sorted(
        ["d" * NAME_MAX, "s" * NAME_MAX, "r" * NAME_MAX, "dir"])
    assert os.listdir(target.path("dir")) == []
    with expect_errno(errno.ENOENT):
        os.stat(target.path(LONG_LOWER))


def _make_deep(root_fd: int) -> None:
    fd = root_fd
    try:
        for comp in DEEP_DIR.split("/"):
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        write_file(DEEP_FILE.rsplit("/", 1)[1], b"at the bottom", dir_fd=fd)
    finally:
        if fd != root_fd:
            os.close(fd)


def test_deep_path_fresh(target: Target) -> None:
    _make_deep(target.fd)
    # one relative path of ~3.9 KB resolves in one call
    assert read_all(DEEP_FILE, dir_fd=target.fd) == b"at the bottom"
    st = os.stat(DEEP_FILE, dir_fd=target.fd)
    assert st.st_size == len(b"at the bottom")
    write_file(DEEP_FILE, b"rewritten", os.O_WRONLY | os.O_TRUNC, dir_fd=target.fd)
    assert read_all(DEEP_FILE, dir_fd=target.fd) == b"rewritten"
    os.rename(DEEP_FILE, DEEP_DIR + "/renamed", src_dir_fd=target.fd, dst_dir_fd=target.fd)
    with parent_fd(target.fd, DEEP_DIR + "/renamed") as (pfd, _):
        assert os.listdir(pfd) == ["renamed"]
    with expect_errno(errno.ENAMETOOLONG):
        os.stat(DEEP_DIR + "/" + DEEP_DIR[:300], dir_fd=target.fd)


@tree({DEEP_FILE: File(b"deep lower file", mode=0o640)})
def test_deep_path_from_initial_tree(target: Target) -> None:
    """Changing a file 19 levels down copies up ~3.9 KB of parents in a union."""
    assert read_all(DEEP_FILE, dir_fd=target.fd) == b"deep lower file"
    os.chmod(DEEP_FILE, 0o600, dir_fd=target.fd)
    write_file(DEEP_FILE, b"!", os.O_WRONLY, dir_fd=target.fd)
    assert read_all(DEEP_FILE, dir_fd=target.fd) == b"!eep lower file"
    st = os.stat(DEEP_FILE, dir_fd=target.fd)
    assert stat.S_IMODE(st.st_mode) == 0o600
    with parent_fd(target.fd, DEEP_FILE) as (pfd, name):
        os.link(name, "hard", src_dir_fd=pfd, dst_dir_fd=pfd)
        os.symlink(name, "soft", dir_fd=pfd)
        assert sorted(os.listdir(pfd)) == sorted([name, "hard", "soft"])
        os.unlink(name, dir_fd=pfd)
        with expect_errno(errno.ENOENT):  # dangling now
            read_all("soft", dir_fd=pfd)
        assert read_all("hard", dir_fd=pfd) == b"!eep lower file"
        os.unlink("hard", dir_fd=pfd)
        os.unlink("soft", dir_fd=pfd)
        assert os.listdir(pfd) == []
    # and the whole chain can be removed, deepest first
    parts = DEEP_DIR.split("/")
    for i in range(len(parts), 0, -1):
        os.rmdir("/".join(parts[:i]), dir_fd=target.fd)
    assert os.listdir(target.root) == []


@tree({"lowerfifo": Fifo(mode=0o640)})
def test_fifo(target: Target) -> None:
    os.mkfifo(target.path("fifo"), 0o600)
    st = os.lstat(target.path("fifo"))
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 0
    for name in ("fifo", "lowerfifo"):
        r = os.open(target.path(name), os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(target.path(name), os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(w, b"through the pipe")
            assert os.read(r, 100) == b"through the pipe"
        finally:
            os.close(r)
            os.close(w)
    st = os.lstat(target.path("lowerfifo"))
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    os.chmod(target.path("lowerfifo"), 0o600)  # copy-up of a fifo
    assert stat.S_IMODE(os.lstat(target.path("lowerfifo")).st_mode) == 0o600
    assert stat.S_ISFIFO(os.lstat(target.path("lowerfifo")).st_mode)
    with expect_errno(errno.EEXIST):
        os.mkfifo(target.path("fifo"))
    os.unlink(target.path("lowerfifo"))
    assert os.listdir(target.root) == ["fifo"]


def test_mknod_regular_and_devices(target: Target) -> None:
    os.mknod(target.path("reg"), stat.S_IFREG | 0o640)
    st = os.lstat(target.path("reg"))
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 0
    os.mknod(target.path("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(target.path("null"))
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(target.root)) == ["null", "reg"]


def test_mknod_whiteout_lookalike(target: Target) -> None:
    """A 0/0 character device is a whiteout to a union: creating one must not make it vanish.

    Linux file systems allow it; kernel overlayfs refuses it with EPERM. Either is fine, but
    if it succeeds it must be an ordinary, visible device.
    """
    try:
        os.mknod(target.path("c00"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
    except PermissionError:
        assert os.listdir(target.root) == []
        return
    st = os.lstat(target.path("c00"))
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    assert os.listdir(target.root) == ["c00"]


@tree({"f": b"lower", "d": Dir(), "d/g": b"g"})
def test_inode_numbers_are_stable(target: Target) -> None:
    ino_f = os.stat(target.path("f")).st_ino
    ino_d = os.stat(target.path("d")).st_ino
    ino_g = os.stat(target.path("d/g")).st_ino
    assert len({ino_f, ino_d, ino_g, os.stat(target.root).st_ino}) == 4
    os.chmod(target.path("f"), 0o600)  # copy-up
    write_file(target.path("d/g"), b"G", os.O_WRONLY)
    assert os.stat(target.path("f")).st_ino == ino_f
    assert os.stat(target.path("d")).st_ino == ino_d
    assert os.stat(target.path("d/g")).st_ino == ino_g
    os.rename(target.path("d/g"), target.path("moved"))
    assert os.stat(target.path("moved")).st_ino == ino_g
    devs = {os.lstat(target.path(n)).st_dev for n in (".", "f", "d", "moved")}
    assert len(devs) == 1, "one file system, one st_dev"


@tree({"f": b"x"})
def test_dot_and_dotdot(target: Target) -> None:
    os.mkdir(target.path("d"))
    root = os.stat(target.root)
    assert os.stat(os.path.join(target.root, "d/..")).st_ino == root.st_ino
    assert os.stat(os.path.join(target.root, ".")).st_ino == root.st_ino
    assert read_all(os.path.join(target.root, "d/../f")) == b"x"
