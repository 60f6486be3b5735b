"""The hard-link index: copied-up lower hard links whose other names are not linked yet.

Copying up one name of a hard-linked lower file must leave every other name of it showing the
copy (overlayfs does the same with index=on). Finding those names means walking the whole lower
branch, which costs far more than the copy, so copy-up only records the copy here and the union
links each other name when a lookup first resolves it (`Union._lookup_child`). All remaining
names are linked at once when exact names and link counts matter: before an unlink, rename or
link, at unmount (the upper directory is then self-contained for any other reader) and at the
next mount after a crash.

A record is a hard link of the copy in `workdir/links`, named after the lower object
(branch index, st_dev, st_ino in hex), so it survives a crash. This module owns that directory
and the in-memory map of records; what the names are and how they get linked is the union's.
"""

from __future__ import annotations

import os

from . import sys_linux as sl

LINKS_SUBDIR = "links"
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdef")


class Pending:
    """A copy whose lower object (BRANCH, DEV, INO) still has names that show it."""

    __slots__ = ("branch", "copy", "dev", "ino", "key", "nlink", "node_ino")

    def __init__(self, branch: int, dev: int, ino: int, nlink: int, node_ino: int,
                 key: bytes) -> None:
        self.branch = branch
        self.dev = dev
        self.ino = ino
        # the link count the union shows while names are pending (the lower one's)
        self.nlink = nlink
        self.node_ino = node_ino  # our inode number of the copy
        self.key = key  # the record's name in the index directory
        # (st_dev, st_ino) of the copy once it is in place
        self.copy: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"Pending(key={self.key!r}, nlink={self.nlink}, copy={self.copy})"


def key_of(branch: int, dev: int, ino: int) -> bytes:
    return b"%d-%x-%x" % (branch, dev, ino)


def parse_key(name: bytes) -> tuple[int, int, int] | None:
    """(branch, st_dev, st_ino) of the record named NAME (`key_of`), None if it is not one."""
    parts = name.split(b"-")
    if (len(parts) != 3 or not all(parts) or not _DIGITS.issuperset(parts[0])
            or not _HEX.issuperset(parts[1]) or not _HEX.issuperset(parts[2])):
        return None
    return int(parts[0]), int(parts[1], 16), int(parts[2], 16)


class LinkIndex:
    """The records of one mount: by lower object (for lookups) and by copy (for link counts)."""

    def __init__(self, workdir_fd: int) -> None:
        try:
            os.mkdir(LINKS_SUBDIR, 0o700, dir_fd=workdir_fd)
        except FileExistsError:
            pass
        self.fd = sl.openat2(workdir_fd, LINKS_SUBDIR.encode(), _O_DIR)
        self.by_lower: dict[tuple[int, int, int], Pending] = {}
        self.by_copy: dict[tuple[int, int], Pending] = {}

    def __bool__(self) -> bool:
        return bool(self.by_lower)

    def leftovers(self) -> list[bytes]:
        """Names of records a previous mount left (it ended without linking every name)."""
        rfd = sl.openat2(self.fd, b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(os.fsencode(n) for n in os.listdir(rfd))
        finally:
            os.close(rfd)

    def record(self, dir_fd: int, name: bytes, branch: int, lower: os.stat_result,
               node_ino: int) -> Pending:
        """Record the copy at DIR_FD/NAME (before it is renamed into place) as the copy of the
        lower object LOWER of BRANCH."""
        key = key_of(branch, lower.st_dev, lower.st_ino)
        try:
            os.unlink(key, dir_fd=self.fd)  # a stale record of an earlier copy of it
        except FileNotFoundError:
            pass
        os.link(name, key, src_dir_fd=dir_fd, dst_dir_fd=self.fd, follow_symlinks=False)
        return Pending(branch, lower.st_dev, lower.st_ino, lower.st_nlink, node_ino, key)

    def add(self, rec: Pending, copy: os.stat_result) -> None:
        """REC's copy is in place (its stat is COPY): lookups may now link it."""
        rec.copy = (copy.st_dev, copy.st_ino)
        self.by_lower[(rec.branch, rec.dev, rec.ino)] = rec
        self.by_copy[rec.copy] = rec

    def for_lower(self, branch: int, st: os.stat_result) -> Pending | None:
        return self.by_lower.get((branch, st.st_dev, st.st_ino))

    def for_copy(self, st: os.stat_result) -> Pending | None:
        return self.by_copy.get((st.st_dev, st.st_ino))

    def drop(self, key: bytes) -> None:
        """Remove a record (every name is linked, or it cannot be used)."""
        try:
            os.unlink(key, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        parsed = parse_key(key)
        if parsed is not None:
            rec = self.by_lower.pop(parsed, None)
            if rec is not None and rec.copy is not None:
                self.by_copy.pop(rec.copy, None)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
