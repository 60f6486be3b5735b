"""An lstat result as 84 bytes, and back: what `layerindex` files record of every lower object
and what `Branch` keeps of the lower objects it stat'ed (a packed result takes about 130 bytes
of memory, an `os.stat_result` about 650)."""

from __future__ import annotations

import os
import struct

# mode uid gid nlink ino dev size rdev blocks blksize atime mtime ctime (ns)
ATTR = struct.Struct("<IIIIQQqQqIqqq")
_NS = 1_000_000_000


def pack(st: os.stat_result) -> bytes:
    return ATTR.pack(st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_ino, st.st_dev,
                     st.st_size, st.st_rdev, st.st_blocks, st.st_blksize, st.st_atime_ns,
                     st.st_mtime_ns, st.st_ctime_ns)


def unpack(raw: bytes, slot: int = 0) -> os.stat_result:
    """The os.stat_result a real lstat would give for the packed attributes at SLOT (every
    field, the float and integer times computed as CPython computes them)."""
    (mode, uid, gid, nlink, ino, dev, size, rdev, blocks, blksize, a, m, c
     ) = ATTR.unpack_from(raw, slot * ATTR.size)
    asec, ans = divmod(a, _NS)
    msec, mns = divmod(m, _NS)
    csec, cns = divmod(c, _NS)
    return os.stat_result((mode, ino, dev, nlink, uid, gid, size, asec, msec, csec,
                           asec + ans * 1e-9, msec + mns * 1e-9, csec + cns * 1e-9,
                           a, m, c, blksize, blocks, rdev))
