"""Hostile input: symlinks pointing out of the branches, swapped branch directories, names made of
every byte, a full upper file system, a read-only one, and a handler bug.

Symlinks. The lower and upper branches hold symlinks whose targets lie outside the branches: an
absolute path to a sentinel file (the `/etc/shadow` case) and relative `../..` escapes. The server
must never follow them; the kernel follows them itself, from the caller's view. To tell the two
apart, callers run chrooted in a directory C that holds the mount point (C/mnt) and view files at
the places the targets name from inside C; the sentinels the same targets name from the host (the
server's view) must not change at all: not content, owner, mode, times (atime == mtime, so even a
read by the server would show under relatime) nor xattrs.

Swapped branches. A branch path given as a symlink is resolved at mount (podman passes symlinked
lowerdirs); branch directories replaced by symlinks after the mount must not redirect the server,
which holds directory fds; an upper subdirectory replaced by a symlink is never followed.

Names: every byte value but '/' and NUL, alone and inside a name, plus 255-byte names: created,
listed, stat'ed, read, renamed (copy-up and whiteout for lower ones) and unlinked through the mount,
with every result (value or errno) compared with the same operations on a plain directory. Names
starting with ".wh." are left out: refusing them (EINVAL) is documented.

ENOSPC: upper and work on a tiny tmpfs (mounted by the test): failures are reported as ENOSPC, no
partial copy is ever visible, the work directory is left empty and the mount keeps working once
space is freed. EROFS: an upper on a read-only tmpfs is refused at mount with one clear line; an
upper remounted read-only under a live mount makes every change fail with EROFS while reads work.

A handler bug: tests/faults/bugserver.py, a declared test double, runs the real CLI with
`Union.readlink` made to raise RuntimeError for one magic name: the call gets EIO, the log has
"unionfs bug" and the traceback, and the mount keeps serving. A real input that makes the server
raise a non-OSError is tested separately (xattr names that are not UTF-8).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pickle
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import mounts
from tests.helpers.mounts import MOUNT_TIMEOUT, is_mounted, unmount

from .support import BUG_MARKER, Branches, alive, serve, snapshot

SENTINEL = b"sentinel: must never be touched by the server\n"
VIEW_ABS = b"caller's view of the absolute target\n"
VIEW_REL = b"caller's view of the relative target\n"
OLD_NS = 1_500_000_000_000_000_000


# --- the layout -------------------------------------------------------------------------------

@dataclass
class Hostile:
    t: Path        # the test's tmp_path
    outside: Path  # T/outside: what the targets name from the server's view
    chroot: Path   # C: the callers' root; C/mnt is the mount point
    br: Branches

    @property
    def mnt(self) -> Path:
        return self.br.mnt

    def outside_state(self) -> dict[str, tuple[object, ...]]:
        """Everything about every object under T/outside, times and xattrs included (read with
        O_NOATIME, so that looking does not change what is looked at)."""
        out: dict[str, tuple[object, ...]] = {}
        todo = [str(self.outside)]
        while todo:
            p = todo.pop()
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)
                try:
                    if stat.S_ISDIR(st.st_mode):
                        content = sorted(os.listdir(fd))
                        todo += [os.path.join(p, n) for n in content]  # type: ignore[attr-defined]
                    else:
                        content = hashlib.sha256(os.read(fd, 1 << 20)).digest()
                finally:
                    os.close(fd)
            xattrs = sorted((x, os.getxattr(p, x, follow_symlinks=False))
                            for x in os.listxattr(p, follow_symlinks=False))
            out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                      st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, content, xattrs)
        return out

    def view(self, host_path: Path) -> Path:
        """Where an absolute target naming HOST_PATH lands for a chrooted caller."""
        return self.chroot / host_path.relative_to("/")


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    t = tmp_path
    outside = t / "outside"
    _put(outside / "sentinel", SENTINEL)
    os.chmod(outside / "sentinel", 0o600)
    os.setxattr(outside / "sentinel", "user.sentinel", b"s")
    _put(outside / "dir" / "keep", b"keep")
    for p in (outside / "sentinel", outside / "dir" / "keep", outside / "dir", outside):
        os.utime(p, ns=(OLD_NS, OLD_NS))  # atime == mtime: a read would move atime
    chroot = t / "chroot"
    (chroot / "mnt").mkdir(parents=True)
    h = Hostile(t, outside, chroot, Branches.make(t / "br"))
    h.br.mnt = chroot / "mnt"
    # the callers' views: relative escapes end at C/outside (.. stops at the chroot's root),
    # absolute targets at C/<T>/outside
    _put(chroot / "outside" / "sentinel", VIEW_REL)
    (chroot / "outside" / "dir").mkdir()
    _put(h.view(outside / "sentinel"), VIEW_ABS)
    h.view(outside / "dir").mkdir()
    low, up = h.br.lowers[0], h.br.upper
    _put(low / "file", b"lower file\n")
    os.symlink(outside / "sentinel", low / "abs")
    os.symlink("../../outside/sentinel", low / "rel")  # from T/br/lower: T/outside/sentinel
    (low / "sub").mkdir()
    os.symlink("../../../outside/sentinel", low / "sub" / "rel")
    os.symlink(outside / "dir", low / "absdir")
    os.symlink("../../outside/dir", low / "reldir")
    os.symlink(outside / "sentinel", up / "uabs")
    os.symlink("../../outside/sentinel", up / "urel")
    os.symlink(outside / "dir", up / "uabsdir")
    assert (low / "rel").resolve() == outside / "sentinel"
    assert (low / "sub" / "rel").resolve() == outside / "sentinel"
    yield h


def in_chroot(root: Path, fn: Callable[[], object], timeout: float = MOUNT_TIMEOUT) -> object:
    """Run FN in a forked child chrooted at ROOT; return its result, or raise its OSError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(r)
            os.chroot(root)
            os.chdir("/")
            try:
                res: tuple[object, ...] = ("ok", fn())
            except OSError as e:
                res = ("oserror", e.errno, str(e))
            except BaseException as e:
                res = ("error", repr(e))
            os.write(w, pickle.dumps(res))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError("chrooted caller did not finish")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    res = pickle.loads(data)
    if res[0] == "oserror":
        raise OSError(res[1], res[2])
    if res[0] == "error":
        raise AssertionError(f"chrooted caller failed: {res[1]}")
    return res[1]


