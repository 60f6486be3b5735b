"""A container's changes (its upper directory) as an OCI layer tar, and `commit` on top of it.

Owns the translation from the upper directory's on-disk encodings (DESIGN.md section 2) to
OCI layer entries:
  - a whiteout (char device 0/0, an xattr whiteout inside an `overlay.opaque=x` directory, or
    an existing `.wh.NAME` file) becomes the empty file `.wh.NAME`;
  - an opaque directory (`overlay.opaque=y` in the trusted or user namespace,
    `user.fuseoverlayfs.opaque`, or a `.wh..wh..opq` entry) gets `.wh..wh..opq` as its first
    entry, right after the directory itself;
  - a directory carrying `overlay.redirect` (a lower directory moved by a rename) is flattened:
    it is exported opaque, with the merged content of its origin in the image layers under what
    the upper holds, and its origin gets a whiteout unless the upper already hides it;
  - the union's private xattrs (overlay.*, fuseoverlayfs.*, unionfs.*) are never exported;
  - mount points the runner created for the container (system mounts and volume targets, listed
    by the caller) are skipped when they are still empty and absent from the image.
Entries come in a stable order (a directory, its opaque marker, its whiteouts, then its other
entries by name), hard links within the export stay hard links, and the uncompressed stream is
hashed while it is written, giving the layer's diff_id.
"""

from __future__ import annotations

import copy
import os
import posixpath
import stat
import tarfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import IO, Any

from unionfs.core.formats import (
    OPAQUE_MARKER,
    OPAQUE_XATTRS,
    REDIRECT_XATTRS,
    WHITEOUT_XATTRS,
    is_chardev_whiteout,
    is_private_xattr,
    opaque_value,
    whiteout_target,
)
from unionfs.core.resolve import BranchEntry, Kind, resolve
from unionfs.tuples import NamedTuple

OPQ = os.fsdecode(OPAQUE_MARKER)
WH = ".wh."
MetaLookup = Callable[[Path, str], dict[str, Any] | None]
"""(layer root, path relative to it) -> the layer sidecar's record of that entry, if any."""


class _HashingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        import hashlib  # (start-up time: not every command needs it)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _getxattr(path: Path, name: bytes) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _listxattr(path: Path) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def _opaque_flag(path: Path) -> str:
    """'y' opaque, 'x' holds xattr whiteouts, '' neither (by xattr only)."""
    for name in OPAQUE_XATTRS:
        v = opaque_value(_getxattr(path, name))
        if v:
            return v
    return ""


def _is_opaque(path: Path) -> bool:
    return _opaque_flag(path) == "y" or os.path.lexists(path / OPQ)


def _redirect(path: Path) -> str | None:
    for name in REDIRECT_XATTRS:
        v = _getxattr(path, name)
        if v is not None:
            return os.fsdecode(v.rstrip(b"\0"))
    return None


def _classify(layer_dir: Path, name: str) -> BranchEntry:
    """What one lower layer directory holds under `name` (as unionfs' branch.py sees it)."""
    hides = os.path.lexists(layer_dir / (WH + name))
    try:
        st = os.lstat(layer_dir / name)
    except (FileNotFoundError, NotADirectoryError):
        return BranchEntry(Kind.MISSING, hides_below=hides)
    if stat.S_ISDIR(st.st_mode):
        return BranchEntry(Kind.DIR, opaque=_is_opaque(layer_dir / name), hides_below=hides)
    if is_chardev_whiteout(st.st_mode, st.st_rdev):
        return BranchEntry(Kind.WHITEOUT)
    return BranchEntry(Kind.OTHER, hides_below=hides)


