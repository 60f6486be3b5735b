"""Lower indexes of images: built once per layer stack, used by every unionfs mount of it.

Owns `<store root>/lindex/<key>.idx`, where key is the sha256 of the stack's layer paths (top
first): the `unionfs.layerindex` file of that stack. It is built lazily, at the first run of an
image with the FUSE driver (import stays as fast as before, and images only ever run on kernel
overlayfs never pay for it), checked before every use and rebuilt when it no longer matches its
layers. The files are caches: garbage collection removes them all, the next run rebuilds.

The store's layers are extracted once into content-addressed directories and never written
again, so the mount checks only the layers' roots (`lowerindex_check=roots`); the check made
here before each use is the same. With `roots` the union also serves lower objects' attributes
from the index (a lookup touches no layer); an index of an older format is rebuilt.
"""

from __future__ import annotations

import contextlib
import marshal
import os
from collections.abc import Sequence
from pathlib import Path

from unionfs import layerindex
from unionfs.branch import Branch
from unionfs.lowercache import sha256_hex

SUBDIR = "lindex"
CHECK = "roots"


def index_path(store_root: Path, lowers: Sequence[Path]) -> Path:
    key = sha256_hex("\0".join(os.path.realpath(p) for p in lowers).encode())
    return store_root / SUBDIR / f"{key}.idx"


def _usable(path: Path, lowers: Sequence[Path]) -> bool:
    branches = [Branch(i, os.path.realpath(p), writable=False) for i, p in enumerate(lowers)]
    try:
        layerindex.load(str(path), branches, 0, CHECK)
        return True
    except layerindex.LowerIndexError:
        return False
    finally:
        for b in branches:
            b.close()


def ensure(store_root: Path, lowers: Sequence[Path]) -> Path | None:
    """The checked index of LOWERS (built now if missing or stale); None if it cannot be
    built (the mount then probes the layers, as without an index)."""
    path = index_path(store_root, lowers)
    try:
        if path.exists() and _usable(path, lowers):
            return path
        path.parent.mkdir(mode=0o700, exist_ok=True)
        layerindex.write([str(p) for p in lowers], str(path))
        return path
    except (OSError, layerindex.LowerIndexError):
        return None


def _layers_of(path: Path) -> list[str] | None:
    try:
        data = marshal.loads(path.read_bytes())
        return [str(ident[0]) for ident in data[2]]
    except (OSError, EOFError, ValueError, TypeError, IndexError):
        return None


def gc(store_root: Path) -> list[str]:
    """Remove the index files of stacks with a layer gone from the store (and unreadable or
    half-written ones); returns their names."""
    base = store_root / SUBDIR
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for p in sorted(base.iterdir()):
        layer_paths = None if p.name.endswith(".tmp") else _layers_of(p)
        if layer_paths is not None and all(os.path.isdir(x) for x in layer_paths):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p.name)
    return removed