# --- symlinks pointing outside ----------------------------------------------------------------

def test_symlinks_are_followed_by_the_kernel_from_the_callers_view(hostile: Hostile) -> None:
    h = hostile
    before = h.outside_state()
    with serve(h.br):
        def caller() -> dict[str, bytes]:
            got = {}
            for n in ("abs", "rel", "sub/rel", "uabs", "urel"):
                with open(f"/mnt/{n}", "rb") as f:
                    got[n] = f.read()
            with open("/mnt/abs", "ab") as f:
                f.write(b"+abs")
            with open("/mnt/rel", "ab") as f:
                f.write(b"+rel")
            with open("/mnt/absdir/created-abs", "wb") as f:
                f.write(b"c")
            os.mkdir("/mnt/reldir/created-rel")
            with open("/mnt/uabsdir/created-uabs", "wb") as f:
                f.write(b"u")
            return got

        got = in_chroot(h.chroot, caller)
        assert got == {"abs": VIEW_ABS, "rel": VIEW_REL, "sub/rel": VIEW_REL,
                       "uabs": VIEW_ABS, "urel": VIEW_REL}
        for n in ("abs", "rel", "sub/rel", "absdir", "reldir", "uabs", "urel", "uabsdir"):
            assert stat.S_ISLNK(os.lstat(h.mnt / n).st_mode), n
    assert h.view(h.outside / "sentinel").read_bytes() == VIEW_ABS + b"+abs"
    assert (h.chroot / "outside" / "sentinel").read_bytes() == VIEW_REL + b"+rel"
    assert (h.view(h.outside / "dir") / "created-abs").exists()
    assert (h.view(h.outside / "dir") / "created-uabs").exists()
    assert (h.chroot / "outside" / "dir" / "created-rel").is_dir()
    assert h.outside_state() == before, "the server touched the sentinel"
    assert not any(n.startswith("created") for n in os.listdir(h.br.upper))


