"""Layer trees on disk: the overlay format every benchmark layer is written in, the conversions
each backend needs, and snapshots for checking that backends show the same tree.

- Layers are written in the kernel overlayfs format: a whiteout is a 0/0 character device, an
  opaque directory carries `trusted.overlay.opaque=y`. Kernel overlayfs, fuse-overlayfs and unionfs
  read them as they are.
- `flatten` applies a stack of layers (top-first, like `lowerdir=`) into one plain tree: what the
  `native` backend sees. Regular files are hard links to the layer files (the layers are never
  written), so flattening a root file system costs metadata only.
- `to_unionfs_fuse` rewrites a layer into unionfs-fuse's own format: a whiteout for PATH becomes
  `META/PATH_HIDDEN~`, and an opaque directory PATH is kept and additionally gets
  `META/PATH_HIDDEN~`, which hides PATH in every branch below (unionfs-fuse finds PATH in the
  branch that has it before it looks at hide files, so the layer's own copy stays visible).
  META is `.unionfs-fuse` in Debian's unionfs-fuse 1.0 (its man page says `.unionfs`, which newer
  upstream versions use); `backends.unionfs_fuse_metadir` asks the installed binary.
- `snapshot` describes a mounted tree (types, permissions, owners, sizes, content digests, link
  targets) so that two backends can be compared; `diff` lists the differences.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT_XATTR = "trusted.overlay.whiteout"
UFS_METADIRS = (".unionfs-fuse", ".unionfs")
UFS_HIDETAG = "_HIDDEN~"

SAMPLE_ABOVE = 64 << 20
"""Files larger than this are digested from 16 sampled 64 KiB windows plus their size."""


def is_whiteout(path: Path | str, st: os.stat_result | None = None) -> bool:
    st = st if st is not None else os.lstat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            os.getxattr(path, WHITEOUT_XATTR, follow_symlinks=False)
            return True
        except OSError:
            return False
    return False


def is_opaque(path: Path | str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def make_whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def make_opaque(path: Path) -> None:
    os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)


def _copy_meta(st: os.stat_result, dst: Path) -> None:
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for child in os.listdir(path):
            _remove(path / child)
        os.rmdir(path)
    else:
        os.unlink(path)


def _place(src: Path, st: os.stat_result, dst: Path, hardlink: bool) -> None:
    """Put a copy of the non-directory `src` at `dst` (hard link for regular files if asked)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if hardlink:
            os.link(src, dst)
            return
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while chunk := fi.read(1 << 20):
                fo.write(chunk)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        os.mknod(dst, mode, st.st_rdev)
    _copy_meta(st, dst)
    if not stat.S_ISLNK(mode):
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def flatten(layers: Sequence[Path], dst: Path, hardlink: bool = True) -> None:
    """Apply `layers` (top-first) into the new directory `dst`, as a union would show them."""
    dst.mkdir(parents=True)
    for layer in reversed(layers):
        _apply(layer, dst, hardlink)


def _apply(src: Path, dst: Path, hardlink: bool) -> None:
    st = os.lstat(src)
    _copy_meta(st, dst)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        s = Path(entry.path)
        d = dst / entry.name
        est = entry.stat(follow_symlinks=False)
        if is_whiteout(s, est):
            _remove(d)
            continue
        if stat.S_ISDIR(est.st_mode):
            if os.path.lexists(d) and (not d.is_dir() or d.is_symlink() or is_opaque(s)):
                _remove(d)
            if not os.path.lexists(d):
                os.mkdir(d)
            _apply(s, d, hardlink)
        else:
            _remove(d)
            _place(s, est, d, hardlink)


def to_unionfs_fuse(layer: Path, dst: Path, metadir: str) -> None:
    """Rewrite one overlay-format layer into unionfs-fuse's format at the new directory `dst`."""
    hides: list[str] = []
    dst.mkdir(parents=True)

    def walk(src: Path, out: Path, rel: str) -> None:
        _copy_meta(os.lstat(src), out)
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            s = Path(entry.path)
            r = f"{rel}/{entry.name}" if rel else entry.name
            est = entry.stat(follow_symlinks=False)
            if is_whiteout(s, est):
                hides.append(r)
                continue
            if stat.S_ISDIR(est.st_mode):
                if is_opaque(s):
                    hides.append(r)
                os.mkdir(out / entry.name)
                walk(s, out / entry.name, r)
            else:
                _place(s, est, out / entry.name, hardlink=True)

    walk(layer, dst, "")
    for r in hides:
        hide = dst / metadir / (r + UFS_HIDETAG)
        hide.parent.mkdir(parents=True, exist_ok=True)
        hide.touch()


# -- snapshots ------------------------------------------------------------------------------------

Snapshot = dict[str, tuple[object, ...]]


def _digest(path: Path, size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= SAMPLE_ABOVE:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            for i in range(16):
                f.seek((size - (64 << 10)) * i // 15)
                h.update(f.read(64 << 10))
    return h.hexdigest()


def describe(path: Path, st: os.stat_result | None = None) -> tuple[object, ...]:
    """What must agree between backends for one object (never times, inode numbers, nlink)."""
    st = st if st is not None else os.lstat(path)
    mode = st.st_mode
    perms = (stat.S_IMODE(mode), st.st_uid, st.st_gid)
    if stat.S_ISDIR(mode):
        return ("d", *perms)
    if stat.S_ISREG(mode):
        return ("f", *perms, st.st_size, _digest(path, st.st_size))
    if stat.S_ISLNK(mode):
        return ("l", st.st_uid, st.st_gid, os.readlink(path))
    kind = "c" if stat.S_ISCHR(mode) else "b" if stat.S_ISBLK(mode) else \
        "p" if stat.S_ISFIFO(mode) else "s"
    return (kind, *perms, st.st_rdev)


def snapshot(root: Path, under: Iterable[str] = ("",),
             ignore_top: Sequence[str] = UFS_METADIRS) -> Snapshot:
    """Describe every object below `root` (or only below the relative paths `under`).

    A relative path in `under` that does not exist is recorded as ("absent",)."""
    out: Snapshot = {}

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            if not rel and entry.name in ignore_top:
                continue
            r = f"{rel}/{entry.name}" if rel else entry.name
            p = Path(entry.path)
            st = entry.stat(follow_symlinks=False)
            out[r] = describe(p, st)
            if stat.S_ISDIR(st.st_mode):
                walk(p, r)

    for rel in under:
        base = root / rel if rel else root
        try:
            st = os.lstat(base)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            out[rel] = ("absent",)
            continue
        if rel:
            out[rel] = describe(base, st)
        if stat.S_ISDIR(st.st_mode):
            walk(base, rel)
    return out


def diff(expected: Mapping[str, tuple[object, ...]], got: Mapping[str, tuple[object, ...]],
         limit: int = 10) -> list[str]:
    """Human-readable differences, at most `limit` (plus a count of the rest)."""
    out: list[str] = []
    n = 0
    for key in sorted(set(expected) | set(got)):
        a, b = expected.get(key), got.get(key)
        if a == b:
            continue
        n += 1
        if len(out) < limit:
            if a is None:
                out.append(f"extra {key!r}: {b}")
            elif b is None:
                out.append(f"missing {key!r}: {a}")
            else:
                out.append(f"{key!r}: expected {a}, got {b}")
    if n > limit:
        out.append(f"... and {n - limit} more")
    return out
