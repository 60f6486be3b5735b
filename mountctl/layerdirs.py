"""Where extracted layers live in the store, and removing trees: what `mountctl run` needs of
the layer store without the extraction machinery of `layers` (tarfile, gzip, shutil: about
4 ms of imports at every container start).

Owns the paths `<store>/layers/sha256/<hex>/` and `<hex>.meta.json` (their content is
`layers`' business) and `remove_tree`, the store's rm -rf.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from mountctl.image import ImageError, parse_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def layer_path(store: Path, diff_id: str) -> Path:
    """`<store>/layers/sha256/<hex>`: where the layer with this diff_id lives."""
    alg, hexpart = parse_digest(diff_id, "diff_id")
    if alg != "sha256":
        raise ImageError(f"diff_id {diff_id} is not sha256")
    return Path(store) / "layers" / alg / hexpart


def meta_path(store: Path, diff_id: str) -> Path:
    """`<store>/layers/sha256/<hex>.meta.json`: the layer's sidecar."""
    p = layer_path(store, diff_id)
    return p.with_name(p.name + ".meta.json")


def read_meta(store: Path, diff_id: str) -> dict[str, Any]:
    """The sidecar of an extracted layer: {"version", "diff_id", "privileged", "entries"}."""
    with open(meta_path(store, diff_id), "rb") as f:
        meta: dict[str, Any] = json.load(f)
    return meta


def remove_tree(path: Path) -> None:
    """rm -rf that also works unprivileged on read-only directories (it makes them writable,
    never following a symlink)."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    import shutil  # (only here: its compression modules cost a container start 2 ms)

    try:
        shutil.rmtree(path)
    except PermissionError:
        os.chmod(path, 0o700)
        _make_writable(path)
        shutil.rmtree(path)


def _make_writable(path: Path) -> None:
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                os.chmod(entry.path, 0o700)
                _make_writable(Path(entry.path))
