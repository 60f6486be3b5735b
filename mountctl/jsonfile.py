"""The store's JSON records (image, container and layer metadata), written whole or not at all.

Without the tempfile module (it imports random, shutil and weakref, several ms of every mountctl
start, and `run` writes a container record before anything else): a record is written to a
temporary file beside it and renamed over it (`unionfs.atomicfile.write_atomically`).
"""

from __future__ import annotations

import json
from pathlib import Path

from unionfs.atomicfile import write_atomically

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import Any


def write_json(path: Path, obj: Any, *, mode: int = 0o600, durable: bool = False) -> None:
    """OBJ as indented JSON with sorted keys in PATH, file mode MODE whatever the umask;
    DURABLE: synced before the rename."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    write_atomically(str(path), data, mode, durable, exact=True)