class _Lower(NamedTuple):
    """The image's layers (top first), looked up the way the union does."""

    layers: tuple[Path, ...]

    def at(self, rel: str, start: Sequence[Path] | None = None) -> list[Path]:
        """Directories merging at `rel` (empty when it is not a directory there)."""
        dirs = list(self.layers if start is None else start)
        for comp in [p for p in rel.split("/") if p]:
            dirs = self.child_dirs(dirs, comp)
            if not dirs:
                return []
        return dirs

    def child_dirs(self, dirs: Sequence[Path], name: str) -> list[Path]:
        res = resolve((i, _classify(d, name)) for i, d in enumerate(dirs))
        return [dirs[i] / name for i in res.branches] if res.kind is Kind.DIR else []

    def lookup(self, dirs: Sequence[Path], name: str) -> tuple[Kind, list[Path]]:
        """(kind, [object] or merging directories) of `name` in the merged `dirs`."""
        res = resolve((i, _classify(d, name)) for i, d in enumerate(dirs))
        if res.kind is Kind.DIR:
            return Kind.DIR, [dirs[i] / name for i in res.branches]
        if res.kind is Kind.OTHER:
            return Kind.OTHER, [dirs[res.top] / name]
        return Kind.MISSING, []

    def exists(self, rel: str) -> bool:
        parent, _, name = rel.rpartition("/")
        dirs = self.at(parent)
        return bool(dirs) and self.lookup(dirs, name)[0] is not Kind.MISSING

    def names(self, dirs: Sequence[Path]) -> set[str]:
        out: set[str] = set()
        for d in dirs:
            try:
                out.update(n for n in os.listdir(d) if not n.startswith(WH))
            except OSError:
                continue
        return out


