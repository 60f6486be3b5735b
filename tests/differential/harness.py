"""Differential harness: one system under test (SUT) against kernel overlayfs (the oracle).

What it owns:
- `snapshot(dir)`: the observable content of a tree (names, types, modes, owners, sizes, sha256
  of contents, symlink targets, user.* xattrs, link counts), and `compare_views`.
- `upper_meaning(upper, lower_view)`: what an upper directory *means* relative to the merged view
  of its lower layers, independent of the encoding (chardev / xattr / `.wh.` whiteouts, opaque
  xattrs / `.wh..wh..opq`, `trusted.overlay.redirect` directories).
- `run_op`: one filesystem operation on one mount, returning its outcome (a value or an errno).
- `DiffPair`: two identical copies of a layer stack, the SUT mounted on one and the oracle on the
  other; `apply` runs an operation on both and fails on any difference; `remount` moves the upper
  down into the lower stack; `check_epoch` compares the full trees and the uppers.

Invariants: every mount is undone (`close`, also on failure); every SUT syscall runs under a
watchdog that kills the FUSE server when it hangs (the syscall then fails with ENOTCONN and the
test reports the hang); nothing outside the pair's temporary directory is ever written.

The oracle is mounted with `index=on,redirect_dir=on`, which makes kernel overlayfs agree with
the two behaviours unionfs is designed to do better than default overlayfs (see DESIGN.md sec. 2):
renaming a directory that comes from a lower layer (default overlayfs: EXDEV) and keeping hard
links on copy-up (default overlayfs: the copied-up name becomes a separate inode).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import platform
import signal
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis

from tests.helpers.layers import Stack, StackDirs, materialise
from tests.helpers.mounts import Mount, is_mounted, mounted, unmount

SUT_KIND = os.environ.get("DIFF_SUT", "unionfs")
ORACLE_KIND = "overlay"
ORACLE_OPTIONS: tuple[str, ...] = ("index=on", "redirect_dir=on")
OP_TIMEOUT = float(os.environ.get("UNIONFS_DIFF_OP_TIMEOUT", "20"))
WALK_TIMEOUT = 120.0
KEEP = os.environ.get("UNIONFS_DIFF_KEEP") == "1"
IGNORE = frozenset(filter(None, os.environ.get("UNIONFS_DIFF_IGNORE", "").split(",")))
"""Difference classes to look past (for exploring beyond a known difference, never in CI):
"nlink" (link counts in views and stat results)."""

MARKER_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
OCI_WH = ".wh."
OCI_OPQ = ".wh..wh..opq"

# -- snapshots ------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "reg"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "lnk"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


@dataclass(frozen=True)
class Snap:
    """One entry of a tree. `ino` and `mtime_ns` are recorded but never compared as such."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    sha: str | None
    target: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int
    rdev: tuple[int, int] | None
    ino: int = 0
    mtime_ns: int = 0

    def attrs(self) -> tuple[object, ...]:
        """Everything that must be equal for two entries to be the same object (not nlink)."""
        user = tuple((k, v) for k, v in self.xattrs
                     if k.startswith("user.") and not k.startswith(MARKER_XATTR_PREFIXES))
        return (self.kind, self.mode, self.uid, self.gid, self.size, self.sha, self.target, user,
                self.rdev)


def _sha256(path: bytes) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def _holds_xattr_whiteouts(d: Path) -> bool:
    """Whether directory D (of a layer, not through a mount) holds an xattr whiteout."""
    try:
        with os.scandir(d) as it:
            for e in it:
                if e.is_file(follow_symlinks=False) and any(
                        n in WHITEOUT_XATTRS for n in os.listxattr(e.path, follow_symlinks=False)):
                    return True
    except OSError:
        pass
    return False


def _xattrs(path: bytes, keep: Callable[[str], bool]) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        return (("<listxattr>", errno.errorcode.get(e.errno or 0, "?").encode()),)
    out = []
    for n in sorted(names):
        if not keep(n):
            continue
        try:
            out.append((n, os.getxattr(path, n, follow_symlinks=False)))
        except OSError as e:
            out.append((n, f"<{errno.errorcode.get(e.errno or 0, '?')}>".encode()))
    return tuple(out)


def snap_entry(path: bytes, raw: bool = False) -> Snap:
    st_ = os.lstat(path)
    kind = _kind(st_.st_mode)
    keep: Callable[[str], bool] = ((lambda n: n.startswith(("user.", "trusted."))) if raw
                                   else (lambda n: not n.startswith(("security.", "system."))))
    return Snap(
        kind=kind,
        mode=stat.S_IMODE(st_.st_mode),
        uid=st_.st_uid,
        gid=st_.st_gid,
        size=None if kind == "dir" else st_.st_size,
        sha=_sha256(path) if kind == "reg" else None,
        target=os.fsdecode(os.readlink(path)) if kind == "lnk" else None,
        xattrs=_xattrs(path, keep) if kind in ("reg", "dir") or raw else (),
        nlink=st_.st_nlink,
        rdev=(os.major(st_.st_rdev), os.minor(st_.st_rdev)) if kind in ("chr", "blk") else None,
        ino=st_.st_ino,
        mtime_ns=st_.st_mtime_ns,
    )