def _fchmodat2_nofollow(path: Path, mode: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    nr = 452  # fchmodat2 (Linux 6.6), the same number on x86_64 and aarch64
    r = libc.syscall(nr, -100, os.fsencode(path), mode, 0x100)  # AT_FDCWD, AT_SYMLINK_NOFOLLOW
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


@pytest.mark.parametrize("name", ["abs", "rel", "sub/rel", "absdir", "uabs", "urel", "uabsdir"])
def test_server_operations_on_symlinks_never_touch_their_targets(hostile: Hostile, name: str
                                                                 ) -> None:
    """Operations the server performs on a symlink itself (copy-up, lchown, lutimes, xattrs,
    chmod without following, hard link, rename of and over it, unlink) leave the target alone."""
    h = hostile
    before = h.outside_state()
    with serve(h.br):
        m = h.mnt / name
        target = os.readlink(m)
        os.chown(m, 1234, 5678, follow_symlinks=False)  # a copy-up, for lower links
        st = os.lstat(m)
        assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (1234, 5678)
        os.utime(m, ns=(OLD_NS + 7, OLD_NS + 9), follow_symlinks=False)
        assert os.lstat(m).st_mtime_ns == OLD_NS + 9
        os.setxattr(m, "trusted.hostile", b"v", follow_symlinks=False)
        assert os.getxattr(m, "trusted.hostile", follow_symlinks=False) == b"v"
        os.removexattr(m, "trusted.hostile", follow_symlinks=False)
        with pytest.raises(OSError) as ei:
            _fchmodat2_nofollow(m, 0o600)
        assert ei.value.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)
        hl = m.with_name(m.name + ".hl")
        os.link(m, hl, follow_symlinks=False)
        assert stat.S_ISLNK(os.lstat(hl).st_mode) and os.readlink(hl) == target
        moved = m.with_name(m.name + ".moved")
        os.rename(m, moved)
        assert os.readlink(moved) == target
        os.rename(moved, m)
        plain = h.mnt / "plain"
        plain.write_bytes(b"plain file")
        os.rename(plain, hl)  # a regular file replaces a symlink: never written through it
        assert stat.S_ISREG(os.lstat(hl).st_mode) and hl.read_bytes() == b"plain file"
        os.unlink(hl)
        assert os.readlink(m) == target
        ust = os.lstat(h.br.upper / name)
        assert stat.S_ISLNK(ust.st_mode) and ust.st_uid == 1234
        os.unlink(m)
        assert not os.path.lexists(m)
    assert h.outside_state() == before, "the server touched the target of a symlink"


def test_upper_subdirectory_swapped_for_a_symlink_is_not_followed(hostile: Hostile) -> None:
    h = hostile
    before = h.outside_state()
    with serve(h.br) as mount:
        (h.mnt / "d").mkdir()
        (h.mnt / "d" / "f").write_bytes(b"in d")
        (h.mnt / "sub" / "x").write_bytes(b"copied-up parent")
        # behind the server's back: upper/d and upper/sub become symlinks to the outside dir
        os.rename(h.br.upper / "d", h.br.upper / "d.real")
        os.symlink(h.outside / "dir", h.br.upper / "d")
        os.rename(h.br.upper / "sub", h.br.upper / "sub.real")
        os.symlink(h.outside / "dir", h.br.upper / "sub")
        # callers run chrooted: when the server shows the swapped name as the symlink it now
        # is, the kernel follows it into the callers' view, not into T/outside
        def attempts() -> list[str]:
            m = "/mnt"
            tries: list[Callable[[], object]] = [
                lambda: open(f"{m}/d/evil", "wb").write(b"evil"),
                lambda: open(f"{m}/d/f", "wb").write(b"evil"),
                lambda: open(f"{m}/d/f", "rb").read(),
                lambda: os.listdir(f"{m}/d"),
                lambda: os.mkdir(f"{m}/d/evildir"),
                lambda: os.unlink(f"{m}/d/f"),
                lambda: os.rename(f"{m}/d/f", f"{m}/d/g"),
                lambda: os.chmod(f"{m}/d", 0o777),
                lambda: os.chown(f"{m}/d", 4321, 4321),
                lambda: os.utime(f"{m}/d", ns=(1, 1)),
                lambda: os.setxattr(f"{m}/d", "user.evil", b"1"),
                lambda: os.listxattr(f"{m}/d"),
                lambda: open(f"{m}/sub/keep", "wb").write(b"evil"),
                lambda: open(f"{m}/sub/x", "wb").write(b"evil"),
                lambda: os.rename(f"{m}/file", f"{m}/sub/file"),
            ]
            results = []
            for attempt in tries:
                try:
                    attempt()
                    results.append("ok")
                except OSError as e:  # failing is fine; writing outside is not
                    results.append(errno.errorcode.get(e.errno or 0, "?"))
            return results

        print("results:", in_chroot(h.chroot, attempts))
        assert alive(mount), "the server died"
    assert h.outside_state() == before, "the server followed a swapped upper directory"


