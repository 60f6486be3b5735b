"""Shared pieces of the conformance suite: initial trees, the per-test `Target`, syscall wrappers.

A test declares the tree it starts from with `@tree({...})` (relative path -> entry); the
`target` fixture (see conftest.py) materialises it directly (plain), in the lower branch before
mounting (*-lower) or through the mount (*-fresh), and hands the test a `Target` whose `root` is
that directory. Everything here works on directory fds and `*at()` calls, so trees and paths
longer than PATH_MAX from `/` are fine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import pickle
import select
import signal
import stat
import struct
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

R = TypeVar("R")

USER = 1000  # an unprivileged uid/gid pair
OTHER = 1001  # a second one
CHILD_TIMEOUT = 15.0


# --------------------------------------------------------------------------- initial trees


@dataclass(frozen=True)
class File:
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644


@dataclass(frozen=True)
class Hardlink:
    """Another name for the File at `to` (a path in the same tree)."""

    to: str


Entry = bytes | File | Dir | Symlink | Fifo | Hardlink
Tree = Mapping[str, Entry]

TREE_MARKER = "conformance_tree"


def tree(spec: Tree) -> pytest.MarkDecorator:
    """Declare the initial contents of the test directory ("." sets the directory itself)."""
    mark: pytest.MarkDecorator = getattr(pytest.mark, TREE_MARKER)(dict(spec))
    return mark


def _normalise(spec: Tree) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for rel, entry in spec.items():
        rel = rel.strip("/")
        if rel in ("", "."):
            out["."] = entry
            continue
        parts = rel.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), Dir())
        out[rel] = File(entry) if isinstance(entry, bytes) else entry
    # an explicit parent entry given after its children must win over the implied Dir()
    for rel, entry in spec.items():
        rel = rel.strip("/") or "."
        out[rel] = File(entry) if isinstance(entry, bytes) else entry
    return out


@contextlib.contextmanager
def parent_fd(root_fd: int, rel: str) -> Iterator[tuple[int, str]]:
    """(fd of the parent directory of `rel`, last component), walking one component at a time."""
    parts = rel.split("/")
    fd = root_fd
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        yield fd, parts[-1]
    finally:
        if fd != root_fd:
            os.close(fd)


def materialise(root_fd: int, spec: Tree) -> None:
    """Create `spec` below the directory `root_fd` (which must exist), as root."""
    entries = _normalise(spec)
    order = sorted((r for r in entries if r != "."), key=lambda r: (r.count("/"), r))
    for rel in order:
        entry = entries[rel]
        with parent_fd(root_fd, rel) as (pfd, name):
            if isinstance(entry, Dir):
                os.mkdir(name, 0o700, dir_fd=pfd)
            elif isinstance(entry, File):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=pfd)
                try:
                    view = memoryview(entry.data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            elif isinstance(entry, Symlink):
                os.symlink(entry.target, name, dir_fd=pfd)
            elif isinstance(entry, Fifo):
                os.mkfifo(name, 0o600, dir_fd=pfd)
    for rel in order:
        entry = entries[rel]
        if isinstance(entry, Hardlink):
            with parent_fd(root_fd, entry.to) as (sfd, sname), parent_fd(root_fd, rel) as (
                pfd,
                name,
            ):
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
    # metadata: ownership, then mode (chown clears set-id bits), xattrs, times deepest first
    for rel in [*order, "."]:
        entry = entries.get(rel, Dir())
        if not isinstance(entry, File | Dir | Fifo):
            continue
        with _entry_fd(root_fd, rel) as fd:
            if isinstance(entry, File | Dir):
                os.chown(fd, entry.uid, entry.gid)
            os.chmod(fd, entry.mode)
            if isinstance(entry, File | Dir):
                for key, value in entry.xattrs:
                    os.setxattr(fd, key, value)
    for rel in [*sorted(order, key=lambda r: -r.count("/")), "."]:
        entry = entries.get(rel, Dir())
        if isinstance(entry, File | Dir) and entry.mtime_ns is not None:
            with _entry_fd(root_fd, rel) as fd:
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


@contextlib.contextmanager
def _entry_fd(root_fd: int, rel: str) -> Iterator[int]:
    if rel == ".":
        yield root_fd
        return
    with parent_fd(root_fd, rel) as (pfd, name):
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            # O_PATH fds don't do fchmod/fsetxattr/futimens: reopen through /proc for those
            real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        finally:
            os.close(fd)
        try:
            yield real
        finally:
            os.close(real)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class TargetSpec:
    """One place the suite runs: `kind` is plain / overlay / unionfs / fuse-overlayfs."""

    id: str
    kind: str
    variant: str  # "plain", "fresh" (test dir created through the mount) or "lower"

    @property
    def union(self) -> bool:
        return self.kind != "plain"


@dataclass
class Target:
    """What a test gets: its own directory `root` (and an fd on it) on one target."""

    spec: TargetSpec
    root: Path
    fd: int
    in_lower: Path | None = None  # where root lives in the branches (unions only); tests use
    in_upper: Path | None = None  # these only to check the fixture, never to cheat

    def path(self, rel: str) -> Path:
        return self.root / rel

    def as_user(self, fn: Callable[[], R], uid: int = USER, gid: int | None = None,
                groups: Sequence[int] = ()) -> R:
        """Run `fn` in a forked child with cwd = root and only the given credentials.

        An OSError in the child is re-raised here with the same errno; the return value comes
        back pickled.
        """
        return run_as(self.fd, fn, uid, uid if gid is None else gid, groups)


def run_as(cwd_fd: int, fn: Callable[[], R], uid: int, gid: int,
           groups: Sequence[int] = (), timeout: float = CHILD_TIMEOUT) -> R:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            os.fchdir(cwd_fd)  # before dropping privileges: ancestors of root may be 0700
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result: tuple[Any, ...]
            try:
                result = ("ok", fn())
            except OSError as e:
                result = ("oserror", e.errno, e.strerror, e.filename, e.filename2)
            except BaseException:
                result = ("error", traceback.format_exc())
            try:
                data = pickle.dumps(result)
            except Exception:
                data = pickle.dumps(("error", traceback.format_exc()))
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view):]
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child as uid {uid} did not finish in {timeout}s")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
        _reap(pid)
    if not chunks:
        raise RuntimeError(f"child as uid {uid} died without an answer")
    result = pickle.loads(b"".join(chunks))
    if result[0] == "ok":
        return result[1]  # type: ignore[no-any-return]
    if result[0] == "oserror":
        _, eno, strerror, fn1, fn2 = result
        raise OSError(eno, strerror, fn1, None, fn2)
    raise AssertionError(f"child as uid {uid} raised:\n{result[1]}")


def _reap(pid: int) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # SIGKILL is final, even for a child blocked in FUSE
            return
        time.sleep(0.002)


# --------------------------------------------------------------------------- assertions


@contextlib.contextmanager
def expect_errno(*codes: int) -> Iterator[None]:
    """The block must raise OSError with one of `codes`."""
    names = "/".join(errno.errorcode[c] for c in codes)
    try:
        yield
    except OSError as e:
        got = errno.errorcode.get(e.errno or 0, str(e.errno))
        assert e.errno in codes, f"expected {names}, got {got}: {e}"
    else:
        raise AssertionError(f"expected OSError {names}, but the call succeeded")


def read_all(path: Path | str, dir_fd: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        out = []
        while chunk := os.read(fd, 1 << 20):
            out.append(chunk)
        return b"".join(out)
    finally:
        os.close(fd)


def write_file(path: Path | str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               mode: int = 0o644, dir_fd: int | None = None) -> None:
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def subdirs(path: Path) -> int:
    return sum(1 for e in os.scandir(path) if e.is_dir(follow_symlinks=False))


def assert_dir_nlink(target: Target, path: Path) -> None:
    """A directory's st_nlink is 2 + its subdirectories.

    Exception, from kernel overlayfs (the oracle): a directory merged from several branches may
    report 1, the "link count not maintained" convention that find(1) and fts(3) understand.
    Only a directory that exists in a lower branch can be merged, so only *-lower allows it.
    """
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode)
    want = 2 + subdirs(path)
    if target.spec.variant == "lower" and st.st_nlink == 1:
        return
    assert st.st_nlink == want, f"{path}: st_nlink {st.st_nlink}, want {want}"


# --------------------------------------------------------------------------- syscalls

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _check(ret: int, *names: Path | str) -> None:
    if ret < 0:
        eno = ctypes.get_errno()
        raise OSError(eno, os.strerror(eno), *[str(n) for n in names[:1]])


def renameat2(old: Path | str, new: Path | str, flags: int, dir_fd: int = AT_FDCWD) -> None:
    _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                ctypes.c_uint]
    ret = _libc.renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), flags)
    _check(ret, old)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path | str, atime: tuple[int, int], mtime: tuple[int, int],
              follow: bool = True, dir_fd: int = AT_FDCWD) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW / UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    ret = _libc.utimensat(dir_fd, os.fsencode(path), times, 0 if follow else AT_SYMLINK_NOFOLLOW)
    _check(ret, path)


SYS_GETDENTS64 = 217  # x86_64


def getdents(path: Path | str, bufsize: int = 1024) -> list[tuple[int, int, bytes]]:
    """Raw getdents64 over a directory: [(d_ino, d_type, name)], including "." and ".."."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out: list[tuple[int, int, bytes]] = []
    buf = ctypes.create_string_buffer(bufsize)
    _libc.syscall.restype = ctypes.c_long
    try:
        while True:
            n = _libc.syscall(ctypes.c_long(SYS_GETDENTS64), ctypes.c_int(fd), buf,
                              ctypes.c_uint(bufsize))
            _check(n, path)
            if n == 0:
                return out
            raw = buf.raw[:n]
            pos = 0
            while pos < n:
                d_ino, _d_off, reclen, d_type = struct.unpack_from("<QqHB", raw, pos)
                name = raw[pos + 19: pos + reclen].split(b"\0", 1)[0]
                out.append((d_ino, d_type, name))
                pos += reclen
    finally:
        os.close(fd)


DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 1, 2, 4, 6, 8, 10, 12