def snapshot(root: Path, raw: bool = False) -> dict[str, Snap]:
    """Walk `root` without following symlinks. Keys are '/'-joined relative paths, "" = root.

    `raw` keeps trusted.* xattrs (for reading the encodings of an upper directory); otherwise
    every xattr except security.* and system.* is kept, so overlay markers leaking through a
    mount are seen.
    """
    out: dict[str, Snap] = {}
    base = os.fsencode(root)

    def walk(rel: str) -> None:
        p = os.path.join(base, os.fsencode(rel)) if rel else base
        try:
            s = snap_entry(p, raw)
        except FileNotFoundError:
            if not rel:
                raise
            out[rel] = GHOST
            return
        out[rel] = s
        if s.kind == "dir":
            for name in sorted(os.listdir(p)):
                n = os.fsdecode(name)
                walk(f"{rel}/{n}" if rel else n)

    walk("")
    return out


GHOST = Snap("ghost", 0, 0, 0, None, None, None, (), 0, None)
"""A name that readdir lists but lookup does not find. Kernel overlayfs does this for whiteouts
inside a directory that is not merged (exists in one layer only): readdir then passes the real
directory through, whiteouts included, while lookup, create, rmdir... treat them as absent."""


def visible(view: dict[str, Snap]) -> dict[str, Snap]:
    return {p: s for p, s in view.items() if s.kind != "ghost"}


def is_marker_xattr(name: str) -> bool:
    return name.startswith(MARKER_XATTR_PREFIXES)


def visible_names(view: dict[str, Snap], ino: int) -> int:
    """How many names of `view` (a kernel overlayfs view: hard links share st_ino there, with
    index=on also across copy-up) belong to the non-directory inode `ino`."""
    return sum(1 for s in view.values() if s.ino == ino and s.kind not in ("dir", "ghost"))


def nlink_model_agrees(sut_nlink: int, oracle: Snap, oracle_view: dict[str, Snap]) -> bool:
    """KNOWN DIFFERENCE (link counts of hidden hard links). Overlayfs reports the link count of
    the real inode, which counts names that a whiteout or an opaque directory in a higher layer
    hides (and, after a copy-up with index=on, keeps counting them). The SUT may instead report
    the names the union shows, which is what unionfs means by consistent link counts. Where the
    oracle's count differs from the number of names its own merged tree shows for the inode, the
    SUT must report that number; everywhere else it must equal the oracle's."""
    shown = visible_names(oracle_view, oracle.ino)
    return oracle.nlink != shown and sut_nlink == shown


def lower_link_counts(layers: list[Path]) -> dict[int, int]:
    """st_ino -> st_nlink of every hard-linked non-directory in LAYERS (read directly)."""
    out: dict[int, int] = {}
    for layer in layers:
        for root, dirs, files in os.walk(layer):
            for n in files + dirs:
                try:
                    st_ = os.lstat(os.path.join(root, n))
                except OSError:
                    continue
                if not stat.S_ISDIR(st_.st_mode) and st_.st_nlink > 1:
                    out[st_.st_ino] = st_.st_nlink
    return out