def test_branch_paths_given_as_symlinks_are_resolved_at_mount(tmp_path: Path) -> None:
    real = Branches.make(tmp_path / "real")
    _put(real.lowers[0] / "f", b"lower f")
    links = tmp_path / "links"
    links.mkdir()
    for n, target in (("lower", real.lowers[0]), ("upper", real.upper), ("work", real.work)):
        os.symlink(target, links / n)
    br = Branches(tmp_path, [links / "lower"], links / "upper", links / "work", real.mnt)
    decoy = tmp_path / "decoy"
    for n in ("lower", "upper", "work"):
        _put(decoy / n / "decoy-file", b"decoy")
    decoy_before = snapshot(decoy)
    with serve(br):
        assert (br.mnt / "f").read_bytes() == b"lower f"
        (br.mnt / "new").write_bytes(b"new")
        # re-point the symlinks: the server already holds the directories themselves
        for n in ("lower", "upper", "work"):
            os.unlink(links / n)
            os.symlink(decoy / n, links / n)
        assert sorted(os.listdir(br.mnt)) == ["f", "new"]
        assert (br.mnt / "f").read_bytes() == b"lower f"
        with open(br.mnt / "f", "ab") as fh:  # a copy-up through the work dir
            fh.write(b"+")
        (br.mnt / "new2").write_bytes(b"new2")
    assert (real.upper / "new").read_bytes() == b"new"
    assert (real.upper / "new2").read_bytes() == b"new2"
    assert (real.upper / "f").read_bytes() == b"lower f+"
    assert snapshot(decoy) == decoy_before


def test_branch_directories_swapped_after_mount_do_not_redirect_the_server(
        tmp_path: Path) -> None:
    br = Branches.make(tmp_path / "b")
    _put(br.lowers[0] / "f", b"lower f")
    _put(br.lowers[0] / "d" / "x", b"lower x")
    decoy = tmp_path / "decoy"
    for n in ("lower", "upper", "work"):
        _put(decoy / n / "f", b"decoy f")
        _put(decoy / n / "decoy-only", b"decoy")
    decoy_before = snapshot(decoy)
    with serve(br):
        (br.mnt / "early").write_bytes(b"early")
        for n, p in (("lower", br.lowers[0]), ("upper", br.upper), ("work", br.work)):
            p.rename(p.with_name(p.name + ".old"))
            os.symlink(decoy / n, p)
        assert sorted(os.listdir(br.mnt)) == ["d", "early", "f"]
        assert (br.mnt / "f").read_bytes() == b"lower f"
        assert (br.mnt / "d" / "x").read_bytes() == b"lower x"
        with open(br.mnt / "f", "ab") as fh:  # copy-up: work dir and upper by fd
            fh.write(b"+")
        (br.mnt / "late").write_bytes(b"late")
        os.unlink(br.mnt / "d" / "x")
        assert not (br.mnt / "decoy-only").exists()
    old = tmp_path / "b"
    assert (old / "upper.old" / "f").read_bytes() == b"lower f+"
    assert (old / "upper.old" / "late").read_bytes() == b"late"
    assert snapshot(decoy) == decoy_before


# --- names of every byte ------------------------------------------------------------------------

def _names() -> list[bytes]:
    out = []
    for b in range(1, 256):
        if b == ord("/"):
            continue
        if b != ord("."):
            out.append(bytes([b]))
        out.append(b"a" + bytes([b]) + b"z")
    out += [b"\xff" * 255, b"." * 3, b"..x", b" lead", b"trail ", b"-n", b"\n\t\r",
            b"\xc3\x28", b"\xed\xa0\x80", "é💥".encode()]
    return [n for n in out if not n.startswith(b".wh.")]


