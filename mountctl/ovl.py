"""Kernel overlayfs over the store's layers: shim layers that translate OCI whiteouts.

The store keeps OCI markers (`.wh.NAME`, `.wh..wh..opq`) as plain files, which unionfs reads
natively but kernel overlayfs does not. For every layer L holding such markers this module
builds, once per store, two small shim directories under `<root>/overlay/<hex>/` and stacks
them around L:

    above   (directly over L): a whiteout (char 0/0) for each marker file, hiding the markers;
    L
    below   (directly under L): a whiteout for each NAME of a `.wh.NAME` in L, and for each
            `.wh..wh..opq` in directory D, D itself marked opaque (overlay.opaque=y), hiding
            exactly what lies under L, as the OCI rules say.

Shim directories copy mode, owner and times of L's directory at the same path, so the merged
view shows L's metadata wherever a shim directory is the topmost one. Whiteouts and the
`trusted.` opaque xattr are written when privileged; rootless, the (unprivileged, kernel >= 5.8)
whiteout and `user.overlay.opaque` are written and the mount needs the `userxattr` option.
Invariants: a shim appears atomically (built in `.tmp-*`, then renamed) and records its xattr
namespace in `format`; a layer without markers gets a `format` of "none" and no shim dirs.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from mountctl.layerdirs import remove_tree

OPQ = ".wh..wh..opq"
WH = ".wh."


def shim_root(store_root: Path) -> Path:
    return Path(store_root) / "overlay"


def _scan(layer: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """(markers as (dir, marker name), opaque dirs) of an extracted layer; dirs relative."""
    markers: list[tuple[str, str]] = []
    opaque: list[str] = []
    for top, dirs, files in os.walk(layer):
        rel = os.path.relpath(top, layer)
        rel = "" if rel == "." else rel
        for name in sorted(dirs + files):
            if name == OPQ:
                markers.append((rel, name))
                opaque.append(rel)
            elif name.startswith(WH):
                markers.append((rel, name))
    return markers, opaque


def _mkdirs(shim: Path, layer: Path, rel: str, made: set[str]) -> Path:
    parts = [p for p in rel.split("/") if p]
    for i in range(len(parts)):
        sub = "/".join(parts[: i + 1])
        if sub not in made:
            (shim / sub).mkdir(mode=0o755)
            made.add(sub)
    return shim / rel if rel else shim


def _copy_dir_meta(shim: Path, layer: Path, made: Iterable[str]) -> None:
    for rel in sorted(made, key=lambda r: -r.count("/")):
        src = layer / rel if rel else layer
        dst = shim / rel if rel else shim
        st = os.lstat(src)
        with contextlib.suppress(PermissionError):
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def build_shim(layer: Path, dest: Path, xattr_ns: str) -> bool:
    """Write the shim of `layer` into the new directory `dest`; False if none is needed."""
    markers, opaque = _scan(layer)
    if not markers:
        return False
    above, below = dest / "above", dest / "below"
    above.mkdir()
    below.mkdir()
    made_a: set[str] = {""}
    made_b: set[str] = {""}
    for rel, name in markers:
        _whiteout(_mkdirs(above, layer, rel, made_a) / name)
        if name != OPQ:
            _whiteout(_mkdirs(below, layer, rel, made_b) / name[len(WH):])
    for rel in opaque:
        d = _mkdirs(below, layer, rel, made_b)
        os.setxattr(d, f"{xattr_ns}.overlay.opaque", b"y", follow_symlinks=False)
    _copy_dir_meta(above, layer, made_a)
    _copy_dir_meta(below, layer, made_b)
    return True


def ensure_shim(store_root: Path, layer: Path, xattr_ns: str) -> Path | None:
    """The shim directory of `layer` (built on first use), or None if it needs none."""
    base = shim_root(store_root)
    final = base / layer.name
    fmt = final / "format"
    try:
        have = fmt.read_text().strip()
    except FileNotFoundError:
        have = ""
    if have in ("none", xattr_ns):
        return None if have == "none" else final
    base.mkdir(mode=0o755, exist_ok=True)
    if final.exists():
        remove_tree(final)  # made for the other xattr namespace, or incomplete
    import tempfile  # (start-up time: not every command needs it)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{layer.name[:16]}-", dir=base))
    try:
        needed = build_shim(layer, tmp, xattr_ns)
        (tmp / "format").write_text(f"{xattr_ns if needed else 'none'}\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "format").exists():
                raise
            remove_tree(tmp)  # another run built it meanwhile
    except BaseException:
        remove_tree(tmp)
        raise
    return final if needed else None


def overlay_lowers(store_root: Path, lowers: Sequence[Path], *, rootless: bool) -> list[Path]:
    """`lowers` (top first) with each layer's shims stacked around it."""
    ns = "user" if rootless else "trusted"
    out: list[Path] = []
    for layer in lowers:
        shim = ensure_shim(store_root, layer, ns)
        if shim is None:
            out.append(layer)
        else:
            out += [shim / "above", layer, shim / "below"]
    return out


def gc(store_root: Path, layers_dir: Path) -> list[str]:
    """Remove shims whose layer is gone from the store; returns their names."""
    base = shim_root(store_root)
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for p in sorted(base.iterdir()):
        if p.name.startswith(".tmp-") or not (layers_dir / p.name).is_dir():
            remove_tree(p)
            removed.append(p.name)
    return removed