def compare_views(a: dict[str, Snap], b: dict[str, Snap], la: str, lb: str,
                  nlink: bool = True, ghosts_ok: bool = False,
                  nlink_model: bool = False,
                  lower_nlinks: dict[int, int] | None = None) -> list[str]:
    """Differences between two merged views, one line each (empty = equal).

    Compared: names, type, permission bits, owner, size (not of directories), sha256, symlink
    target, user.* xattrs, device numbers, and st_nlink of non-directories (`nlink`; with
    `nlink_model`, `b` being the oracle, as `nlink_model_agrees` documents, or the count of the
    SUT's own lower inode, `lower_nlinks`, as overlayfs reports it for a lower file). Not compared:
    st_ino, st_dev, timestamps, directory sizes and link counts (overlayfs reports 1 for merged
    directories). Overlay markers visible in `a` (names or xattrs) are reported.
    """
    out: list[str] = []
    # Known overlayfs quirk (GHOST): whiteouts listed in non-merged directories. Ignored on the
    # oracle's side; on the SUT's side a listed name that cannot be looked up is a bug.
    for p, s in sorted(a.items()):
        if s.kind == "ghost" and not ghosts_ok:
            out.append(f"{p!r}: {la} lists it but lookup says ENOENT")
    a, b = visible(a), visible(b)
    for p in sorted(set(a) - set(b)):
        out.append(f"{p!r}: only in {la} ({a[p].kind})")
    for p in sorted(set(b) - set(a)):
        out.append(f"{p!r}: only in {lb} ({b[p].kind})")
    for p in sorted(set(a) & set(b)):
        x, y = a[p], b[p]
        fields = ["kind", "mode", "uid", "gid", "size", "sha", "target", "rdev"]
        if nlink and "nlink" not in IGNORE and x.kind != "dir" and y.kind != "dir":
            fields.append("nlink")
        for f in fields:
            vx, vy = getattr(x, f), getattr(y, f)
            if f == "nlink" and nlink_model and (
                    nlink_model_agrees(vx, y, b) or vx == visible_names(a, x.ino)
                    or (lower_nlinks is not None and vx == lower_nlinks.get(x.ino))):
                # the second: unionfs keeps hard links across copy-up and remounts where
                # overlayfs' index (and so the oracle's link) is lost; the SUT's count must then
                # be the number of names it shows for the inode, or (the third) the count of
                # the lower inode it shows (unionfs' number for it), which is what overlayfs
                # reports for those very layers (until a name goes through the mount, unionfs
                # reports the branch's count: names hidden in the layers above still count)
                continue
            if vx != vy:
                if f == "mode":
                    vx, vy = oct(vx), oct(vy)
                out.append(f"{p!r}: {f} {la}={vx} {lb}={vy}")
        ux = [kv for kv in x.xattrs if not is_marker_xattr(kv[0])]
        uy = [kv for kv in y.xattrs if not is_marker_xattr(kv[0])]
        if ux != uy:
            out.append(f"{p!r}: xattrs {la}={ux} {lb}={uy}")
    for p, s in sorted(a.items()):
        leaked = [k for k, _ in s.xattrs if is_marker_xattr(k)]
        if leaked:
            out.append(f"{p!r}: overlay marker xattrs visible through {la}: {leaked}")
        if p.rpartition("/")[2].startswith(OCI_WH):
            out.append(f"{p!r}: OCI whiteout name visible through {la}")
    return out


# -- the meaning of an upper directory ------------------------------------------------------------


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _xattr(s: Snap, names: tuple[str, ...]) -> bytes | None:
    for k, v in s.xattrs:
        if k in names:
            return v
    return None