def _try(fn: Callable[[], object]) -> object:
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, e.errno))


def _name_ops(root: bytes, names: list[bytes], in_lower: set[bytes]) -> list[object]:
    """Operations on every name below ROOT; the list of their results."""
    res: list[object] = []
    j = os.path.join
    for i, n in enumerate(names):
        p = j(root, n)
        if n not in in_lower:
            res.append(_try(lambda p=p, n=n: open(p, "xb").write(n)))
        res.append(_try(lambda p=p: (stat.S_IFMT(os.lstat(p).st_mode), os.lstat(p).st_size)))
        res.append(_try(lambda p=p: open(p, "rb").read()))
        if i % 3 == 0:
            res.append(_try(lambda p=p: open(p, "ab").write(b"+")))  # copy-up of lower ones
    res.append(sorted(os.listdir(root)))
    for i, n in enumerate(names):
        p = j(root, n)
        q = j(root, n + b"~") if len(n) < 255 else j(root, b"~" + n[1:])
        res.append(_try(lambda p=p, q=q: os.rename(p, q)))  # a whiteout for lower ones
        res.append(_try(lambda q=q: open(q, "rb").read()))
        if i % 2 == 0:
            res.append(_try(lambda p=p, q=q: os.rename(q, p)))
    res.append(sorted(os.listdir(root)))
    for n in sorted(os.listdir(root)):
        res.append(_try(lambda n=n: os.unlink(j(root, n))))
    res.append(sorted(os.listdir(root)))
    return res


def test_names_with_every_byte_value(tmp_path: Path) -> None:
    names = _names()
    in_lower = set(names[::2])
    plain = tmp_path / "plain"
    plain.mkdir()
    br = Branches.make(tmp_path / "u")
    for root in (plain, br.lowers[0]):
        for n in in_lower:
            with open(os.path.join(os.fsencode(root), n), "wb") as f:
                f.write(n)
    expected = _name_ops(os.fsencode(plain), names, in_lower)
    with serve(br):
        got = _name_ops(os.fsencode(br.mnt), names, in_lower)
        assert br.work_leftovers() == []
    diffs = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True)) if e != g]
    assert not diffs, f"{len(diffs)} results differ from a plain directory: {diffs[:5]}"


# --- ENOSPC and EROFS -----------------------------------------------------------------------------

@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """tiny_tmpfs(options) mounts a tmpfs (e.g. "size=1m") and returns it; all are unmounted."""
    made: list[Path] = []

    def make(options: str) -> Path:
        p = tmp_path / f"tmpfs{len(made)}"
        p.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(p)], check=True,
                       timeout=MOUNT_TIMEOUT, capture_output=True)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in reversed(made):
            unmount(p)
        assert not any(is_mounted(p) for p in made)


def _small_branches(tmp_path: Path, fs: Path) -> Branches:
    lower = tmp_path / "lower"
    _put(lower / "big", os.urandom(3 << 20))
    _put(lower / "small", b"small")
    _put(lower / "d" / "x", b"x")
    for i in range(20):
        _put(lower / f"f{i}", b"f")
    br = Branches(tmp_path, [lower], fs / "upper", fs / "work", tmp_path / "mnt")
    for p in (br.upper, br.work, br.mnt):
        p.mkdir()
    return br


