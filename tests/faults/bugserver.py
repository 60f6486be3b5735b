"""A declared test double for "a handler bug": unionfs with one engine method made to fail.

    python bugserver.py [unionfs arguments...]

Runs the real `unionfs.cli.main` after replacing `Union.readlink` with a version that raises
RuntimeError (not an OSError: an internal error) when the link is named MAGIC, a BaseException
when it is named FATAL, and behaves normally otherwise. test_hostile.py uses it to check that a
handler bug is answered with EIO, logged with its traceback as "unionfs bug", and that the mount
keeps serving; and that a fatal error ends the server without leaving the request hanging. Nothing
else is changed.
"""

from __future__ import annotations

import sys

from unionfs import cli
from unionfs.union import Union

MAGIC = b"trigger-unionfs-bug"
# a link named FATAL raises an exception that is not an Exception (no handler may swallow it):
# the server must end (and the kernel fail the request), never leave the caller waiting
FATAL = b"trigger-unionfs-fatal"

_readlink = Union.readlink


class InjectedFatal(BaseException):
    pass


def _buggy_readlink(self: Union, ino: int) -> bytes:
    name = self.node(ino).name
    if name == MAGIC:
        raise RuntimeError("injected handler bug (tests/faults/bugserver.py)")
    if name == FATAL:
        raise InjectedFatal("injected fatal error (tests/faults/bugserver.py)")
    return _readlink(self, ino)


Union.readlink = _buggy_readlink  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