def upper_meaning(upper: Path, lower_view: dict[str, Snap]) -> dict[str, tuple[object, ...]]:
    """What `upper` means on top of lowers whose merged view is `lower_view`.

    Result: merged path -> ("whiteout",) | ("dir", state, attrs) | (kind, attrs, hard-link group).
    A directory's state is "merge" (it merges with the lower directory of the same path),
    "opaque" (it hides a lower directory of the same path) or "new" (nothing below to hide).

    Encodings are decoded: 0/0 chardevs, `trusted|user.overlay.whiteout` files in `opaque=x`
    directories and `.wh.NAME` are whiteouts; `opaque=y` xattrs and `.wh..wh..opq` mark opaque
    directories; a `trusted.overlay.redirect` directory (overlayfs `redirect_dir=on`) is expanded
    into the equivalent opaque directory holding the full content of the lower directory it
    redirects to (files that are hard links of each other there form a hard-link group, as
    copies linked in the upper would). Things without meaning on these lowers are dropped:
    whiteouts that hide nothing, opaque marks on directories with no lower directory, anything
    below an opaque directory that only an encoding would need, and entries identical to what
    the lowers show at the same path (copy-up without a change: only an efficiency difference).
    Directories are kept when they have content or differ from the lower directory.
    """
    raw = snapshot(upper, raw=True)
    kids: dict[str, list[str]] = {}
    for p in raw:
        if p:
            kids.setdefault(p.rpartition("/")[0], []).append(p.rpartition("/")[2])
    lower_kids: dict[str, list[str]] = {}
    for p in lower_view:
        if p:
            lower_kids.setdefault(p.rpartition("/")[0], []).append(p.rpartition("/")[2])
    out: dict[str, tuple[object, ...]] = {}
    # hard-link groups: files of the upper by their inode there, files a redirect expands by
    # their inode in the lower view (the link is the lowers' own, carried by the redirect)
    groups: dict[tuple[str, int], list[str]] = {}

    def file_meaning(s: Snap) -> tuple[object, ...]:
        return (s.kind, s.attrs())

    def synth(lp: str, mp: str) -> None:
        """Copy the lower subtree at lower path `lp` into the meaning at merged path `mp`."""
        s = lower_view[lp]
        if s.kind == "dir":
            out[mp] = ("dir", "new", s.attrs())
            for n in lower_kids.get(lp, []):
                synth(_join(lp, n), _join(mp, n))
        else:
            out[mp] = (*file_meaning(s), ())
            if s.kind == "reg":
                groups.setdefault(("lower", s.ino), []).append(mp)

    def visit(mp: str, lp: str | None, natural: bool) -> bool:
        """Directory `mp` of the upper merges the lower directory `lp` (None: none). `natural`:
        `lp == mp` and every ancestor merges too, so lowers show `lp`'s children at `mp`.
        Returns whether anything below `mp` was kept."""
        d = raw[mp]
        xwhite = _xattr(d, OPAQUE_XATTRS) == b"x"
        names = kids.get(mp, [])
        whiteouts: set[str] = set()
        entries: dict[str, Snap] = {}
        for n in names:
            s = raw[_join(mp, n)]
            if n == OCI_OPQ:
                continue
            if n.startswith(OCI_WH):
                whiteouts.add(n[len(OCI_WH):])
            elif (s.kind == "chr" and s.rdev == (0, 0)) or (
                    s.kind == "reg" and s.size == 0 and xwhite
                    and _xattr(s, WHITEOUT_XATTRS) is not None):
                whiteouts.add(n)
            else:
                entries[n] = s
        kept = False
        # A whiteout means something only where the lowers show a name at the same path; in a
        # directory that does not merge naturally (redirected) the content is listed in full.
        for n in sorted(whiteouts - set(entries)):
            if natural and lp is not None and _join(lp, n) in lower_view:
                out[_join(mp, n)] = ("whiteout",)
                kept = True
        if lp is not None and not natural:
            for n in sorted(lower_kids.get(lp, [])):
                if n not in whiteouts and n not in entries:
                    synth(_join(lp, n), _join(mp, n))
                    kept = True
        for n, s in sorted(entries.items()):
            cm = _join(mp, n)
            lower_same_path = lower_view.get(cm) if natural else None
            lower_src = lower_view.get(_join(lp, n)) if lp is not None else None
            if s.kind != "dir":
                if natural and lower_same_path is not None and (
                        lower_same_path.attrs() == s.attrs()):
                    continue
                out[cm] = (*file_meaning(s), ())
                if s.kind == "reg":
                    groups.setdefault(("upper", s.ino), []).append(cm)
                kept = True
                continue
            opaque = (_xattr(s, OPAQUE_XATTRS) == b"y"
                      or _join(cm, OCI_OPQ) in raw)
            red = _xattr(s, REDIRECT_XATTRS)
            if red is not None:
                r = os.fsdecode(red)
                # absolute: a path in the lower stack; relative: a name in the parent's lower dir
                if r.startswith("/"):
                    child_lp: str | None = r.strip("/")
                else:
                    child_lp = _join(lp, r) if lp is not None else None
                if child_lp is not None and (lower_view.get(child_lp) is None
                                             or lower_view[child_lp].kind != "dir"):
                    child_lp = None
            elif opaque or lower_src is None or lower_src.kind != "dir":
                child_lp = None
            else:
                child_lp = _join(lp, n) if lp is not None else None
            child_natural = natural and child_lp == cm
            if child_natural:
                state = "merge"
            elif lower_same_path is not None and lower_same_path.kind == "dir":
                state = "opaque"
            else:
                state = "new"
            below = visit(cm, child_lp, child_natural)
            same = (state == "merge" and lower_same_path is not None
                    and lower_same_path.attrs() == s.attrs())
            if below or not same:
                out[cm] = ("dir", state, s.attrs())
                kept = True
        return kept

    root = raw[""]
    if "" in lower_view and lower_view[""].attrs() != root.attrs():
        out[""] = ("dir", "merge", root.attrs())
    visit("", "", True)
    for paths in groups.values():
        if len(paths) > 1:
            for p in paths:
                out[p] = (*out[p][:-1], tuple(sorted(paths)))
    return out


def compare_meanings(a: dict[str, tuple[object, ...]], b: dict[str, tuple[object, ...]],
                     la: str, lb: str) -> list[str]:
    out = []
    for p in sorted(set(a) | set(b)):
        if a.get(p) != b.get(p):
            out.append(f"upper {p!r}: {la}={a.get(p)} {lb}={b.get(p)}")
    return out


# -- operations -----------------------------------------------------------------------------------