class _Exporter:
    def __init__(self, tar: tarfile.TarFile, upper: Path, lower: _Lower,
                 skip: Collection[str], meta: MetaLookup | None) -> None:
        self.tar = tar
        self.upper = upper
        self.lower = lower
        self.skip = {p.strip("/") for p in skip}
        self.skip_parents = {posixpath.dirname(p) for p in self.skip}
        while "" not in self.skip_parents and self.skip_parents:
            more = {posixpath.dirname(p) for p in self.skip_parents} - self.skip_parents
            if not more:
                break
            self.skip_parents |= more
        self.meta = meta
        self.pending: list[tuple[str, Path]] = []
        """Copied-up directories, unchanged: written only if something inside them is."""
        self.links: dict[tuple[int, int], str] = {}
        self.emitted_dirs: set[str] = set()
        self.origins: list[str] = []

    # -- entries

    def _info(self, arc: str, path: Path, st: os.stat_result,
              layer: tuple[Path, str] | None = None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(arc)
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid, ti.uname, ti.gname = st.st_uid, st.st_gid, "", ""
        ti.mtime = st.st_mtime
        if layer is not None and self.meta is not None:
            rec = self.meta(*layer)
            if rec:  # ownership/mode the unprivileged extraction could not apply
                ti.uid, ti.gid = int(rec.get("uid", ti.uid)), int(rec.get("gid", ti.gid))
                ti.mode = int(rec.get("mode", ti.mode))
        pax = {}
        for name in _listxattr(path):
            if is_private_xattr(os.fsencode(name)):
                continue
            value = _getxattr(path, os.fsencode(name))
            if value is not None:
                pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
        if pax:
            ti.pax_headers = pax
        return ti

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        for arc, path in pending:
            self._dir(arc, path)

    def _whiteout(self, rel_dir: str, name: str) -> None:
        self._flush()
        ti = tarfile.TarInfo(posixpath.join(rel_dir, WH + name))
        ti.mode, ti.mtime = 0o644, int(time.time())
        self.tar.addfile(ti)

    def _opaque_marker(self, rel_dir: str) -> None:
        self._flush()
        ti = tarfile.TarInfo(posixpath.join(rel_dir, OPQ))
        ti.mode, ti.mtime = 0o644, int(time.time())
        self.tar.addfile(ti)

    def _dir(self, arc: str, path: Path, layer: tuple[Path, str] | None = None) -> None:
        self._flush()
        ti = self._info(arc, path, os.lstat(path), layer)
        ti.type = tarfile.DIRTYPE
        self.tar.addfile(ti)
        self.emitted_dirs.add(arc)

    def _object(self, arc: str, path: Path, st: os.stat_result,
                layer: tuple[Path, str] | None = None) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        self._flush()
        ti = self._info(arc, path, st, layer)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                ti.type, ti.linkname = tarfile.LNKTYPE, self.links[key]
                self.tar.addfile(ti)
                return
            if st.st_nlink > 1:
                self.links[key] = arc
            ti.size = st.st_size
            with open(path, "rb") as f:
                self.tar.addfile(ti, f)
            return
        if stat.S_ISLNK(mode):
            ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISFIFO(mode):
            ti.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:
            return
        self.tar.addfile(ti)

    # -- placeholders

    def _placeholder(self, rel: str, path: Path, st: os.stat_result) -> bool:
        """A mount point made by the runner: skipped while empty and absent from the image."""
        if rel not in self.skip and rel not in self.skip_parents:
            return False
        if self.lower.exists(rel):
            return False
        if stat.S_ISREG(st.st_mode):
            return rel in self.skip and st.st_size == 0
        if not stat.S_ISDIR(st.st_mode):
            return False
        for name in os.listdir(path):
            child = path / name
            if not self._placeholder(posixpath.join(rel, name), child, os.lstat(child)):
                return False
        return True

    # -- the diff walk (upper only)

    def _upper_markers(self, path: Path, names: Sequence[str]) -> tuple[list[str], list[str]]:
        """(whited-out names, other names) of an upper directory."""
        xwh = _opaque_flag(path) == "x"
        hidden: list[str] = []
        other: list[str] = []
        for name in names:
            if name == OPQ:
                continue
            target = whiteout_target(os.fsencode(name))
            if target is not None:
                hidden.append(os.fsdecode(target))
                continue
            p = path / name
            st = os.lstat(p)
            if is_chardev_whiteout(st.st_mode, st.st_rdev) or (
                    xwh and stat.S_ISREG(st.st_mode)
                    and any(_getxattr(p, n) is not None for n in WHITEOUT_XATTRS)):
                hidden.append(name)
                continue
            other.append(name)
        return sorted(set(hidden)), other

    def diff_dir(self, rel: str, path: Path) -> None:
        names = sorted(os.listdir(path))
        hidden, other = self._upper_markers(path, names)
        for name in hidden:
            self._whiteout(rel, name)
        for name in other:
            p = path / name
            arc = posixpath.join(rel, name)
            st = os.lstat(p)
            if self._placeholder(arc, p, st):
                continue
            if not stat.S_ISDIR(st.st_mode):
                self._object(arc, p, st)
                continue
            redirect = None if _is_opaque(p) else _redirect(p)
            if _is_opaque(p):
                self._dir(arc, p)
                self._opaque_marker(arc)
                self.diff_dir(arc, p)
            elif redirect is not None:
                origin = self._origin(rel, redirect)
                self.origins.append(origin)
                self._dir(arc, p)
                self._opaque_marker(arc)
                self.full_dir(arc, p, self.lower.at(origin))
            elif self._copied_up(arc, st):
                self.pending.append((arc, p))
                self.diff_dir(arc, p)
                if self.pending and self.pending[-1][0] == arc:
                    self.pending.pop()  # nothing changed inside
            else:
                self._dir(arc, p)
                self.diff_dir(arc, p)

    def _copied_up(self, rel: str, st: os.stat_result) -> bool:
        """A directory the image has too, with the same mode and owner (the union copied it
        up to hold a change inside)."""
        dirs = self.lower.at(rel)
        if not dirs:
            return False
        low = os.lstat(dirs[0])
        return (low.st_mode, low.st_uid, low.st_gid) == (st.st_mode, st.st_uid, st.st_gid)

    def _origin(self, parent_rel: str, redirect: str) -> str:
        if redirect.startswith("/"):
            return posixpath.normpath(redirect).strip("/")
        return posixpath.normpath(posixpath.join(parent_rel, redirect)).strip("/")

    # -- the full walk (a redirected directory: upper over its origin's lower content)

    def full_dir(self, rel: str, up: Path | None, lows: list[Path]) -> None:
        upper_names: list[str] = []
        hidden: set[str] = set()
        if up is not None:
            h, upper_names = self._upper_markers(up, sorted(os.listdir(up)))
            hidden = set(h)
            if _is_opaque(up):
                lows = []
        lower_names = self.lower.names(lows)
        for name in sorted(set(upper_names) | (lower_names - hidden)):
            arc = posixpath.join(rel, name)
            if up is not None and name in upper_names:
                p = up / name
                st = os.lstat(p)
                if not stat.S_ISDIR(st.st_mode):
                    self._object(arc, p, st)
                    continue
                redirect = _redirect(p)
                if _is_opaque(p) or name in hidden:
                    sub: list[Path] = []
                elif redirect is not None and redirect.startswith("/"):
                    origin = self._origin(rel, redirect)
                    self.origins.append(origin)
                    sub = self.lower.at(origin)
                elif redirect is not None:  # a sibling in this directory's lower content
                    sub = self.lower.child_dirs(lows, redirect)
                else:
                    sub = self.lower.child_dirs(lows, name)
                self._dir(arc, p)
                self.full_dir(arc, p, sub)
                continue
            kind, found = self.lower.lookup(lows, name)
            if kind is Kind.DIR:
                self._dir(arc, found[0], self._layer_of(found[0]))
                self.full_dir(arc, None, found)
            elif kind is Kind.OTHER:
                self._object(arc, found[0], os.lstat(found[0]), self._layer_of(found[0]))

    def _layer_of(self, path: Path) -> tuple[Path, str] | None:
        for layer in self.lower.layers:
            try:
                return layer, str(path.relative_to(layer))
            except ValueError:
                continue
        return None

    # -- origins of redirected directories

    def hide_origins(self) -> None:
        for origin in self.origins:
            if not origin or not self.lower.exists(origin):
                continue
            parent, _, name = origin.rpartition("/")
            if self._upper_hides(parent, name):
                continue
            parts = [p for p in parent.split("/") if p]
            for i in range(len(parts)):
                sub = "/".join(parts[: i + 1])
                if sub not in self.emitted_dirs:
                    dirs = self.lower.at(sub)
                    self._dir(sub, dirs[0], self._layer_of(dirs[0]))
            self._whiteout(parent, name)

    def _upper_hides(self, parent: str, name: str) -> bool:
        """Whether the upper already holds something (object or whiteout) at parent/name, or
        hides or replaces one of its ancestors."""
        path = self.upper
        for comp in [p for p in parent.split("/") if p] + [name]:
            if os.path.lexists(path / (WH + comp)):
                return True
            try:
                st = os.lstat(path / comp)
            except (FileNotFoundError, NotADirectoryError):
                return False
            if not stat.S_ISDIR(st.st_mode) or _is_opaque(path / comp) or \
                    _redirect(path / comp) is not None:
                return True
            path = path / comp
        return True


def export_upper(upper: Path, lowers: Sequence[Path], out: IO[bytes], *,
                 skip: Collection[str] = (), meta: MetaLookup | None = None) -> str:
    """Write the layer tar of `upper` over the image `lowers` (top first) to `out`; returns
    its diff_id (sha256 of the uncompressed tar)."""
    writer = _HashingWriter(out)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                      encoding="utf-8", errors="surrogateescape") as tar:
        ex = _Exporter(tar, Path(upper), _Lower(tuple(Path(p) for p in lowers)), skip, meta)
        ex.diff_dir("", Path(upper))
        ex.hide_origins()
    return writer.digest()


def sidecar_lookup() -> MetaLookup:
    """A MetaLookup reading each layer's `<layer>.meta.json` sidecar (layers.py), cached."""
    import json

    cache: dict[Path, dict[str, Any]] = {}

    def lookup(layer: Path, rel: str) -> dict[str, Any] | None:
        if layer not in cache:
            try:
                with open(layer.with_name(layer.name + ".meta.json"), "rb") as f:
                    cache[layer] = json.load(f).get("entries", {})
            except (OSError, ValueError):
                cache[layer] = {}
        rec = cache[layer].get(rel or ".")
        return rec if isinstance(rec, dict) and "chown" in rec.get("missing", ()) else None

    return lookup


def committed_config(base: dict[str, Any], diff_id: str, comment: str) -> dict[str, Any]:
    """The config of `base` with one more layer (diff_id) and a history entry for it."""
    cfg = copy.deepcopy(base)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("type", "layers")
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), diff_id]
    cfg["history"] = [*cfg.get("history", []), {"created": now, "created_by": comment}]
    cfg["created"] = now
    return cfg
