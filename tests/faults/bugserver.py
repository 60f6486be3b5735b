"""A declared test double for "a handler bug": unionfs with one engine method made to fail.

    python bugserver.py [unionfs arguments...]

Runs the real `unionfs.cli.main` after replacing `Union.readlink` with a version that raises
RuntimeError (not an OSError: an internal error) when the link is named MAGIC, and behaves
normally otherwise. test_hostile.py uses it to check that a handler bug is answered with EIO, logged
with its traceback as "unionfs bug", and that the mount keeps serving. Nothing else is changed.
"""

from __future__ import annotations

import sys

from unionfs import cli
from unionfs.union import Union

MAGIC = b"trigger-unionfs-bug"

_readlink = Union.readlink


def _buggy_readlink(self: Union, ino: int) -> bytes:
    if self.node(ino).name == MAGIC:
        raise RuntimeError("injected handler bug (tests/faults/bugserver.py)")
    return _readlink(self, ino)


Union.readlink = _buggy_readlink  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