def test_enospc_is_reported_and_leaves_the_tree_consistent(
        tmp_path: Path, tiny_tmpfs: Callable[[str], Path]) -> None:
    fs = tiny_tmpfs("size=1m")
    br = _small_branches(tmp_path, fs)
    big = (br.lowers[0] / "big").read_bytes()
    with serve(br):
        m = br.mnt
        with pytest.raises(OSError) as ei:  # the copy-up of 3 MiB cannot fit
            os.open(m / "big", os.O_WRONLY)
        assert ei.value.errno == errno.ENOSPC
        assert (m / "big").read_bytes() == big, "a partial copy is visible"
        assert not (br.upper / "big").exists()
        assert br.work_leftovers() == []
        # a new file larger than the file system: ENOSPC from write() or fsync()
        with pytest.raises(OSError) as ei:
            fd = os.open(m / "huge", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for _ in range(4):
                    os.write(fd, b"h" * (1 << 20))
                os.fsync(fd)
            finally:
                os.close(fd)
        assert ei.value.errno == errno.ENOSPC
        snapshot(m)  # every name stat-able and readable
        os.unlink(m / "huge")
        assert br.work_leftovers() == []
        with open(m / "small", "ab") as f:  # space is back: changes work again
            f.write(b"+")
        assert (m / "small").read_bytes() == b"small+"
        assert (m / "big").read_bytes() == big


def test_inode_exhaustion_in_upper_fails_cleanly(
        tmp_path: Path, tiny_tmpfs: Callable[[str], Path]) -> None:
    fs = tiny_tmpfs("size=8m,nr_inodes=40")
    br = _small_branches(tmp_path, fs)
    with serve(br):
        m = br.mnt
        made = 0
        with pytest.raises(OSError) as ei:
            for i in range(100):
                (m / f"fill{i}").write_bytes(b"")
                made += 1
        assert ei.value.errno == errno.ENOSPC
        assert made > 0
        before = snapshot(m)
        for name, attempt in [
            ("unlink a lower file (whiteout)", lambda: os.unlink(m / "f1")),
            ("rename a lower file", lambda: os.rename(m / "f2", m / "f2.new")),
            ("mkdir", lambda: os.mkdir(m / "newdir")),
            ("symlink", lambda: os.symlink("x", m / "newlink")),
            ("copy-up", lambda: open(m / "small", "ab").close()),
            ("rmdir a lower dir", lambda: (os.unlink(m / "d" / "x"), os.rmdir(m / "d"))),
        ]:
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == errno.ENOSPC, f"{name}: {ei.value!r}"
            assert snapshot(m) == before, f"{name} changed the tree although it failed"
            assert br.work_leftovers() == [], name
        os.unlink(m / "fill0")
        os.unlink(m / "fill1")
        os.unlink(m / "fill2")
        os.unlink(m / "f1")
        assert not (m / "f1").exists()


def test_upper_on_a_read_only_fs_is_refused_at_mount(
        tmp_path: Path, tiny_tmpfs: Callable[[str], Path]) -> None:
    fs = tiny_tmpfs("size=1m")
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, timeout=MOUNT_TIMEOUT)
    lower = tmp_path / "lower"
    _put(lower / "f", b"f")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(
            [*mounts.unionfs_cmd(), "-o",
             f"lowerdir={lower},upperdir={fs / 'upper'},workdir={fs / 'work'}", str(mnt)],
            capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    finally:
        unmount(mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert any(w in lines[0] for w in ("read-only", "writable", "Read-only")), lines[0]


def test_upper_remounted_read_only_fails_changes_with_erofs(
        tmp_path: Path, tiny_tmpfs: Callable[[str], Path]) -> None:
    fs = tiny_tmpfs("size=4m")
    br = _small_branches(tmp_path, fs)
    with serve(br) as mount:
        m = br.mnt
        (m / "upperfile").write_bytes(b"u")
        (m / "udir").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, timeout=MOUNT_TIMEOUT)
        before = snapshot(m)
        attempts: list[tuple[str, Callable[[], object]]] = [
            ("create", lambda: (m / "new").write_bytes(b"n")),
            ("mkdir", lambda: os.mkdir(m / "newdir")),
            ("unlink lower", lambda: os.unlink(m / "f1")),
            ("unlink upper", lambda: os.unlink(m / "upperfile")),
            ("rmdir upper", lambda: os.rmdir(m / "udir")),
            ("rename lower", lambda: os.rename(m / "f2", m / "f2.new")),
            ("chmod lower", lambda: os.chmod(m / "small", 0o600)),
            ("write lower", lambda: open(m / "small", "ab").close()),
            ("truncate upper", lambda: os.truncate(m / "upperfile", 0)),
            ("setxattr", lambda: os.setxattr(m / "upperfile", "user.x", b"1")),
            ("symlink", lambda: os.symlink("x", m / "ln")),
            ("link", lambda: os.link(m / "upperfile", m / "ln2")),
        ]
        for name, attempt in attempts:
            with pytest.raises(OSError) as ei:
                attempt()
            assert ei.value.errno == errno.EROFS, f"{name}: {ei.value!r}"
        assert snapshot(m) == before
        assert (m / "big").read_bytes() == (br.lowers[0] / "big").read_bytes()
        assert alive(mount)
        subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True, timeout=MOUNT_TIMEOUT)
        (m / "new").write_bytes(b"n")  # and it recovers
    assert BUG_MARKER not in br.log_text()


