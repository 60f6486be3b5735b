"""The pyfuse3 adapter: the only module that imports pyfuse3.

Each handler translates a kernel request into one call of the synchronous `Union` engine and its
answer back into pyfuse3 types. `OSError` becomes `FUSEError(errno)`; any other exception is a bug:
it is logged with its traceback, counted in `bugs`, and answered with EIO, so one bad request
never takes the mount down.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence

import pyfuse3

from .inodes import Node
from .log import Logger
from .union import Caller, Union

log = Logger("unionfs")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ParamSpec, TypeVar

    P = ParamSpec("P")
    R = TypeVar("R")

_ENOATTR = getattr(pyfuse3, "ENOATTR", errno.ENODATA)


# the synchronous entry points (`<name>_sync`) of the handlers, set on UnionOperations below
_SYNC_ENTRIES: dict[str, Callable[..., Any]] = {}


def _translating(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Make the synchronous handler FN the coroutine function pyfuse3 awaits (one coroutine per
    request: the handler's body never awaits), and register `<name>_sync`, what the patched
    pyfuse3 calls instead with `use_sync_handlers` (no coroutine at all). Both translate the
    handler's exceptions."""
    name = fn.__name__

    def make(direct: bool) -> Callable[P, R]:
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            self = args[0]
            assert isinstance(self, UnionOperations)
            if self.count_requests:
                self.requests[name] += 1
                if direct:
                    self.sync_requests += 1
                if self.debug:
                    log.debug("%s%r", name, args[1:])
            try:
                return fn(*args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except OSError as e:
                code = e.errno or errno.EIO
                if self.debug:
                    log.debug("%s%r -> %s", name, args[1:], errno.errorcode.get(code, code))
                raise pyfuse3.FUSEError(code) from None
            except Exception:
                self.bugs += 1
                log.exception("unionfs bug in %s%r; answering EIO", name, args[1:])
                raise pyfuse3.FUSEError(errno.EIO) from None
        return call

    inner = make(False)
    _SYNC_ENTRIES[name] = make(True)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return inner(*args, **kwargs)

    return wrapper


def dircache_supported() -> bool:
    """Whether this pyfuse3 can hand readdir the inode number when opendir is not implemented
    (the patch scripts/setup.sh applies; upstream pyfuse3 3.5 passes only the handle). Turning
    it on is global to the process, so callers do it once, right before serving."""
    return hasattr(pyfuse3, "use_inode_dir_handles")


def enable_dircache() -> None:
    pyfuse3.use_inode_dir_handles(True)


def noopen_supported() -> bool:
    """Whether this pyfuse3 hands read/write/fsync the inode number when open is not
    implemented (the patch scripts/setup.sh applies). Global to the process, like dircache."""
    return hasattr(pyfuse3, "use_inode_file_handles")


def enable_noopen() -> None:
    pyfuse3.use_inode_file_handles(True)


def flush_direct_supported() -> bool:
    """Whether this pyfuse3 can answer flush requests in C (the patch scripts/setup.sh
    applies): unionfs' flush has nothing to do but be answered, and the kernel sends one on
    every close, so it need not cost a Python request. Global to the process, like dircache."""
    return hasattr(pyfuse3, "answer_flush_directly")


def enable_flush_direct() -> None:
    pyfuse3.answer_flush_directly(True)


def sync_handlers_supported() -> bool:
    """Whether this pyfuse3 can call the handlers' synchronous entry points (`<name>_sync`)
    straight from libfuse's callbacks (the patch): no coroutine is made per request. Global to
    the process, like dircache."""
    return hasattr(pyfuse3, "use_sync_handlers")


def enable_sync_handlers() -> None:
    pyfuse3.use_sync_handlers(True)


def spin_supported() -> bool:
    """Whether `pyfuse3.main_blocking` can poll for the next request before sleeping (the
    patch's `spin_us`)."""
    return hasattr(pyfuse3, "spin_stats")


def direct_loop_supported() -> bool:
    """Whether this pyfuse3 can serve without trio (`pyfuse3.main_blocking`, the patch):
    every handler here runs to completion without suspending, so each request can be answered
    as soon as it is read, without a trip through trio's scheduler."""
    return hasattr(pyfuse3, "main_blocking")


class UnionOperations(pyfuse3.Operations):  # type: ignore[misc]
    supports_dot_lookup = True
    enable_acl = False
    # the kernel keeps symlink targets (the patched pyfuse3 asks for FUSE_CAP_CACHE_SYMLINKS): a
    # symlink's target never changes, a new target is a new symlink, so a new inode
    enable_symlink_cache = True

    def __init__(self, union: Union, timeout: float, writeback: bool = True,
                 debug: bool = False, count_requests: bool = False,
                 dircache: bool = False, noopen: bool = False, loop: str = "trio") -> None:
        super().__init__()
        self.union = union
        self.timeout = timeout
        self.enable_writeback_cache = writeback
        self.debug = debug
        self.count_requests = count_requests or debug
        self.requests: Counter[str] = Counter()
        self.sync_requests = 0  # of those, how many came through a `<name>_sync` entry
        self.view_writes = 0  # writes whose data came as a view of pyfuse3's buffer, not a copy
        self.bugs = 0
        self.dircache = dircache
        self.loop = loop  # how requests are received (see `mount.serve`)
        self.spin_us = 0  # the direct loop's spin before sleeping (set by `mount.serve`)
        # With `noopen`, open and create answer ENOSYS once: the kernel then sends no open,
        # create or release requests (regular files are made with mknod), keeps page caches
        # across opens, and pyfuse3 hands read/write/fsync the inode number (the patched
        # pyfuse3, see `noopen_supported`). I/O goes through per-inode handles in the engine.
        self.noopen = noopen
        union.per_inode_io = noopen
        self.on_init: Callable[[], None] | None = None  # called once FUSE_INIT is answered

    def init(self) -> None:
        # pyfuse3 calls this while answering FUSE_INIT; the reply goes out right after
        if self.on_init is not None:
            self.on_init()

    def stats(self) -> dict[str, Any]:
        """Request counts per handler (when counting) and how many of them were answered
        through the synchronous entry points (and how many writes got their data without a
        copy), handler bugs, CPU seconds so far, how many inodes the kernel holds, the
        request loop in use, and its spin: microseconds polled for the next request before
        sleeping, how many waits found one that way (hits), how many went to sleep after it
        (misses) and how many slept at once, the recent requests having come too late (skips);
        how many lower directories the lower cache answered (`lowercache_hits`) and how many
        lower objects it stat'ed through their kept file handles (`lowercache_handle_stats`), how
        many of its records were used as the helper found them at mount
        (`lowercache_checked_ahead`, see `lowercheck`), and whether a lower index is in use."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        hits, misses, skips = pyfuse3.spin_stats() if self.spin_us else (0, 0, 0)
        return {"requests": dict(self.requests), "sync_requests": self.sync_requests,
                "view_writes": self.view_writes,
                "bugs": self.bugs, "cpu_s": ru.ru_utime + ru.ru_stime,
                "nodes": len(self.union.inodes.nodes), "loop": self.loop,
                "spin_us": self.spin_us, "spin_hits": hits, "spin_misses": misses,
                "spin_skips": skips,
                "lowercache_hits": sum(c.hits for c in self.union.lcaches),
                "lowercache_handle_stats": sum(c.handle_stats for c in self.union.lcaches),
                "lowercache_checked_ahead": sum(c.checked_ahead for c in self.union.lcaches),
                "lowerindex": self.union.lindex is not None}

    # --- translation helpers ---------------------------------------------------------
    def _attr(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = st.st_mode
        a.st_nlink = self.union.nlink(node, st)
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    @staticmethod
    def _caller(ctx: Any) -> Caller:
        return Caller(ctx.uid, ctx.gid, ctx.umask)

    # --- lookups -----------------------------------------------------------------------
    @_translating
    def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        try:
            node, st = self.union.lookup(parent_inode, name)
        except FileNotFoundError:
            # a negative entry (inode 0) that the kernel may keep for the timeout: every change
            # that can make the name appear is an operation on it, which drops the entry
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = self.timeout
            return a
        return self._attr(node, st)

    @_translating
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.union.forget(ino, n)

    @_translating
    def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node, st = self.union.getattr(inode)
        return self._attr(node, st)

    @_translating
    def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        node, st = self.union.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh or None,  # 0: no handle (handles start at 1; without opens the kernel sends 0)
        )
        return self._attr(node, st)

    @_translating
    def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.union.readlink(inode)

    # --- creating and removing ------------------------------------------------------------
    @_translating
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        node, st = self.union.mknod(parent_inode, name, mode, rdev, self._caller(ctx))
        return self._attr(node, st)

    @_translating
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        node, st = self.union.mkdir(parent_inode, name, mode, self._caller(ctx))
        return self._attr(node, st)

    @_translating
    def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        node, st = self.union.symlink(parent_inode, name, target, self._caller(ctx))
        return self._attr(node, st)

    @_translating
    def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        node, st = self.union.link(inode, new_parent_inode, new_name)
        return self._attr(node, st)

    @_translating
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.union.unlink(parent_inode, name)

    @_translating
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.union.rmdir(parent_inode, name)

    @_translating
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.union.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # --- files -------------------------------------------------------------------------
    @_translating
    def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.noopen:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self.union.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_translating
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self.noopen:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel makes files with mknod then
        fh, node, st = self.union.create(parent_inode, name, mode, flags, self._caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(node, st)

    @_translating
    def read(self, fh: int, off: int, size: int) -> bytes:
        if self.noopen:
            return self.union.read_inode(fh, off, size)
        return self.union.read(fh, off, size)

    @_translating
    def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        # (through the synchronous entry, BUF is a view of pyfuse3's buffer, valid during this
        # call only: it is written at once and never kept)
        if self.count_requests and isinstance(buf, memoryview):
            self.view_writes += 1
        if self.noopen:
            return self.union.write_inode(fh, off, buf)
        return self.union.write(fh, off, buf)

    @_translating
    def flush(self, fh: int) -> None:
        # Nothing to do (a write was applied when it was answered), but answered, not refused
        # with ENOSYS: after one ENOSYS the kernel never sends flush again, and close() then
        # sends nothing that can fail unless the write left times to write back. Dirty pages
        # the kernel cannot send because the server is gone are dropped without an error, so
        # such a close() returned 0 for data never written; now the flush fails (ENOTCONN).
        pass

    @_translating
    def fsync(self, fh: int, datasync: bool) -> None:
        if self.noopen:
            self.union.fsync_inode(fh, datasync)
        else:
            self.union.fsync(fh, datasync)

    @_translating
    def release(self, fh: int) -> None:
        if not self.noopen:
            self.union.release(fh)

    # --- directories -------------------------------------------------------------------
    # Directory handles are inode numbers; readdir keeps no per-open state (offsets are
    # name hashes, see core.readdir). With `dircache`, opendir answers ENOSYS once: the kernel
    # then never sends opendir/releasedir again, caches listings itself (FOPEN_CACHE_DIR |
    # FOPEN_KEEP_CACHE, invalidated by every change it makes or we notify), and pyfuse3 hands
    # readdir the inode number (see `dircache_supported`).
    @_translating
    def opendir(self, inode: int, ctx: Any) -> int:
        if self.dircache:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self.union.opendir(inode)
        return inode

    @_translating
    def readdir(self, fh: int, start_id: int, token: Any) -> None:
        parent = fh
        listing = self.union.readdir(parent)
        # offsets: "." 1, ".." 2, entries their name offsets (> 2). The kernel counts no lookup
        # for "." and "..".
        if start_id < 2:
            dnode, dst = self.union.getattr(parent)
            if start_id == 0 and not pyfuse3.readdir_reply(token, b".", self._attr(dnode, dst), 1):
                return
            up = dnode.parent if dnode.parent is not None else dnode
            try:
                ust = dst if up is dnode else self.union.getattr(up.ino)[1]
            except OSError:
                up, ust = dnode, dst
            if not pyfuse3.readdir_reply(token, b"..", self._attr(up, ust), 2):
                return
        entries, offsets = listing.entries, listing.offsets
        dnode = self.union.node(parent)
        lookup = self.union.lookup_listed
        for i in range(listing.start(start_id), len(entries)):
            e = entries[i]
            try:
                node, st = lookup(dnode, e)
            except OSError:
                continue  # vanished (an unreadable lower object)
            if not pyfuse3.readdir_reply(token, e.name, self._attr(node, st), offsets[i]):
                self.union.forget(node.ino, 1)
                break

    @_translating
    def releasedir(self, fh: int) -> None:
        pass

    @_translating
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.union.fsyncdir(fh)

    # --- xattrs ------------------------------------------------------------------------
    @_translating
    def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.union.getxattr(inode, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(_ENOATTR) from None
            raise

    @_translating
    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.union.listxattr(inode)

    @_translating
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.union.setxattr(inode, name, value)

    @_translating
    def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        try:
            self.union.removexattr(inode, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(_ENOATTR) from None
            raise

    # --- misc --------------------------------------------------------------------------
    @_translating
    def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    @_translating
    def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = self.union.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize = sv.f_bsize
        d.f_frsize = sv.f_frsize
        d.f_blocks = sv.f_blocks
        d.f_bfree = sv.f_bfree
        d.f_bavail = sv.f_bavail
        d.f_files = sv.f_files
        d.f_ffree = sv.f_ffree
        d.f_favail = sv.f_favail
        d.f_namemax = max(sv.f_namemax - 4, 1)
        return d


for _name, _entry in _SYNC_ENTRIES.items():
    setattr(UnionOperations, _name + "_sync", _entry)
