"""One branch of the union: a directory fd, and every access to it as an *at() call.

A `Branch` owns the O_PATH fd of its root directory. Paths inside a branch are `bytes` relative
to that root (b"" is the root). Directories are opened with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS), and objects are reached by name relative to their parent directory fd with
AT_SYMLINK_NOFOLLOW / O_NOFOLLOW, so the server never follows a symlink out of a branch, and paths
of any length work.

Lower branches are immutable while mounted, so what is read from them (listings with whiteouts
classified, opaque flags) is cached here; the upper branch is always read afresh.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from . import sys_linux as sl
from .core.formats import (
    DEAD_XATTRS,
    OPAQUE_MARKER,
    OPAQUE_XATTRS,
    REDIRECT_XATTRS,
    WHITEOUT_XATTRS,
    is_chardev_whiteout,
    opaque_value,
    whiteout_target,
)
from .core.readdir import Listing
from .core.resolve import MISSING, WHITEOUT, BranchEntry, Kind
from .statpack import pack, unpack
from .tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # (no typing at run time: see `tuples`)

O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

class DirInfo(NamedTuple):
    opaque: bool
    redirect: bytes | None
    dead: bytes | None


_NO_INFO = DirInfo(False, None, None)


class LayerKnowledge(Protocol):
    """What a lower index (`layerindex.BranchView`) or the lower cache
    (`lowercache.LayerCache`) knows of this branch: None = not known. What the branch reads
    from the layer itself is handed to `learn_*` (with the directory's fstat taken before)."""

    def listing(self, rel: bytes) -> Listing | None: ...

    def dir_info(self, rel: bytes) -> tuple[bool, bytes | None] | None: ...

    def names(self, rel: bytes) -> tuple[Mapping[bytes, object], Iterable[bytes]] | None: ...

    def stat(self, rel: bytes) -> os.stat_result | None: ...

    def learn_listing(self, rel: bytes, st: os.stat_result, lst: Listing) -> None: ...

    def learn_dir_info(self, rel: bytes, st: os.stat_result,
                       info: tuple[bool, bytes | None]) -> None: ...

    def stat_by_handle(self, rel: bytes) -> os.stat_result | None: ...

    def learn_handle(self, rel: bytes, dir_fd: int, name: bytes) -> None: ...

CACHE_MAX = 1 << 18  # entries per read-only-branch cache before it starts over
# lstat results of lower objects, kept packed (`statpack`: about 200 bytes each with the path,
# an os.stat_result alone is 650): a working set, not one per object ever seen, so the server's
# memory follows what the kernel holds (the kernel caches attributes itself; a readdirplus reads
# a directory's stats in one pass just before using them; reading a file invalidates its
# attributes in the kernel, and the getattr that follows is answered from here). This many over
# all the lower branches together, at least LOWER_STATS_MIN each (a deep stack must not multiply
# it).
LOWER_STATS = 1 << 14
LOWER_STATS_MIN = 512
# O_PATH fds of the upper's most recently used directories: an upper lookup, stat or change then
# costs no openat2 path walk (the union drops them whenever a directory there moves or goes)
DIRFD_CACHE_MAX = 64
# the same for the lower branches (whose directories never move), this many over all of them
# together, at least LOWER_DIRFD_MIN each: an open or copy-up of a lower file costs no path walk
LOWER_DIRFDS = 128
LOWER_DIRFD_MIN = 4

_KIND_DIR = Kind.DIR  # (a module constant: an enum member's lookup costs 70 ns each)
_DIR = BranchEntry(Kind.DIR)
_DIR_OPAQUE = BranchEntry(Kind.DIR, opaque=True)
_OTHER = BranchEntry(Kind.OTHER)


def join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def split(rel: bytes) -> tuple[bytes, bytes]:
    i = rel.rfind(b"/")
    if i < 0:
        return b"", rel
    return rel[:i], rel[i + 1:]


class Branch:
    """A branch directory, numbered top-first (the upper, when there is one, is 0)."""

    def __init__(self, index: int, path: str, writable: bool) -> None:
        self.index = index
        self.path = path
        self.writable = writable
        self.fd = os.open(path, O_DIR_PATH)
        st = os.fstat(self.fd)
        self.dev = st.st_dev
        self._listings: dict[bytes, Listing] = {}
        self._dirinfo: dict[bytes, DirInfo] = {}
        self._links: dict[int, list[bytes]] | None = None
        self._stats: dict[bytes, bytes] = {}  # read-only branches: path -> packed lstat
        self._dirfds: OrderedDict[bytes, int] = OrderedDict()
        self.dirfd_max = DIRFD_CACHE_MAX  # (the union gives lower branches their share)
        self.stats_max = LOWER_STATS  # lstat results kept (read-only branches; likewise)
        # the upper's lstat taken by the latest entry(), reused by the stat() that follows it in
        # the same request (nothing runs in between: the server is single-threaded)
        self._last: tuple[bytes, os.stat_result] | None = None
        # a read-only branch's directories as a lower index describes them (read, not probed)
        self.known: LayerKnowledge | None = None

    def hardlinks(self, ino: int) -> list[bytes]:
        """Every path of this (read-only) branch whose non-directory has inode INO.

        The first call walks the branch once and indexes the objects with more than one link.
        """
        if self._links is None:
            index: dict[int, list[bytes]] = {}
            self._walk_links(b"", index)
            self._links = index
        return self._links.get(ino, [])

    def _walk_links(self, rel: bytes, index: dict[int, list[bytes]]) -> None:
        try:
            fd = self.open_dir(rel, O_DIR_READ)
        except OSError:
            return
        try:
            with os.scandir(fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if de.is_dir(follow_symlinks=False):
                        self._walk_links(join(rel, name), index)
                    else:  # any non-directory can have hard links (fifos, symlinks, devices)
                        st = de.stat(follow_symlinks=False)
                        if st.st_nlink > 1:
                            index.setdefault(st.st_ino, []).append(join(rel, name))
        finally:
            os.close(fd)

    def drop_caches(self) -> None:
        """Forget everything learnt about this branch (read again on demand)."""
        self._listings.clear()
        self._dirinfo.clear()
        self._stats.clear()
        self._links = None
        self._last = None
        if not self.writable:
            self.forget_dirs()

    def close(self) -> None:
        self.forget_dirs()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- directory fds -------------------------------------------------------------------
    def open_dir(self, rel: bytes, flags: int = O_DIR_PATH) -> int:
        """A new fd for directory REL of this branch, never through a symlink."""
        if flags == O_DIR_PATH:
            return os.dup(self.dir_fd(rel))
        if not rel:
            return sl.openat2(self.fd, b".", flags)
        return sl.openat2(self.fd, rel, flags)

    def dir_fd(self, rel: bytes) -> int:
        """An O_PATH fd of directory REL, owned by the branch: do not close it, and do not keep
        it across another dir_fd call (which may close it to make room). In the upper branch the
        union calls `forget_dirs` whenever a directory moves or goes."""
        if not rel:
            return self.fd
        fds = self._dirfds
        fd = fds.get(rel)
        if fd is not None:
            fds.move_to_end(rel)
            return fd
        fd = sl.openat2(self.fd, rel, O_DIR_PATH)
        if len(fds) >= self.dirfd_max:
            os.close(fds.popitem(last=False)[1])
        fds[rel] = fd
        return fd

    def forget_dirs(self) -> None:
        """Close the cached directory fds (a directory of this branch moved or was removed)."""
        fds = self._dirfds
        while fds:
            os.close(fds.popitem()[1])

    # --- reading entries -----------------------------------------------------------------
    def stat(self, rel: bytes) -> os.stat_result:
        """lstat of REL (remembered for read-only branches; read from the lower index when it
        vouches for attributes, without a system call)."""
        if not self.writable:
            raw = self._stats.get(rel)
            if raw is not None:
                return unpack(raw)
            known = self.known.stat(rel) if self.known is not None else None
            if known is not None:
                return known
            if len(self._stats) >= self.stats_max:
                self._stats.clear()
            st = self._stat_lower(rel)
            self._stats[rel] = pack(st)
            return st
        return self._stat(rel)

    def _stat_lower(self, rel: bytes, pfd: int | None = None) -> os.stat_result:
        """lstat of REL of this read-only branch, read live: through the file handle its lower
        cache kept (the inode alone, not the directory that names it), else by name from the
        parent directory's fd (PFD if the caller has it open), the handle then learnt."""
        parent, name = split(rel)
        if not name:
            return os.fstat(self.fd)
        known = self.known
        if known is not None:
            st = known.stat_by_handle(rel)
            if st is not None:
                return st
        if pfd is None:
            pfd = self.dir_fd(parent)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if known is not None and not stat.S_ISDIR(st.st_mode):
            known.learn_handle(rel, pfd, name)
        return st

    def prefetch_stats(self, rel: bytes, names: list[bytes]) -> None:
        """Remember the lstat of NAMES in directory REL, through one directory fd (read-only
        branches; a readdirplus is about to look every entry up)."""
        if self.writable:
            return
        known = self.known
        todo = [n for n in names if join(rel, n) not in self._stats
                and (known is None or known.stat(join(rel, n)) is None)]
        if len(todo) < 2 or len(todo) > self.stats_max // 2:
            return
        if len(self._stats) + len(todo) >= self.stats_max:
            self._stats.clear()
        try:
            fd = self.open_dir(rel)
        except OSError:
            return
        try:
            for n in todo:
                try:
                    self._stats[join(rel, n)] = pack(self._stat_lower(join(rel, n), fd))
                except OSError:
                    pass
        finally:
            os.close(fd)

    def stat_after_entry(self, rel: bytes) -> os.stat_result:
        """stat() of the object the latest entry() call just classified, without a syscall
        when it was the upper's (call it only directly after that entry())."""
        last = self._last
        if last is not None:
            self._last = None
            if last[0] == rel:
                return last[1]
        return self.stat(rel)

    def _stat(self, rel: bytes) -> os.stat_result:
        # (`split` and `dir_fd("")` inline: the lower cache checks every layer directory here)
        parent, _, name = rel.rpartition(b"/")
        if not name:
            return os.fstat(self.fd)
        return os.stat(name, dir_fd=self.dir_fd(parent) if parent else self.fd,
                       follow_symlinks=False)

    lstat = _stat
    """lstat of REL asked of the branch itself, never cached nor read from an index (what a
    copy-up copies)."""

    def entry(self, parent: bytes, name: bytes, beside: bool = True) -> BranchEntry:
        """What this branch holds at PARENT/NAME, whiteouts and opaqueness classified.

        BESIDE=False (upper branch, a directory that merges no lower one): a `.wh.NAME` file
        beside a non-directory is not looked for; with nothing below to hide it cannot change
        what the name resolves to."""
        if not self.writable:
            # (the caches read inline: in a deep stack a lookup of a directory classifies the
            # name in every layer, and the calls cost more than the dictionaries)
            lst = self._listings.get(parent)
            e = (lst if lst is not None else self.listing(parent)).entry(name)
            if e.kind is _KIND_DIR:
                rel = join(parent, name)
                info = self._dirinfo.get(rel)
                if info is None:
                    info = self.dir_info(rel)
                if info is not _NO_INFO and (info.opaque or info.redirect is not None):
                    return BranchEntry(_KIND_DIR, info.opaque, e.hides_below, info.redirect)
            return e
        try:
            pfd = self.dir_fd(parent)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return MISSING
            raise
        return self._entry_at(pfd, parent, name, beside)

    def _entry_at(self, pfd: int, parent: bytes, name: bytes, beside: bool = True
                  ) -> BranchEntry:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            self._last = None
            if beside and _exists(pfd, b".wh." + name):
                return BranchEntry(Kind.MISSING, hides_below=True)
            return MISSING
        self._last = (join(parent, name), st)
        mode = st.st_mode
        hides = (beside or stat.S_ISDIR(mode)) and _exists(pfd, b".wh." + name)
        if stat.S_ISDIR(mode):
            rel = join(parent, name)
            opaque, redirect, dead = self.dir_info(rel)
            if dead is not None and dead.strip(b"/") == rel:
                return WHITEOUT
            if opaque or hides or redirect is not None:
                return BranchEntry(Kind.DIR, opaque, hides, redirect)
            return _DIR
        if is_chardev_whiteout(mode, st.st_rdev):
            return WHITEOUT
        return BranchEntry(Kind.OTHER, hides_below=True) if hides else _OTHER

    def dir_info(self, rel: bytes) -> DirInfo:
        """(opaque, redirect, dead) of directory REL: opaque by xattr or a .wh..wh..opq entry;
        the overlay.redirect value; the unionfs.dead value."""
        if not self.writable:
            info = self._dirinfo.get(rel)
            if info is not None:
                return info
            known = self.known.dir_info(rel) if self.known is not None else None
            if known is not None:
                info = DirInfo(known[0], known[1], None) if known[0] or known[1] else _NO_INFO
                if len(self._dirinfo) >= CACHE_MAX:
                    self._dirinfo.clear()
                self._dirinfo[rel] = info
                return info
        info = self._read_dir_info(rel, self.known if not self.writable else None)
        if not self.writable:
            if len(self._dirinfo) >= CACHE_MAX:
                self._dirinfo.clear()
            self._dirinfo[rel] = info
        return info

    def _read_dir_info(self, rel: bytes, learner: LayerKnowledge | None = None) -> DirInfo:
        try:
            fd = self.open_dir(rel)
        except OSError:
            return _NO_INFO
        try:
            dst = os.fstat(fd) if learner is not None else None
            opaque = _exists(fd, OPAQUE_MARKER)
            redirect = dead = None
            try:
                names = os.listxattr(sl.fd_path(fd))
            except OSError:
                names = []
            for n in names:
                bn = os.fsencode(n)
                if bn in OPAQUE_XATTRS and not opaque:
                    opaque = opaque_value(_getxattr(fd, bn)) == "y"
                elif bn in REDIRECT_XATTRS:
                    redirect = _getxattr(fd, bn)
                elif bn in DEAD_XATTRS and self.writable:
                    dead = _getxattr(fd, bn)
            if learner is not None:
                assert dst is not None
                learner.learn_dir_info(rel, dst, (opaque, redirect))
            if not (opaque or redirect or dead):
                return _NO_INFO
            return DirInfo(opaque, redirect, dead)
        finally:
            os.close(fd)

    def has_xwhiteouts(self, fd: int) -> bool:
        return any(opaque_value(_getxattr(fd, n)) == "x" for n in OPAQUE_XATTRS[:2])

    def names(self, rel: bytes) -> tuple[Mapping[bytes, object], Iterable[bytes]]:
        """The names of directory REL's entries (whiteouts included), and the names it hides
        below: what `listing` would hold, without building it where the lower cache has it
        (read-only: they may be the cache's own)."""
        if not self.writable:
            cached = self._listings.get(rel)
            if cached is not None:
                return cached.entries, cached.hidden
            known = self.known
            if known is not None:
                found = known.names(rel)
                if found is not None:
                    return found
        lst = self.listing(rel)
        return lst.entries, lst.hidden

    def listing(self, rel: bytes) -> Listing:
        """All entries of directory REL, classified (cached for read-only branches)."""
        if not self.writable:
            cached = self._listings.get(rel)
            if cached is not None:
                return cached
        lst = self.known.listing(rel) if self.known is not None else None
        if lst is None:
            lst = self._scan(rel, self.known if not self.writable else None)
        if not self.writable:
            if len(self._listings) >= CACHE_MAX >> 4:
                self._listings.clear()
            self._listings[rel] = lst
        return lst

    def _scan(self, rel: bytes, learner: LayerKnowledge | None = None) -> Listing:
        try:
            fd = self.open_dir(rel, O_DIR_READ)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return Listing()
            raise
        try:
            dst = os.fstat(fd) if learner is not None else None  # before reading (see lowercache)
            xwh = self.has_xwhiteouts(fd)
            entries: dict[bytes, BranchEntry] = {}
            hidden: set[bytes] = set()
            marker = False
            with os.scandir(fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if name.startswith(b".wh."):
                        if name == OPAQUE_MARKER:
                            marker = True
                            continue
                        target = whiteout_target(name)
                        if target is not None:
                            hidden.add(target)
                            continue
                    if de.is_dir(follow_symlinks=False):
                        entries[name] = _DIR
                        continue
                    if de.is_file(follow_symlinks=False) or de.is_symlink():
                        if xwh and de.is_file(follow_symlinks=False) and _is_xwhiteout(fd, name):
                            entries[name] = WHITEOUT
                        else:
                            entries[name] = _OTHER
                        continue
                    st = de.stat(follow_symlinks=False)
                    if is_chardev_whiteout(st.st_mode, st.st_rdev):
                        entries[name] = WHITEOUT
                    else:
                        entries[name] = _OTHER
            lst = Listing(entries, frozenset(hidden), marker)
            if learner is not None and not xwh:  # a file's xattr whiteout changes no directory
                assert dst is not None
                learner.learn_listing(rel, dst, lst)
            return lst
        finally:
            os.close(fd)


def _exists(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _getxattr(fd: int, name: bytes) -> bytes | None:
    try:
        return os.getxattr(sl.fd_path(fd), name)
    except OSError:
        return None


def _is_xwhiteout(dirfd: int, name: bytes) -> bool:
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != 0:
            return False
        return any(_getxattr(fd, n) is not None for n in WHITEOUT_XATTRS)
    finally:
        os.close(fd)