# --- handler bugs ---------------------------------------------------------------------------------

def _bugserver_branches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Branches:
    """Branches served by tests/faults/bugserver.py (the real CLI with one injected fault), with
    a file `f` in the lower branch."""
    bugserver = Path(__file__).with_name("bugserver.py")
    repo = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(mounts, "unionfs_cmd", lambda: [sys.executable, str(bugserver)])
    br = Branches.make(tmp_path)
    _put(br.lowers[0] / "f", b"f")
    return br


def test_handler_bug_answers_eio_logs_traceback_and_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    br = _bugserver_branches(tmp_path, monkeypatch)
    os.symlink("f", br.lowers[0] / "trigger-unionfs-bug")
    os.symlink("f", br.lowers[0] / "fine-link")
    with serve(br, check_log=False) as m:
        with pytest.raises(OSError) as ei:
            os.readlink(br.mnt / "trigger-unionfs-bug")
        assert ei.value.errno == errno.EIO
        assert os.readlink(br.mnt / "fine-link") == "f"
        assert (br.mnt / "f").read_bytes() == b"f"
        (br.mnt / "new").write_bytes(b"n")
        assert sorted(os.listdir(br.mnt)) == ["f", "fine-link", "new", "trigger-unionfs-bug"]
        with pytest.raises(OSError) as ei:  # again: still EIO, still serving
            os.readlink(br.mnt / "trigger-unionfs-bug")
        assert ei.value.errno == errno.EIO
        assert alive(m)
    log = br.log_text()
    assert log.count(BUG_MARKER) == 2, log
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: injected handler bug" in log
    assert "readlink" in log


def test_a_fatal_handler_error_ends_the_server_and_fails_the_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception no handler may swallow (a BaseException) ends the server, from the
    synchronous entry point (patch item 7) as from a coroutine: the request fails with a
    connection error, it does not hang, and the traceback is in the log."""
    br = _bugserver_branches(tmp_path, monkeypatch)
    os.symlink("f", br.lowers[0] / "trigger-unionfs-fatal")
    with serve(br, check_log=False) as m:
        assert m.server is not None
        assert (br.mnt / "f").read_bytes() == b"f"
        r = subprocess.run([sys.executable, "-c", "import os, sys; os.readlink(sys.argv[1])",
                            str(br.mnt / "trigger-unionfs-fatal")],
                           capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        assert r.returncode != 0
        assert "Errno 103" in r.stderr or "Errno 107" in r.stderr, r.stderr  # ECONNABORTED/ENOTCONN
        m.server.wait(timeout=MOUNT_TIMEOUT)
        assert m.server.returncode != 0
    log = br.log_text()
    assert "InjectedFatal: injected fatal error" in log, log


def test_xattr_names_that_are_not_utf8(tmp_path: Path) -> None:
    """Xattr names are bytes like file names; one that is not valid UTF-8 must be listed, read
    and copied up like any other, not turn lookups, listings and copy-ups into EIO."""
    br = Branches.make(tmp_path)
    f = br.lowers[0] / "d" / "f"
    _put(f, b"data")
    name = b"user.\xff\xfe"
    os.setxattr(f, name, b"value")
    os.setxattr(br.lowers[0] / "d", name, b"dir value")
    with serve(br):
        m = br.mnt
        assert os.listdir(m / "d") == ["f"]
        assert os.fsencode(os.listxattr(m / "d" / "f")[0]) == name
        assert os.getxattr(m / "d" / "f", name) == b"value"
        assert os.getxattr(m / "d", name) == b"dir value"
        with open(m / "d" / "f", "ab") as fh:  # copy-up copies the xattr
            fh.write(b"+")
        assert os.getxattr(m / "d" / "f", name) == b"value"
        assert os.getxattr(br.upper / "d" / "f", name) == b"value"