Outcome = tuple[str, Any]
"""("ok", value) or ("err", "ENOENT")."""

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine(), 316)
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    r = _libc.syscall(ctypes.c_long(_SYS_RENAMEAT2), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(src),
                      ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(dst), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def stat_summary(s: os.stat_result) -> tuple[object, ...]:
    kind = _kind(s.st_mode)
    nlink = None if kind == "dir" or "nlink" in IGNORE else s.st_nlink
    return (kind, oct(stat.S_IMODE(s.st_mode)), s.st_uid, s.st_gid,
            None if kind == "dir" else s.st_size, nlink)


def _read_fd(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    off = 0
    while chunk := os.pread(fd, 1 << 20, off):
        h.update(chunk)
        n += len(chunk)
        off += len(chunk)
    return n, h.hexdigest()[:16]


OPEN_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: opening a fifo never blocks


def _op(mnt: bytes, fds: dict[int, int], name: str, kw: dict[str, Any]) -> Any:
    def P(key: str = "path") -> bytes:
        return os.path.join(mnt, os.fsencode(kw[key]))

    if name == "create":
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if kw["excl"] else 0)
        os.close(os.open(P(), flags | OPEN_FLAGS, kw["mode"]))
        return stat_summary(os.lstat(P()))
    if name == "write":
        data = kw["data"].data()
        fd = os.open(P(), os.O_WRONLY | OPEN_FLAGS)
        try:
            return os.pwrite(fd, data, kw["offset"])
        finally:
            os.close(fd)
    if name == "append":
        fd = os.open(P(), os.O_WRONLY | os.O_APPEND | OPEN_FLAGS)
        try:
            return os.write(fd, kw["data"].data())
        finally:
            os.close(fd)
    if name == "truncate":
        os.truncate(P(), kw["length"])
        return None
    if name == "read":
        fd = os.open(P(), os.O_RDONLY | OPEN_FLAGS)
        try:
            return _read_fd(fd)
        finally:
            os.close(fd)
    if name == "stat":
        return stat_summary(os.stat(P(), follow_symlinks=kw["follow"]))
    if name == "readdir":
        names = sorted(os.fsdecode(n) for n in os.listdir(P()))
        ghosts = [n for n in names if not os.path.lexists(os.path.join(P(), os.fsencode(n)))]
        return ([n for n in names if n not in ghosts], ghosts)
    if name == "readlink":
        return os.readlink(P())
    if name == "chmod":
        os.chmod(P(), kw["mode"])
        return None
    if name == "chown":
        os.chown(P(), kw["uid"], kw["gid"], follow_symlinks=kw["follow"])
        return stat_summary(os.stat(P(), follow_symlinks=kw["follow"]))
    if name == "utimens":
        os.utime(P(), ns=(kw["atime_ns"], kw["mtime_ns"]), follow_symlinks=kw["follow"])
        return os.stat(P(), follow_symlinks=kw["follow"]).st_mtime_ns
    if name == "setxattr":
        os.setxattr(P(), kw["name"], kw["value"], kw["flags"])
        return None
    if name == "removexattr":
        os.removexattr(P(), kw["name"])
        return None
    if name == "getxattr":
        return os.getxattr(P(), kw["name"])
    if name == "listxattr":
        return sorted(n for n in os.listxattr(P()) if not n.startswith(("security.", "system.")))
    if name == "mkdir":
        os.mkdir(P(), kw["mode"])
        return stat_summary(os.lstat(P()))
    if name == "rmdir":
        os.rmdir(P())
        return None
    if name == "unlink":
        os.unlink(P())
        return None
    if name == "rename":
        renameat2(P("src"), P("dst"), kw["flags"])
        return None
    if name == "link":
        os.link(P("src"), P("dst"), follow_symlinks=False)
        return stat_summary(os.lstat(P("dst")))
    if name == "symlink":
        os.symlink(kw["target"], P())
        return None
    if name == "mkfifo":
        os.mkfifo(P(), kw["mode"])
        return None
    if name == "open_unlink_read":
        # Keep an fd, unlink the name, then use the fd: the data must stay reachable.
        fd = os.open(P(), os.O_RDWR | OPEN_FLAGS)
        try:
            before = _read_fd(fd)
            os.unlink(P())
            os.pwrite(fd, b"after-unlink", 3)
            after = _read_fd(fd)
            return (before, after, os.path.lexists(P()))
        finally:
            os.close(fd)
    if name == "open_keep":
        flags = os.O_RDWR if kw["write"] else os.O_RDONLY
        fds[kw["slot"]] = os.open(P(), flags | OPEN_FLAGS)
        return None
    if name == "fd_read":
        return _read_fd(fds[kw["slot"]])
    if name == "fd_write":
        return os.pwrite(fds[kw["slot"]], kw["data"].data(), kw["offset"])
    if name == "fd_stat":
        s = os.fstat(fds[kw["slot"]])
        kind = _kind(s.st_mode)  # (a directory's size is its file system's: `stat_summary`)
        return (kind, oct(stat.S_IMODE(s.st_mode)), None if kind == "dir" else s.st_size)
    if name == "fd_close":
        os.close(fds.pop(kw["slot"]))
        return None
    raise ValueError(name)


def run_op(mnt: Path, fds: dict[int, int], name: str, kw: dict[str, Any]) -> Outcome:
    try:
        return ("ok", _op(os.fsencode(mnt), fds, name, kw))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


MUTATING = {"create", "write", "append", "truncate", "chmod", "chown", "utimens", "setxattr",
            "removexattr", "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "mkfifo",
            "open_unlink_read", "fd_write"}


def format_op(name: str, kw: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"


# -- the pair -------------------------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


@dataclass
class Side:
    label: str
    kind: str
    options: tuple[str, ...]
    dir: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mount: Mount | None = None
    fds: dict[int, int] = field(default_factory=dict)

    @property
    def mnt(self) -> Path:
        # Deep enough that a symlink climbing out of the mount (targets have at most two "..",
        # see tests.helpers.layers) still lands inside this side's own directory.
        return self.dir / "p" / "q" / "mnt"


def kernel_view(lowers: list[Path], scratch: Path) -> dict[str, Snap]:
    """The merged view kernel overlayfs gives of `lowers` (top-first), read-only."""
    scratch.mkdir(parents=True, exist_ok=True)
    layers = list(lowers)
    if len(layers) == 1:  # overlayfs needs two lower layers when there is no upper
        empty = scratch / "empty"
        empty.mkdir(exist_ok=True)
        layers.append(empty)
    with mounted("overlay", layers, None, None, scratch / "mnt"):
        return visible(snapshot(scratch / "mnt"))


def rm_tree(path: Path) -> None:
    """Remove a tree we made, refusing to cross into a mount that is still there."""
    if not path.exists():
        return
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=300)


class DiffPair:
    """Two copies of one stack; the SUT on one, the oracle on the other."""

    def __init__(self, stack: Stack, sut_kind: str = SUT_KIND,
                 sut_stack: Stack | None = None, max_epochs: int = 3, oci: bool = False) -> None:
        """`sut_stack`: what to materialise for the SUT instead of `stack` (same meaning in
        another encoding). `oci`: the SUT's layers use the OCI encoding, which the kernel cannot
        read: normalise both uppers against the oracle's lower view and skip the kernel reading
        of the SUT's layers."""
        self.oci = oci
        self.sut_is_kernel = sut_kind == ORACLE_KIND
        self.root = Path(tempfile.mkdtemp(prefix="unionfs-diff-"))
        self.history: list[str] = []
        self.epoch = 0
        self.max_epochs = max_epochs
        self.pins: dict[str, int] = {}
        self.sut_hung = False
        self._mounts = contextlib.ExitStack()
        self.sides: dict[str, Side] = {}
        try:
            # DIFF_SUT=overlay is the harness's self-test: both sides must then always agree.
            sut_opts = ORACLE_OPTIONS if sut_kind == ORACLE_KIND else ()
            for label, kind, opts, st_ in (("sut", sut_kind, sut_opts, sut_stack or stack),
                                           ("oracle", ORACLE_KIND, ORACLE_OPTIONS, stack)):
                d = self.root / label
                dirs: StackDirs = materialise(st_, d / "layers")
                self.sides[label] = Side(label, kind, opts, d, dirs.lowers, dirs.upper,
                                         dirs.work)
            self._mount_all()
        except BaseException:
            self.close()
            raise

    @property
    def sut(self) -> Side:
        return self.sides["sut"]

    @property
    def oracle(self) -> Side:
        return self.sides["oracle"]

    # -- mounting --

    def _mount_all(self) -> None:
        for side in self.sides.values():
            log = side.dir / f"server-{self.epoch}.log" if side.kind == "unionfs" else None
            side.mount = self._mounts.enter_context(
                mounted(side.kind, side.lowers, side.upper, side.work, side.mnt, side.options,
                        log=log))

    def _unmount_all(self) -> None:
        self._close_fds()
        try:
            self._mounts.close()
        finally:
            self._mounts = contextlib.ExitStack()
            for side in self.sides.values():
                side.mount = None

    def _close_fds(self) -> None:
        for side in self.sides.values():
            for fd in side.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            side.fds.clear()

    def close(self) -> None:
        """Unmount everything and remove the temporary tree (idempotent, never raises)."""
        try:
            self._unmount_all()
        except Exception:
            pass
        mnts = [s.mnt for s in self.sides.values()] + [
            self.root / label / "view" / "mnt" for label in self.sides]
        for m in mnts:
            with contextlib.suppress(Exception):
                unmount(m)
        if not KEEP and not any(is_mounted(m) for m in mnts if m.exists()):
            rm_tree(self.root)

    # -- the SUT watchdog --

    @contextlib.contextmanager
    def watchdog(self, what: str, timeout: float = OP_TIMEOUT) -> Iterator[None]:
        """Kill the SUT's FUSE server if `what` takes longer than `timeout` (then every pending
        request fails with ENOTCONN, so the test reports the hang instead of hanging)."""
        server = self.sut.mount.server if self.sut.mount is not None else None
        if server is None:
            yield
            return

        def fire() -> None:
            self.sut_hung = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)

        t = threading.Timer(timeout, fire)
        t.start()
        try:
            yield
        finally:
            t.cancel()
        if self.sut_hung:
            raise Mismatch(f"SUT hung for {timeout}s on {what}; server killed\n"
                           + self.describe())

    # -- operations --

    def describe(self) -> str:
        lines = [f"pair {self.root} (SUT {self.sut.kind}), operations so far:"]
        lines += [f"  {h}" for h in self.history[-60:]]
        log = self.sut.mount.server_log() if self.sut.mount is not None else ""
        if log:
            lines.append("SUT server log (tail):")
            lines += ["  " + x for x in log.splitlines()[-40:]]
        return "\n".join(lines)

    def run_both(self, op: str, kw: dict[str, Any]) -> tuple[Outcome, Outcome]:
        with self.watchdog(format_op(op, kw)):
            a = run_op(self.sut.mnt, self.sut.fds, op, kw)
        b = run_op(self.oracle.mnt, self.oracle.fds, op, kw)
        return a, b

    def apply(self, op: str, /, **kw: Any) -> Outcome:
        """Run one operation on both mounts; raise `Mismatch` if the outcomes differ."""
        a, b = self.run_both(op, kw)
        if op == "readdir":  # ignore the oracle's GHOST entries (documented there)
            if b[0] == "ok":
                b = ("ok", (b[1][0], []))
            if a[0] == "ok" and self.sut_is_kernel:
                a = ("ok", (a[1][0], []))
        if a != b and self._only_nlink_differs(op, kw, a, b):
            b = a  # documented in nlink_model_agrees
        self.history.append(f"{format_op(op, kw)} -> sut {a} / oracle {b}")
        if (op == "rmdir" and a == ("ok", None) and b == ("err", "ENOTEMPTY")
                and self._oracle_counts_what_it_does_not_show(kw["path"])):
            # KNOWN DIFFERENCE (README): overlayfs counts GHOST entries and lower xattr
            # whiteouts; the two trees differ from here on and the oracle's cannot be changed
            # to match through its mount, so the example ends here, discarded rather than passed
            hypothesis.reject()
        if op == "utimens" and b[0] == "ok":
            self.pins[kw["path"]] = b[1]
        if a != b:
            raise Mismatch(f"{format_op(op, kw)}: {self.sut.kind} -> {a}, overlay -> {b}\n"
                           + self.describe())
        return b

    def _oracle_counts_what_it_does_not_show(self, path: str) -> bool:
        """Whether the oracle's directory PATH shows nothing, while its emptiness check counts
        what is there: names it lists that are all GHOSTs, or (listing nothing) an xattr
        whiteout in a lower layer's directory at PATH (Linux 6.18 counts those in rmdir's
        check, not 0/0 whiteouts)."""
        d = os.path.join(self.oracle.mnt, path)
        try:
            names = os.listdir(d)
        except OSError:
            return False
        if names:
            return not any(os.path.lexists(os.path.join(d, n)) for n in names)
        return any(_holds_xattr_whiteouts(low / path) for low in self.oracle.lowers)

    def _only_nlink_differs(self, op: str, kw: dict[str, Any], a: Outcome, b: Outcome) -> bool:
        """Outcomes that are stat summaries differing in the link count only, where the SUT's
        count is the one `nlink_model_agrees` allows."""
        if a[0] != "ok" or b[0] != "ok" or op not in ("stat", "create", "chown", "link"):
            return False
        x, y = a[1], b[1]
        if x[:5] != y[:5] or x[5] is None or y[5] is None:
            return False
        rel = os.fsencode(kw["dst"] if op == "link" else kw["path"])
        path = os.path.join(os.fsencode(self.oracle.mnt), rel)
        st_ = os.stat(path, follow_symlinks=bool(kw.get("follow", False)))
        view = visible(snapshot(self.oracle.mnt))
        oracle = Snap("reg", 0, 0, 0, None, None, None, (), st_.st_nlink, None, ino=st_.st_ino)
        if nlink_model_agrees(x[5], oracle, view):
            return True
        # unionfs keeps hard links where the oracle's index=on link is lost (see compare_views):
        # its count must then be the number of names it shows for the inode
        sut_st = os.stat(os.path.join(os.fsencode(self.sut.mnt), rel),
                         follow_symlinks=bool(kw.get("follow", False)))
        return bool(x[5] == visible_names(visible(snapshot(self.sut.mnt)), sut_st.st_ino))

    # -- whole-tree checks --

    def merged_views(self) -> tuple[dict[str, Snap], dict[str, Snap]]:
        with self.watchdog("walking the merged tree", WALK_TIMEOUT):
            a = snapshot(self.sut.mnt)
        return a, snapshot(self.oracle.mnt)

    def _pinned_mtime_diffs(self, a: dict[str, Snap], b: dict[str, Snap]) -> list[str]:
        """utimens-set mtimes must survive everything that does not change them. A pin counts
        while the oracle still shows the value that was set."""
        out = []
        for p, t in sorted(self.pins.items()):
            if p in a and p in b and b[p].mtime_ns == t and a[p].mtime_ns != t:
                out.append(f"{p!r}: utimens-set mtime {t} lost: {self.sut.kind} has "
                           f"{a[p].mtime_ns}")
        return out

    def _selfcontain_hardlinks(self, side: Side, view: dict[str, Snap]) -> None:
        """With index=on, overlayfs keeps hard links on copy-up through its index (in the work
        dir): a name still in a lower layer shows the data of its copied-up (maybe since
        unlinked) alias. Once the upper moves down into the lower stack (remount) and the index
        is gone, that name would show its old data. So copy up every name that shows something
        else than its lower file (which then has more than one link), or that comes through a
        redirected directory, by a chmod to the same mode (not chown: that clears set-id bits),
        making the upper self-contained, as the SUT's must be. Names that show their lower file
        unchanged are left alone: a copy-up would change their link count."""
        mnt, upper = os.fsencode(side.mnt), os.fsencode(side.upper)
        for p, s in view.items():
            if s.kind != "reg":
                continue
            rel = os.fsencode(p)
            if os.path.lexists(os.path.join(upper, rel)):
                continue
            found = next((p_ for p_ in (os.path.join(os.fsencode(lo), rel) for lo in side.lowers)
                          if self._lstat(p_) is not None), None)
            if found is None or snap_entry(found).attrs() != s.attrs():
                os.chmod(os.path.join(mnt, rel), s.mode)
        # Names that the index links to a copied-up inode but that are still lower names would
        # come apart at the remount (the index is not carried over): relink them through the
        # mount (unlink, then link to a name the upper holds) so the link persists, as unionfs'
        # does (it links every name of a hard-linked lower file in the upper at copy-up).
        groups: dict[int, list[str]] = {}
        for p, s in view.items():
            if s.kind not in ("dir", "ghost"):
                groups.setdefault(s.ino, []).append(p)
        for names in groups.values():
            if len(names) < 2:
                continue
            in_upper = [n for n in names if os.path.lexists(os.path.join(upper, os.fsencode(n)))]
            if not in_upper:
                continue
            src = os.path.join(mnt, os.fsencode(in_upper[0]))
            for n in names:
                if n in in_upper:
                    continue
                dst = os.path.join(mnt, os.fsencode(n))
                os.unlink(dst)
                os.link(src, dst, follow_symlinks=False)

    @staticmethod
    def _lstat(path: bytes) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except OSError:
            return None

    def check_epoch(self, unmount_after: bool = True) -> None:
        """Compare merged views (strict), then unmount and compare the meaning of both uppers
        and what the kernel reads from the SUT's layers. Raises `Mismatch` listing everything."""
        self._close_fds()
        a, b = self.merged_views()
        diffs = compare_views(a, b, self.sut.kind, "overlay", ghosts_ok=self.sut_is_kernel,
                              nlink_model=True, lower_nlinks=lower_link_counts(self.sut.lowers))
        diffs += self._pinned_mtime_diffs(a, b)
        self._selfcontain_hardlinks(self.oracle, b)
        if self.sut_is_kernel:
            self._selfcontain_hardlinks(self.sut, a)
        self._unmount_all()
        ov = kernel_view(self.oracle.lowers, self.oracle.dir / "view")
        sv = ov if self.oci else kernel_view(self.sut.lowers, self.sut.dir / "view")
        ma = upper_meaning(self.sut.upper, sv)
        mb = upper_meaning(self.oracle.upper, ov)
        diffs += compare_meanings(ma, mb, self.sut.kind, "overlay")
        if not self.oci:
            k = kernel_view([self.sut.upper, *self.sut.lowers], self.sut.dir / "view")
            diffs += [f"kernel reading {self.sut.kind}'s layers: {d}"
                      for d in compare_views(k, visible(a), "kernel", self.sut.kind,
                                             nlink=False)]
        if not unmount_after:
            self._mount_all()
        if diffs:
            raise Mismatch(f"epoch {self.epoch}: {len(diffs)} difference(s):\n  "
                           + "\n  ".join(diffs[:80]) + "\n" + self.describe())

    def remount(self) -> None:
        """Check, unmount both, push each upper down as the top lower layer, mount again with a
        fresh upper and work dir."""
        self.history.append("remount()")
        self.check_epoch()
        self.epoch += 1
        for side in self.sides.values():
            rm_tree(side.work)  # drops overlayfs's index links; the work dir is not a layer
            side.lowers = [side.upper, *side.lowers]
            side.upper = side.dir / "layers" / f"upper{self.epoch}"
            side.work = side.dir / "layers" / f"work{self.epoch}"
            side.upper.mkdir()
            side.work.mkdir()
        self._mount_all()

    def can_remount(self) -> bool:
        return self.epoch + 1 < self.max_epochs


Step = tuple[str, dict[str, Any]]


def replay(stack: Stack, steps: list[Step], sut_kind: str = SUT_KIND,
           sut_stack: Stack | None = None, oci: bool = False) -> None:
    """Run `steps` (("remount", {}) or (op, kwargs) as in `run_op`) on a fresh pair, then the
    end-of-run checks. For regression tests and for minimising a failure by hand."""
    pair = DiffPair(stack, sut_kind=sut_kind, sut_stack=sut_stack, oci=oci)
    try:
        for op, kw in steps:
            if op == "remount":
                pair.remount()
            else:
                pair.apply(op, **kw)
        pair.check_epoch()
    finally:
        pair.close()
