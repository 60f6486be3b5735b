"""The union engine: applies the core's decisions to the branches with *at() system calls.

`Union` is synchronous and knows nothing of FUSE: every method takes and returns plain values
(nodes, `os.stat_result`, bytes) and reports expected failures as `OSError(errno)`; `ops` adapts
it to pyfuse3. It owns:

- the branches (upper = index 0 when present, lowers below it) and the work directory;
- the inode table (which nodes the kernel holds, their locations and lookup counts);
- open file handles (one real fd per open);
- copy-up, whiteouts and opaque markers in the upper branch.

Invariants:
- lower branches are never written;
- every change to the upper is made so that a crash leaves either the old or the new state of
  each name: new objects are built in the work directory and renamed into place;
- a node's `upper` flag is true iff the upper branch holds it at the node's path.
"""

from __future__ import annotations

import errno
import gc
import itertools
import os
import stat
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from . import atomicfile, copyup, layerindex, lowercache
from . import sys_linux as sl
from .branch import (
    LOWER_DIRFD_MIN,
    LOWER_DIRFDS,
    LOWER_STATS,
    LOWER_STATS_MIN,
    O_DIR_PATH,
    Branch,
    join,
    split,
)
from .config import Config
from .core.formats import (
    DEAD_XATTRS,
    FUSEOVL_OPAQUE,
    NAME_MAX,
    ORIGIN_XATTRS,
    REDIRECT_XATTRS,
    TRUSTED_OPAQUE,
    USER_OPAQUE,
    check_name,
    is_chardev_whiteout,
    is_private_xattr,
    wh_name,
)
from .core.readdir import Listing, MergedEntry, OffsetListing, count_subdirs, merge, with_offsets
from .core.resolve import (
    BranchEntry,
    Kind,
    Resolution,
    absolute_redirects,
    lower_exists,
    redirected_paths,
    resolve,
    whiteouts_refuse_removal,
)
from .inodes import ROOT_INO, InodeTable, Node
from .linkindex import LinkIndex, Pending, parse_key
from .log import Logger
from .lowercache import LayerCache
from .tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .lowercheck import Ahead

WORK_SUBDIR = "work"

log = Logger("unionfs")

O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_PLAIN_DIR = BranchEntry(Kind.DIR)
_UPPER_OTHER = Resolution(Kind.OTHER, (0,))  # a non-directory of the upper branch


class _PlainPaths(dict):  # type: ignore[type-arg]
    """`_resolve`'s paths when each is the parent's path in its branch plus the name (no
    moved directory on the way), so `_lookup_child` need not compare them one by one."""

    __slots__ = ()


# `shrink` once the kernel holds fewer than a quarter of at least this many inodes
SHRINK_MIN_NODES = 4096
SHRINK_CASCADE_NODES = 64
# per-inode I/O keeps at most this many files open (besides removed ones still in use)
IMPLICIT_MAX = 256
# directories of this many lower layers or more resolve names through `_holding_layers`
HOLDERS_MIN_LAYERS = 4
LOWER_MAPS_MAX = 1024  # directories whose `_LowerMap` is kept (all dropped when exceeded)


class _LowerMap:
    """Derived from one `Node.lowers` tuple (`Union._lower_map`). (Plain classes, not
    dataclasses: see `core.readdir.Listing`.)"""

    __slots__ = ("holders", "lowers", "rels")

    def __init__(self, lowers: tuple[tuple[int, bytes], ...], rels: dict[int, bytes]) -> None:
        self.lowers = lowers  # the tuple itself (keeps its id from being reused)
        self.rels = rels  # lower branch -> path there
        # name -> the lower branches listing or hiding it, top-first (`_holding_layers`)
        self.holders: dict[bytes, tuple[int, ...]] | None = None


def _sync(fd: int, datasync: bool) -> None:
    if datasync:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def _let_go(gone: int | os.stat_result | None) -> None:
    """Close what `Union._keep_gone` kept, if it is an fd."""
    if isinstance(gone, int):
        os.close(gone)


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _redirect_xattr(fd: int) -> bytes | None:
    """The overlay.redirect value of the directory open at FD (not O_PATH), if any."""
    try:
        names = os.listxattr(fd)
    except OSError:
        return None
    for n in names:
        if os.fsencode(n) in REDIRECT_XATTRS:
            try:
                return os.getxattr(fd, n)
            except OSError:
                return None
    return None


def _has_xattr(fd: int, name: bytes) -> bool:
    try:
        os.getxattr(sl.fd_path(fd), name)
        return True
    except OSError:
        return False


class Handle:
    __slots__ = ("fd", "flags", "gen", "node", "writable")

    def __init__(self, fd: int, node: Node, flags: int, gen: int, writable: bool) -> None:
        self.fd = fd
        self.node = node
        self.flags = flags
        self.gen = gen
        self.writable = writable

    def __repr__(self) -> str:
        return f"Handle(fd={self.fd}, node={self.node!r}, flags={self.flags:#o})"


class Caller(NamedTuple):
    """Who asks: the credentials new objects are created with."""

    uid: int = 0
    gid: int = 0
    umask: int = 0o022


ROOT_CALLER = Caller()


class Union:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.branches: list[Branch] = []
        self.upper: Branch | None = None
        self.work_fd = -1
        if config.upper is not None:
            self.upper = Branch(0, config.upper, writable=True)
            self.branches.append(self.upper)
        for p in config.lowers:
            self.branches.append(Branch(len(self.branches), p, writable=False))
        for b in self.branches:
            if not b.writable:
                b.dirfd_max = max(LOWER_DIRFD_MIN, LOWER_DIRFDS // len(config.lowers))
                b.stats_max = max(LOWER_STATS_MIN, LOWER_STATS // len(config.lowers))
        self.lindex: layerindex.LowerIndex | None = None
        self.build_index: str | None = None  # lowerindex=auto: built there at unmount
        index = config.lowerindex
        if index == layerindex.AUTO:
            assert config.lowercache, "lowerindex=auto keeps the index in the lower cache"
            index = lowercache.index_path(
                config.lowercache, [(b.path, b.fd) for b in self.branches if not b.writable])
            if not lowercache.trusted_file(index):
                self.build_index, index = index, None
        if index:
            try:
                self.lindex = layerindex.attach(index, self.branches, config.lowerindex_check)
            except layerindex.LowerIndexError as e:
                if config.lowerindex != layerindex.AUTO:
                    raise
                log.info("%s: rebuilt at unmount", e)
                self.build_index = index
        # what the lower layers hold, learnt by earlier mounts (not with an index: it knows)
        self.lcaches: list[LayerCache] = []
        if config.lowercache and self.lindex is None:
            stack = lowercache.Stack()
            for b in self.branches:
                if not b.writable:
                    b.known = cache = LayerCache(config.lowercache, b.path, b.fd, b.dir_fd, stack)
                    self.lcaches.append(cache)
        self.ahead: Ahead | None = None  # checking lcaches' records (`check_ahead`)
        self.privileged = os.geteuid() == 0
        self._fh = itertools.count(1)
        self._tmp = itertools.count(1)
        self._nlinks: dict[tuple[int, int], int] = {}
        self._resolutions: dict[Resolution, Resolution] = {}  # one shared object per value
        self._lower_others: dict[int, Resolution] = {}  # branch -> its OTHER resolution
        self._lower_maps: dict[int, _LowerMap] = {}  # id(node.lowers) -> (`_lower_map`)
        self._peak_nodes = 0  # most inodes the kernel held since the last `shrink`
        self._shrinking = False  # a shrink happened and the kernel has not grown back since
        self.per_inode_io = False  # set by the adapter when the kernel sends no open requests
        self._implicit: OrderedDict[int, int] = OrderedDict()  # ino -> handle, oldest first
        # Until the upper branch hides a name of a lower hard link (unlinked or replaced through
        # this mount, or an upper of unknown history), lower link counts are reported as the
        # branch has them (as overlayfs does), without `_visible_links`' walk of the whole
        # branch: stat of hard-linked files in a container stays cheap.
        self._links_hidden = config.upper is not None and bool(os.listdir(config.upper))
        self._moves_dirs = False  # the rename under way may move upper directories
        # moved directories of each branch (`_redirects`); the upper's entry is dropped whenever
        # a directory moves there
        self._redirect_maps: dict[int, dict[bytes, bytes]] = {}
        self.chardev_whiteouts = False
        self.trusted_xattrs = False
        self.links: LinkIndex | None = None  # copied-up hard links with names not linked yet
        if self.upper is not None:
            assert config.work is not None
            self._open_work(config.work)
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self.root = self._make_root()
        if self.links is not None:
            self._recover_links()

    # --- set-up ------------------------------------------------------------------------
    def _open_work(self, work: str) -> None:
        wfd = os.open(work, O_DIR_PATH)
        try:
            try:
                os.mkdir(WORK_SUBDIR, 0o700, dir_fd=wfd)
            except FileExistsError:
                pass
            self.work_fd = sl.openat2(wfd, WORK_SUBDIR.encode(), O_DIR_PATH)
            self.links = LinkIndex(wfd)
        finally:
            os.close(wfd)
        self.clean_work()
        self._probe_capabilities()

    def clean_work(self) -> None:
        """Remove leftovers of interrupted operations from the work directory."""
        rfd = sl.openat2(self.work_fd, b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(rfd):
                self._purge(self.work_fd, os.fsencode(name))
        finally:
            os.close(rfd)

    def _probe_capabilities(self) -> None:
        name = self._tmpname()
        try:
            os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=self.work_fd)
            os.unlink(name, dir_fd=self.work_fd)
            self.chardev_whiteouts = True
        except OSError:
            self.chardev_whiteouts = False
        try:
            os.mkdir(name, 0o700, dir_fd=self.work_fd)
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=self.work_fd)
            try:
                os.setxattr(sl.fd_path(fd), TRUSTED_OPAQUE, b"y")
                self.trusted_xattrs = True
            except OSError:
                self.trusted_xattrs = False
            finally:
                os.close(fd)
        finally:
            self._purge(self.work_fd, name)

    def _make_root(self) -> Node:
        entries = []
        for b in self.branches:
            opaque = b.dir_info(b"").opaque
            entries.append((b.index, BranchEntry(Kind.DIR, opaque=opaque)))
        res = resolve(entries)
        upper = self.upper is not None
        lowers = tuple((i, b"") for i in res.branches if i != 0 or self.upper is None)
        root = Node(ROOT_INO, None, b"", True, upper, lowers)
        root.nlookup = 1
        self.inodes.add(root)
        top = self.branches[res.branches[0]]
        st = os.fstat(top.fd)
        self.inodes.alias(st.st_dev, st.st_ino, ROOT_INO)
        return root

    def check_ahead(self) -> None:
        """Have a helper check the lower cache's records now, ahead of the lookups that use
        them (`lowercheck`; the server calls this once, when the mount is ready)."""
        if self.lcaches and self.ahead is None:
            from . import lowercheck  # (only a mount with cached layers: mmap comes with it)
            self.ahead = lowercheck.start(self.lcaches)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.stop()
        wrote = [cache.save() for cache in self.lcaches]
        if self.build_index is not None:
            self._build_auto_index(self.build_index)
            wrote.append(True)
        if any(wrote) and self.config.lowercache:
            lowercache.prune(self.config.lowercache)
        if self.links is not None:
            try:
                self.settle_links()  # leave the upper self-contained for any other reader
            except OSError as e:  # the records stay: the next mount links the names
                log.warning("hard links of copied-up files not completed: %s", e)
            self.links.close()
        for h in self.handles.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
        self.handles.clear()
        for node in self.inodes.nodes.values():
            _let_go(node.gone)
            node.gone = None
        for cache in self.lcaches:
            cache.close()
        for b in self.branches:
            b.close()
        if self.work_fd >= 0:
            os.close(self.work_fd)
            self.work_fd = -1

    def _build_auto_index(self, path: str) -> None:
        """`lowerindex=auto`: index the lower layers for the next mount (the kernel has let go
        of this one; nothing waits for it but the server's exit)."""
        try:
            atomicfile.make_private_dir(os.path.dirname(path))
            layerindex.write([b.path for b in self.branches if not b.writable], path, 0o600)
        except (OSError, layerindex.LowerIndexError) as e:
            log.warning("lower index for lowerindex=auto not built: %s", e)

    # --- locating ------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        try:
            return self.inodes.get(ino)
        except KeyError:
            raise _err(errno.ESTALE) from None

    def layers(self, node: Node) -> Iterator[tuple[Branch, bytes]]:
        """The branch directories a directory node merges, top-first."""
        if node.upper:
            assert self.upper is not None
            yield self.upper, node.path()
        for b, rel in node.lowers:
            yield self.branches[b], rel

    def where(self, node: Node) -> tuple[Branch, bytes]:
        """Branch and path of the object that represents NODE (its topmost one)."""
        if node.upper:
            assert self.upper is not None
            return self.upper, node.path()
        b, rel = node.lowers[0]
        return self.branches[b], rel

    def _resolve(self, parent: Node, name: bytes
                 ) -> tuple[Resolution, list[tuple[int, BranchEntry]], dict[int, bytes]]:
        """Resolve NAME in PARENT: (resolution, what each branch holds under NAME itself,
        path of NAME in each branch that contributes to the resolution)."""
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        if self.lindex is not None:  # the lower layers read from the index, if it knows them
            known = layerindex.resolve_indexed(
                self.lindex, self.upper, parent.path() if parent.upper else b"", parent.upper,
                parent.lowers, name)
            if known is not None:
                return known
        entries: list[tuple[int, BranchEntry]] = []
        paths: dict[int, bytes] = _PlainPaths()
        redirected: list[tuple[int, BranchEntry]] | None = None
        beside = bool(parent.lowers)  # (see `Branch.entry`)
        if len(parent.lowers) >= HOLDERS_MIN_LAYERS:
            probe: Iterable[tuple[Branch, bytes]] = self._holding_layers(parent, name)
        else:
            probe = self.layers(parent)
        for branch, rel in probe:
            e = branch.entry(rel, name, beside)
            b = branch.index
            entries.append((b, e))
            if redirected is not None:
                continue  # what lies under this very name still counts for whiteouts
            paths[b] = rel + b"/" + name if rel else name  # (`join` inline: once per layer)
            if e.redirect is not None and e.kind is Kind.DIR and not e.opaque:
                # a moved directory: the branches below hold its content elsewhere
                target = self._redirect_path(parent, b, e.redirect)
                redirected = list(entries)
                for below, r in self._lower_layers_at(target, b):
                    redirected.append((below, _PLAIN_DIR))
                    paths[below] = r
        if redirected is not None:
            return resolve(redirected), entries, dict(paths)
        return resolve(entries), entries, paths

    def _holding_layers(self, parent: Node, name: bytes) -> list[tuple[Branch, bytes]]:
        """`layers(parent)` without the lower layers whose directory neither holds NAME nor
        hides it (`.wh.NAME`): in a deep stack a lookup then costs what the layers holding the
        name cost, not one probe per layer. The layers' listings are read once per directory
        (they are cached by the branches, and by the lower cache across mounts)."""
        lm = self._lower_map(parent)
        names = lm.holders
        if names is None:
            names = lm.holders = {}
            for b, rel in lm.lowers:
                entries, hidden = self.branches[b].names(rel)
                for n in entries:
                    names[n] = (*names.get(n, ()), b)
                for n in hidden:
                    if n not in entries:
                        names[n] = (*names.get(n, ()), b)
        out = [(self.upper, parent.path())] if parent.upper and self.upper is not None else []
        rels = lm.rels
        branches = self.branches
        for b in names.get(name, ()):
            out.append((branches[b], rels[b]))
        return out

    def _lower_map(self, parent: Node) -> _LowerMap:
        """What is derived from PARENT's `lowers` tuple, made once per tuple (nodes of one
        directory share theirs): in a deep stack, a loop over the layers per request would cost
        more than the rest of the request."""
        lowers = parent.lowers
        lm = self._lower_maps.get(id(lowers))
        if lm is None or lm.lowers is not lowers:
            if len(self._lower_maps) >= LOWER_MAPS_MAX:
                self._lower_maps.clear()
            lm = self._lower_maps[id(lowers)] = _LowerMap(lowers, dict(lowers))
        return lm

    def _paths(self, parent: Node, name: bytes, branches: Iterable[int]) -> dict[int, bytes]:
        """Path of NAME in each of BRANCHES (which hold PARENT) when nothing moved."""
        rels = self._lower_map(parent).rels
        if parent.upper:
            up = parent.path()
            return {b: join(up if b == 0 else rels[b], name) for b in branches}
        return {b: join(rels[b], name) for b in branches}

    def _redirect_path(self, parent: Node, branch: int, redirect: bytes) -> bytes:
        value = redirect.rstrip(b"\0")
        if value.startswith(b"/"):
            return value.strip(b"/")
        # relative: a sibling in the parent's own lower directory
        below = [rel for b, rel in parent.lowers if b > branch]
        base = below[0] if below else parent.path()
        return join(base, value)

    def _lower_layers_at(self, path: bytes, above: int) -> list[tuple[int, bytes]]:
        """The merged directory at PATH in the branches below branch ABOVE, as layers.

        PATH is in the namespace those branches show together, so redirects met on the way
        (directories moved while those branches were the upper) are followed, as overlayfs
        does."""
        layers = [(b.index, b"") for b in self.branches[above + 1:]]
        walked = b""
        for comp in path.split(b"/") if path else ():
            found: list[tuple[int, bytes]] = []
            for b, rel in layers:
                e = self.branches[b].entry(rel, comp)
                k = e.kind
                if k is Kind.WHITEOUT or (k is Kind.OTHER and found):
                    break
                if k is Kind.OTHER:
                    return []
                if k is Kind.DIR:
                    found.append((b, join(rel, comp)))
                    if e.opaque or e.hides_below:
                        break
                    if e.redirect is not None:
                        v = e.redirect.rstrip(b"\0")
                        target = v.strip(b"/") if v.startswith(b"/") else join(walked, v)
                        found.extend(self._lower_layers_at(target, b))
                        break
                elif e.hides_below:
                    break
            if not found:
                return []
            layers = found
            walked = join(walked, comp)
        return layers

    def _node_for(self, parent: Node, name: bytes, res: Resolution, paths: dict[int, bytes],
                  register: bool = True, st: os.stat_result | None = None
                  ) -> tuple[Node, os.stat_result]:
        """The node for a resolved name (called right after `_resolve`, or with ST given)."""
        top = res.branches[0]
        if st is None:
            st = self.branches[top].stat_after_entry(paths[top])
        is_dir = res.kind is Kind.DIR
        upper = self.upper is not None and top == 0
        if is_dir:
            lowers = tuple([(b, paths[b]) for b in res.branches if not (upper and b == 0)])
        else:
            lowers = () if upper else ((top, paths[top]),)
        ino = self.inodes.number(st.st_dev, st.st_ino)
        node = self.inodes.nodes.get(ino)
        if node is not None and (node.unlinked or node.is_dir != is_dir):
            # the number belongs to an object that is gone but still known to the kernel
            ino = self.inodes.number(-1, next(self._tmp))
            self.inodes.alias(st.st_dev, st.st_ino, ino)
            node = None
        if node is None:
            node = Node(ino, parent, name, is_dir, upper, lowers)
            if register:
                self.inodes.add(node)
        else:
            if is_dir:
                node.parent, node.name = parent, name
            else:
                node.add_name(parent, name)
            node.upper = upper
            if node.lowers != lowers:  # (an equal tuple is kept: what `_lower_map` made of it
                node.lowers = lowers  # is keyed by its identity)
        return node, st

    # --- lookups and attributes ---------------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes) -> tuple[Node, os.stat_result]:
        """Find NAME in a directory; counts one kernel reference on success."""
        parent = self.node(parent_ino)
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if name == b".":
            node = parent
            st = self._stat(node)
        elif name == b"..":
            node = parent.parent or parent
            st = self._stat(node)
        else:
            node, st = self._lookup_child(parent, name)
        node.nlookup += 1
        return node, st

    def lookup_listed(self, parent: Node, entry: MergedEntry) -> tuple[Node, os.stat_result]:
        """`lookup` of ENTRY of PARENT's merged listing (readdirplus looks every entry up).

        A non-directory listed by a lower branch (`_lookup_listed_lower`), or by the upper
        branch in a directory that merges no lower one (nothing below, whiteouts are never
        listed), resolves to that object: it is stat'ed and known at once, without `_resolve`
        classifying the name again. The listing is as fresh as the name cache (every change
        drops both)."""
        upper = self.upper
        name = entry.name
        if entry.is_dir or (parent.children is not None and name in parent.children):
            return self.lookup(parent.ino, name)
        if entry.branch != 0 or upper is None:
            return self._lookup_listed_lower(parent, entry)
        if parent.lowers:
            return self.lookup(parent.ino, name)
        try:
            st = os.stat(name, dir_fd=upper.dir_fd(parent.path()), follow_symlinks=False)
        except FileNotFoundError:
            return self.lookup(parent.ino, name)
        if stat.S_ISDIR(st.st_mode) or is_chardev_whiteout(st.st_mode, st.st_rdev):
            return self.lookup(parent.ino, name)  # changed behind the union's back
        if parent.children is None:
            parent.children = {}
        parent.children[name] = _UPPER_OTHER
        node, st = self._node_for(parent, name, _UPPER_OTHER, {0: join(parent.path(), name)},
                                  st=st)
        node.nlookup += 1
        return node, st

    def _lookup_listed_lower(self, parent: Node, entry: MergedEntry
                             ) -> tuple[Node, os.stat_result]:
        """`lookup_listed` of a non-directory a lower branch supplies: the merged listing
        already chose that branch (no branch above holds, whites out or hides the name), which
        is what `_resolve` would conclude, so only the object is stat'ed. A hard link (more
        than one link, with copied-up links recorded) takes the full lookup, which may link
        its copy here."""
        b = entry.branch
        rel = self._lower_map(parent).rels.get(b)
        if rel is None:
            return self.lookup(parent.ino, entry.name)
        path = join(rel, entry.name)
        st = self.branches[b].stat(path)
        if st.st_nlink > 1 and self.links:
            return self.lookup(parent.ino, entry.name)
        res = self._lower_others.get(b)
        if res is None:
            r = Resolution(Kind.OTHER, (b,))
            res = self._lower_others[b] = self._resolutions.setdefault(r, r)
        if parent.children is None:
            parent.children = {}
        parent.children[entry.name] = res
        node, st = self._node_for(parent, entry.name, res, {b: path}, st=st)
        node.nlookup += 1
        return node, st

    def _lookup_child(self, parent: Node, name: bytes, link: bool = True
                      ) -> tuple[Node, os.stat_result]:
        # Which branches hold a name changes only through operations on its directory, which
        # drop the cache (`_changed`); attributes of upper objects are always read afresh.
        # A name whose paths are the parent's paths plus the name (no moved directory on the
        # way) is cached as its shared Resolution alone; others keep their paths too. Memory per
        # cached name is then one dict slot.
        children = parent.children
        hit = children.get(name) if children is not None else None
        if hit is not None:
            res: Resolution
            paths: dict[int, bytes]
            if isinstance(hit, Resolution):
                res = hit
                paths = self._paths(parent, name, res.branches)
            else:
                res, paths = hit  # type: ignore[misc]
                if 0 in paths and self.upper is not None:
                    # the directory may have moved since: the upper path follows it (lower
                    # paths are where the content comes from, which a move does not change)
                    paths = {**paths, 0: join(parent.path(), name)}
            top = res.branches[0]
            st = self.branches[top].stat(paths[top])
        else:
            res, _entries, paths = self._resolve(parent, name)
            if res.kind is Kind.MISSING:
                raise _err(errno.ENOENT)
            if children is None:
                children = parent.children = {}
            rels = self._lower_map(parent).rels
            up = parent.path() if parent.upper else None
            if type(paths) is _PlainPaths or all(
                    paths.get(b) == join(up, name) if b == 0 and up is not None else
                    b in rels and paths.get(b) == join(rels[b], name) for b in res.branches):
                children[name] = self._resolutions.setdefault(res, res)
            else:
                children[name] = (res, paths)
            top = res.branches[0]
            st = self.branches[top].stat_after_entry(paths[top])
        if st.st_nlink > 1 and top and link and self.links and res.kind is not Kind.DIR:
            rec = self.links.for_lower(top, st)
            if rec is not None:  # another name of a copied-up hard link: link the copy here
                self._link_at(self.links.fd, rec.key, parent, name)
                return self._lookup_child(parent, name, link=False)
        return self._node_for(parent, name, res, paths, st=st)

    def forget(self, ino: int, count: int) -> None:
        node = self.inodes.nodes.get(ino)
        self.inodes.forget(ino, count)
        if node is not None and node.gone is not None and ino not in self.inodes.nodes:
            _let_go(node.gone)
            node.gone = None
        if self.per_inode_io:
            node = self.inodes.nodes.get(ino)
            if node is not None and node.implicit and node.nlookup <= 0:
                self._drop_implicit(node)
        n = len(self.inodes.nodes)
        if n > self._peak_nodes:
            self._peak_nodes = n
            self._shrinking = False
        elif n * 4 < self._peak_nodes and self._peak_nodes >= (
                SHRINK_CASCADE_NODES if self._shrinking else SHRINK_MIN_NODES):
            # again at each further quarter while the kernel goes on forgetting: what the
            # first shrink kept was allocated among the nodes freed since
            self.shrink()
            self._shrinking = True

    def shrink(self) -> None:
        """Drop what is cached about names and lower branches (it is read again on demand).

        Done when the kernel has forgotten most of the inodes it held: the cached listings were
        allocated among the nodes just freed and would keep their memory pages in use, so the
        server could not return to its baseline."""
        self._peak_nodes = len(self.inodes.nodes)
        for b in self.branches:
            b.drop_caches()
        if self.lindex is not None:
            self.lindex.drop_caches()
        for cache in self.lcaches:
            cache.save()  # and forget: read again on demand
        for node in self.inodes.nodes.values():
            node.children = None
            node.merged = None
        self._nlinks.clear()
        self._redirect_maps.clear()
        self._lower_maps.clear()
        # a dict keeps the table of its largest size when emptied: copy the survivors out
        self.inodes.compact()
        gc.collect()  # cyclic garbage of past requests (exception tracebacks) waits for gen 2
        sl.malloc_trim()

    def _stat(self, node: Node) -> os.stat_result:
        if node.unlinked:
            if node.handles:
                return os.fstat(self.handles[next(iter(node.handles))].fd)
            if node.upper or not node.lowers:
                gone = node.gone
                if isinstance(gone, int):
                    return os.fstat(gone)
                if gone is not None:
                    return gone
                raise _err(errno.ENOENT)
            # a removed lower object is still where it was in its branch
        branch, rel = self.where(node)
        return branch.stat(rel)

    def getattr(self, ino: int) -> tuple[Node, os.stat_result]:
        node = self.node(ino)
        return node, self._stat(node)

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link count as the union shows it: merged directories count their merged subdirs."""
        if node.unlinked:
            return 0
        if node.is_dir and (len(node.lowers) + node.upper) > 1:
            return 2 + self._subdirs(node)
        if st.st_nlink > 1:
            if not node.upper and node.lowers and self._links_hidden:
                return self._visible_links(node.lowers[0][0], st.st_ino)
            if node.upper and self.links:
                rec = self.links.for_copy(st)
                if rec is not None:  # names not linked yet count, the record does not
                    return rec.nlink
        return st.st_nlink

    def _subdirs(self, node: Node) -> int:
        """How many subdirectories merged directory NODE shows: counted once until something
        changes in it, from its merged listing if it was listed, else from its layers' listings
        without merging them (a lookup on the way to a name needs the count, not the listing)."""
        cached = node.merged
        if isinstance(cached, OffsetListing):
            return cached.count_subdirs()
        if isinstance(cached, int):
            return cached
        n = count_subdirs(self._layer_listings(node))
        node.merged = n
        return n

    def _visible_links(self, branch: int, ino: int) -> int:
        """How many names of a hard-linked lower file the union shows (whiteouts and opaque
        directories above hide some of the names the branch counts)."""
        key = (branch, ino)
        n = self._nlinks.get(key)
        if n is None:
            n = len(self._union_names(branch, self.branches[branch].hardlinks(ino)))
            self._nlinks[key] = n = max(n, 1)
        return n

    def _union_names(self, branch: int, paths: list[bytes]) -> list[tuple[Node, bytes]]:
        """Where the union shows what lower BRANCH holds at PATHS (the names of one hard-linked
        object there): (directory node, name) for each union name that resolves to one of them.

        A name is first looked for at its own path; one not found there may be shown elsewhere
        by a moved directory above it (redirect), or be hidden. Only then are the branches above
        read for moved directories (`redirected_paths`)."""
        out: list[tuple[Node, bytes]] = []
        missing: list[bytes] = []
        for path in paths:
            hit = self._shows(path, branch, path)
            if hit is None:
                missing.append(path)
            else:
                out.append(hit)
        if missing:
            maps = [self._redirects(b) for b in range(branch - 1, -1, -1)]
            if any(maps):
                for path in missing:
                    for cand in sorted(redirected_paths(path, maps)):
                        if cand != path:
                            hit = self._shows(cand, branch, path)
                            if hit is not None:
                                out.append(hit)
        return out

    def _shows(self, union_path: bytes, branch: int, path: bytes) -> tuple[Node, bytes] | None:
        """(directory node, name) of UNION_PATH if it shows the non-directory BRANCH holds at
        PATH, else None."""
        found = self._walk(union_path)
        if found is None:
            return None
        parent, name, res, paths = found
        if res.kind is Kind.OTHER and res.branches[0] == branch and paths.get(branch) == path:
            return parent, name
        return None

    def _redirects(self, index: int) -> dict[bytes, bytes]:
        """Branch INDEX's moved directories: path -> where the branches below hold its content
        (`absolute_redirects`). Read once for a lower branch, for the upper again after a
        directory moved there."""
        found = self._redirect_maps.get(index)
        if found is None:
            branch = self.branches[index]
            raw: dict[bytes, bytes] = {}
            todo = [b""]
            while todo:
                rel = todo.pop()
                try:
                    fd = branch.open_dir(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                         | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    if rel:
                        value = _redirect_xattr(fd)
                        if value is not None:
                            raw[rel] = value
                    with os.scandir(fd) as it:
                        todo.extend(join(rel, os.fsencode(de.name)) for de in it
                                    if de.is_dir(follow_symlinks=False))
                finally:
                    os.close(fd)
            found = self._redirect_maps[index] = absolute_redirects(raw)
        return found

    def merged(self, node: Node) -> list[MergedEntry]:
        """The merged listing of a directory node, in offset order (cached until something
        changes in it)."""
        return self.listing(node).entries

    def listing(self, node: Node) -> OffsetListing:
        """The merged listing of a directory node with the offsets readdir hands out."""
        cached = node.merged
        if isinstance(cached, OffsetListing):
            return cached  # (else None, or only its subdirectories counted)
        out = with_offsets(merge(self._layer_listings(node)))
        node.merged = out
        return out

    def _layer_listings(self, node: Node) -> Iterator[tuple[int, Listing]]:
        """Each branch's listing of directory NODE, top-first (what merging folds)."""
        return ((b.index, b.listing(rel)) for b, rel in self.layers(node))

    def _changed(self, node: Node, *names: bytes) -> None:
        """NAMES in directory NODE changed (all of it when none is given): drop what was cached
        about them. No operation changes what a name means without passing here."""
        node.merged = None
        if self._nlinks:
            self._nlinks.clear()
        children = node.children
        if children is None:
            return
        if not names:
            node.children = None
        for name in names:
            children.pop(name, None)

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        branch, rel = self.where(node)
        parent, name = split(rel)
        pfd = branch.open_dir(parent)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    # --- upper-branch helpers -------------------------------------------------------------
    def _need_upper(self) -> Branch:
        if self.upper is None:
            raise _err(errno.EROFS)
        return self.upper

    def _tmpname(self) -> bytes:
        return b"#%x.%d" % (next(self._tmp), os.getpid())

    def _purge(self, dirfd: int, name: bytes) -> None:
        """Remove DIRFD/NAME recursively (used only inside the work directory)."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dirfd)
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dirfd)
        try:
            for child in os.listdir(fd):
                self._purge(fd, os.fsencode(child))
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dirfd)

    def _upper_dir(self, node: Node) -> int:
        """An O_PATH fd of NODE's directory in the upper branch (copied up first)."""
        upper = self._need_upper()
        self.copy_up(node)
        return upper.open_dir(node.path())

    def _set_opaque(self, path: str) -> None:
        os.setxattr(path, TRUSTED_OPAQUE if self.trusted_xattrs else USER_OPAQUE, b"y")

    def _clear_opaque(self, path: str) -> None:
        for n in (TRUSTED_OPAQUE, USER_OPAQUE, FUSEOVL_OPAQUE):
            try:
                os.removexattr(path, n)
            except OSError:
                pass

    def _make_whiteout(self, pfd: int, name: bytes, existing: str | None) -> None:
        """Leave a whiteout at PFD/NAME. EXISTING: None, "file" or "dir" (an upper object there,
        already checked to hide only empty content) which the whiteout replaces atomically."""
        if existing == "dir":
            self._dirs_moved()
        if self.chardev_whiteouts:
            tmp = self._tmpname()
            if existing is None:
                os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
                return
            os.mknod(tmp, stat.S_IFCHR | 0o000, 0, dir_fd=self.work_fd)
            if existing == "dir":
                sl.renameat2(self.work_fd, tmp, pfd, name, sl.RENAME_EXCHANGE)
                self._purge(self.work_fd, tmp)
            else:
                sl.renameat2(self.work_fd, tmp, pfd, name)
            return
        wh = wh_name(name)
        fd = os.open(wh, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o000,
                     dir_fd=pfd)
        os.close(fd)
        if existing == "dir":
            tmp = self._tmpname()
            sl.renameat2(pfd, name, self.work_fd, tmp)
            self._purge(self.work_fd, tmp)
        elif existing == "file":
            os.unlink(name, dir_fd=pfd)

    def _dirs_moved(self) -> None:
        """An upper directory is about to move or go: its cached fd (`Branch.dir_fd`) and
        those of everything below it would name the wrong directory."""
        if self.upper is not None:
            self.upper.forget_dirs()

    def _remove_upper(self, pfd: int, name: bytes, is_dir: bool) -> None:
        if not is_dir:
            os.unlink(name, dir_fd=pfd)
            return
        self._dirs_moved()
        try:
            os.rmdir(name, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # only whiteouts and markers are left in it (the merged view is empty)
            tmp = self._tmpname()
            sl.renameat2(pfd, name, self.work_fd, tmp)
            self._purge(self.work_fd, tmp)

    @staticmethod
    def _own_fd(fd: int, uid: int, gid: int, mode: int) -> None:
        """Give a new object its owner; chown clears set-id bits, so the mode comes after."""
        os.fchown(fd, uid, gid)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            os.fchmod(fd, stat.S_IMODE(mode))

    def _owner(self, parent_st: os.stat_result, caller: Caller, mode: int
               ) -> tuple[int, int, int]:
        gid = caller.gid
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return caller.uid, gid, mode

    # --- copy-up -----------------------------------------------------------------------
    def copy_up(self, node: Node) -> None:
        """Make the upper branch hold NODE (and its parents), keeping its inode number."""
        if node.upper:
            return
        upper = self._need_upper()
        parent = node.parent
        assert parent is not None, "the root always exists in the upper branch"
        self.copy_up(parent)
        if node.is_dir and upper.entry(parent.path(), node.name).kind is Kind.DIR:
            # copied up meanwhile through another node object of the same directory (the
            # names `_copy_up_links` resolves are found before any of them is linked)
            node.upper = True
            return
        src_branch, src_rel = node.lowers[0]
        src = self.branches[src_branch]
        sparent, sname = split(src_rel)
        st = src.lstat(src_rel)  # afresh: what is copied is the object, not what an index says
        spfd = src.open_dir(sparent)
        upfd = upper.open_dir(parent.path())
        tmp = self._tmpname()
        # the other names of a lower hard link are linked lazily (`linkindex`) unless link
        # counts are exact already (then the walk that finds the names is paid anyway)
        rec: Pending | None = None
        defer = (not node.is_dir and st.st_nlink > 1 and not src.writable
                 and not self._links_hidden and self.links is not None)
        try:
            pst = os.fstat(upfd)
            try:
                copyup.copy_object(spfd, sname, self.work_fd, tmp, st, self.privileged)
                if defer:
                    assert self.links is not None
                    rec = self.links.record(self.work_fd, tmp, src_branch, st, node.ino)
                sl.renameat2(self.work_fd, tmp, upfd, node.name, sl.RENAME_NOREPLACE)
            except BaseException:
                self._purge(self.work_fd, tmp)
                if rec is not None:
                    assert self.links is not None
                    self.links.drop(rec.key)
                raise
            # a copy-up is no change of the directory: keep its times (as overlayfs does)
            self._restore_times(upfd, pst)
            ust = os.stat(node.name, dir_fd=upfd, follow_symlinks=False)
        finally:
            os.close(spfd)
            os.close(upfd)
        self.inodes.alias(ust.st_dev, ust.st_ino, node.ino)
        node.upper = True
        if not node.is_dir:
            node.lowers = ()
            node.gen += 1
        self._changed(parent, node.name)
        if rec is not None:
            assert self.links is not None
            self.links.add(rec, ust)
            self._link_known_names(node, rec, st)
        elif not node.is_dir and st.st_nlink > 1 and not src.writable:
            self._copy_up_links(node, src, st)

    @staticmethod
    def _restore_times(dirfd: int, st: os.stat_result) -> None:
        os.utime(sl.fd_path(dirfd), ns=(st.st_atime_ns, st.st_mtime_ns))

    def _copy_up_links(self, node: Node, src: Branch, st: os.stat_result) -> None:
        """Hard links survive copy-up: every other visible name of the lower inode becomes a
        link to the new upper object."""
        assert node.parent is not None and self.upper is not None
        spfd = self.upper.open_dir(node.parent.path())
        try:
            self._link_names(src.index, st.st_ino, spfd, node.name, node)
        finally:
            os.close(spfd)

    def _link_names(self, branch: int, ino: int, src_fd: int, src_name: bytes,
                    node: Node | None) -> None:
        """Link SRC_FD/SRC_NAME (the copy of lower object INO of BRANCH) at every union name
        that still shows the lower object (NODE, if known, learns the names)."""
        assert self.upper is not None
        for parent, name in self._union_names(branch, self.branches[branch].hardlinks(ino)):
            if node is not None and parent is node.parent and name == node.name:
                continue  # the name the copy was placed at
            self._link_at(src_fd, src_name, parent, name)
            if node is not None:
                node.add_name(parent, name)

    def _link_at(self, src_fd: int, src_name: bytes, parent: Node, name: bytes) -> None:
        """Link SRC_FD/SRC_NAME at union name PARENT/NAME, keeping the directory's times."""
        assert self.upper is not None
        self.copy_up(parent)
        dpfd = self.upper.open_dir(parent.path())
        try:
            pst = os.fstat(dpfd)
            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dpfd, follow_symlinks=False)
            self._restore_times(dpfd, pst)
        finally:
            os.close(dpfd)
        self._changed(parent, name)

    def _link_known_names(self, node: Node, rec: Pending, st: os.stat_result) -> None:
        """Link REC's copy at the other names of NODE that the kernel knows (the operation under
        way may be on one of them: the copy is placed at the node's first name)."""
        assert self.links is not None
        for parent, name in list(node.aliases or ()):
            res, _, paths = self._resolve(parent, name)
            if res.kind is Kind.OTHER and res.branches[0] == rec.branch:
                lst = self.branches[rec.branch].stat(paths[rec.branch])
                if (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
                    self._link_at(self.links.fd, rec.key, parent, name)

    def settle_links(self) -> None:
        """Link every name still pending in the hard-link index (see `linkindex`)."""
        links = self.links
        if not links:
            return
        assert links is not None
        for rec in list(links.by_lower.values()):
            node = self.inodes.nodes.get(rec.node_ino)
            if node is not None and (node.unlinked or node.is_dir):
                node = None
            self._link_names(rec.branch, rec.ino, links.fd, rec.key, node)
            links.drop(rec.key)

    def _recover_links(self) -> None:
        """Complete the records an earlier mount left (it was killed before it could)."""
        links = self.links
        assert links is not None
        for key in links.leftovers():
            parsed = parse_key(key)
            branch = parsed[0] if parsed is not None else -1
            if (parsed is None or not 0 < branch < len(self.branches)
                    or os.fstat(self.branches[branch].fd).st_dev != parsed[1]):
                log.warning("dropping hard-link record %r: its lower branch is not here", key)
                links.drop(key)
                continue
            assert parsed is not None
            self._link_names(branch, parsed[2], links.fd, key, None)
            links.drop(key)

    def _walk(self, rel: bytes
              ) -> tuple[Node, bytes, Resolution, dict[int, bytes]] | None:
        """Resolve a union path from the root without telling the kernel about it."""
        parts = rel.split(b"/")
        node = self.root
        for comp in parts[:-1]:
            res, _, paths = self._resolve(node, comp)
            if res.kind is not Kind.DIR:
                return None
            node, _st = self._node_for(node, comp, res, paths, register=False)
        res, _, paths = self._resolve(node, parts[-1])
        return node, parts[-1], res, paths

    # --- creating ----------------------------------------------------------------------
    def _prepare_create(self, parent: Node, name: bytes) -> tuple[int, bool, bool, bool]:
        """Checks for a new NAME in PARENT; returns (upper parent fd, whether a whiteout is
        replaced, whether a new directory there must be opaque, whether a `.wh.NAME` file beside
        it must go once NAME exists: readers such as fuse-overlayfs take it to hide NAME too)."""
        code = check_name(name)
        if code:
            raise _err(code)
        self._need_upper()
        res, entries, _ = self._resolve(parent, name)
        if res.kind is not Kind.MISSING:
            raise _err(errno.EEXIST)
        pfd = self._upper_dir(parent)
        assert self.upper is not None
        ue = self.upper.entry(parent.path(), name)
        replace = ue.kind is Kind.WHITEOUT
        # a new directory must hide whatever an old whiteout hid (kernel overlayfs marks it
        # opaque likewise, so every reader agrees)
        below = replace or ue.hides_below or lower_exists(entries)
        return pfd, replace, below, ue.hides_below

    def _place(self, pfd: int, name: bytes, tmp: bytes, is_dir: bool, replace: bool) -> None:
        """Rename a finished object from the work dir to PFD/NAME (over a whiteout)."""
        if not replace:
            sl.renameat2(self.work_fd, tmp, pfd, name, sl.RENAME_NOREPLACE)
        elif is_dir:
            self._dirs_moved()  # the whiteout replaced may be a directory (`DEAD_XATTRS`)
            sl.renameat2(self.work_fd, tmp, pfd, name, sl.RENAME_EXCHANGE)
            self._purge(self.work_fd, tmp)
        else:
            sl.renameat2(self.work_fd, tmp, pfd, name)

    def _drop_wh(self, pfd: int, name: bytes) -> None:
        try:
            os.unlink(wh_name(name), dir_fd=pfd)
        except FileNotFoundError:
            pass

    def _new_node(self, parent: Node, name: bytes, pfd: int, drop_wh: bool = False
                  ) -> tuple[Node, os.stat_result]:
        if drop_wh:
            self._drop_wh(pfd, name)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        assert self.upper is not None
        res = Resolution(Kind.DIR if stat.S_ISDIR(st.st_mode) else Kind.OTHER, (0,))
        node, st = self._node_for(parent, name, res, {0: join(parent.path(), name)}, st=st)
        node.nlookup += 1
        self._changed(parent, name)
        return node, st

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int,
              caller: Caller = ROOT_CALLER) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM)  # a 0/0 device is a whiteout: it could never be shown
        pfd, replace, _, drop_wh = self._prepare_create(parent, name)
        try:
            pst = os.fstat(pfd)
            uid, gid, mode = self._owner(pst, caller, mode & ~caller.umask)
            tmp = self._tmpname()
            os.mknod(tmp, mode, rdev, dir_fd=self.work_fd)
            try:
                if self.privileged:
                    os.chown(tmp, uid, gid, dir_fd=self.work_fd, follow_symlinks=False)
                    if mode & (stat.S_ISUID | stat.S_ISGID):
                        os.chmod(tmp, stat.S_IMODE(mode), dir_fd=self.work_fd)
                self._place(pfd, name, tmp, False, replace)
            except BaseException:
                self._purge(self.work_fd, tmp)
                raise
            return self._new_node(parent, name, pfd, drop_wh)
        finally:
            os.close(pfd)

    def mkdir(self, parent_ino: int, name: bytes, mode: int,
              caller: Caller = ROOT_CALLER) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        pfd, replace, below, drop_wh = self._prepare_create(parent, name)
        try:
            pst = os.fstat(pfd)
            uid, gid, mode = self._owner(pst, caller, stat.S_IFDIR | (mode & ~caller.umask))
            tmp = self._tmpname()
            os.mkdir(tmp, 0o700, dir_fd=self.work_fd)
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self.work_fd)
                try:
                    if below:
                        self._set_opaque(sl.fd_path(fd))
                    if self.privileged:
                        os.fchown(fd, uid, gid)
                    os.fchmod(fd, stat.S_IMODE(mode))
                finally:
                    os.close(fd)
                self._place(pfd, name, tmp, True, replace)
            except BaseException:
                self._purge(self.work_fd, tmp)
                raise
            return self._new_node(parent, name, pfd, drop_wh)
        finally:
            os.close(pfd)

    def symlink(self, parent_ino: int, name: bytes, target: bytes,
                caller: Caller = ROOT_CALLER) -> tuple[Node, os.stat_result]:
        parent = self.node(parent_ino)
        pfd, replace, _, drop_wh = self._prepare_create(parent, name)
        try:
            pst = os.fstat(pfd)
            uid, gid, _ = self._owner(pst, caller, stat.S_IFLNK)
            tmp = self._tmpname()
            os.symlink(target, tmp, dir_fd=self.work_fd)
            try:
                if self.privileged:
                    os.chown(tmp, uid, gid, dir_fd=self.work_fd, follow_symlinks=False)
                self._place(pfd, name, tmp, False, replace)
            except BaseException:
                self._purge(self.work_fd, tmp)
                raise
            return self._new_node(parent, name, pfd, drop_wh)
        finally:
            os.close(pfd)

    def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
               caller: Caller = ROOT_CALLER) -> tuple[int, Node, os.stat_result]:
        parent = self.node(parent_ino)
        pfd, replace, _, drop_wh = self._prepare_create(parent, name)
        try:
            pst = os.fstat(pfd)
            uid, gid, mode = self._owner(pst, caller, mode & ~caller.umask)
            oflags = self._open_flags(flags)
            if replace:
                tmp = self._tmpname()
                fd = os.open(tmp, oflags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode),
                             dir_fd=self.work_fd)
                try:
                    if self.privileged:
                        self._own_fd(fd, uid, gid, mode)
                    self._place(pfd, name, tmp, False, True)
                except BaseException:
                    os.close(fd)
                    self._purge(self.work_fd, tmp)
                    raise
            else:
                fd = os.open(name, oflags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode),
                             dir_fd=pfd)
                if self.privileged:
                    try:
                        self._own_fd(fd, uid, gid, mode)
                    except BaseException:
                        os.close(fd)
                        os.unlink(name, dir_fd=pfd)
                        raise
            node, st = self._new_node(parent, name, pfd, drop_wh)
            return self._add_handle(fd, node, flags), node, st
        finally:
            os.close(pfd)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes
             ) -> tuple[Node, os.stat_result]:
        node = self.node(ino)
        if node.is_dir:
            raise _err(errno.EPERM)
        parent = self.node(new_parent_ino)
        pfd, replace, _, drop_wh = self._prepare_create(parent, new_name)
        try:
            self.copy_up(node)
            if self.links:
                # link counts become exact before one changes, including the names a copy-up
                # of a lower hard link (this one's too) left pending with the lower count
                self.settle_links()
            assert node.parent is not None and self.upper is not None
            spfd = self.upper.open_dir(node.parent.path())
            try:
                if replace:
                    tmp = self._tmpname()
                    os.link(node.name, tmp, src_dir_fd=spfd, dst_dir_fd=self.work_fd,
                            follow_symlinks=False)
                    self._place(pfd, new_name, tmp, False, True)
                else:
                    os.link(node.name, new_name, src_dir_fd=spfd, dst_dir_fd=pfd,
                            follow_symlinks=False)
            finally:
                os.close(spfd)
            if drop_wh:
                self._drop_wh(pfd, new_name)
            st = os.stat(new_name, dir_fd=pfd, follow_symlinks=False)
            node.add_name(parent, new_name)
            node.nlookup += 1
            self._changed(parent, new_name)
            return node, st
        finally:
            os.close(pfd)

    # --- removing ----------------------------------------------------------------------
    def _remove(self, parent_ino: int, name: bytes, want_dir: bool) -> None:
        parent = self.node(parent_ino)
        self._need_upper()
        if self.links:
            self.settle_links()  # link counts become exact before one changes
        res, entries, paths = self._resolve(parent, name)
        if res.kind is Kind.MISSING:
            raise _err(errno.ENOENT)
        is_dir = res.kind is Kind.DIR
        if want_dir and not is_dir:
            raise _err(errno.ENOTDIR)
        if not want_dir and is_dir:
            raise _err(errno.EISDIR)
        node, st = self._node_for(parent, name, res, paths, register=False)
        if is_dir and self.merged(node):
            raise _err(errno.ENOTEMPTY)
        in_upper = res.branches[0] == 0 and self.upper is not None
        self._hiding(node, st)
        if in_upper and not is_dir:
            self.keep_reachable(node, st)
        below = lower_exists(entries)
        if is_dir and self._whiteouts_refuse(node, below, replaced=False):
            raise _err(errno.ENOTEMPTY)
        gone = self._keep_gone(node, st) if in_upper else None
        try:
            if is_dir:
                pfd = self._upper_dir(parent)  # its own fd: removing a directory drops the cache
                try:
                    if below:
                        self._make_whiteout(pfd, name, "dir" if in_upper else None)
                    elif in_upper:
                        self._remove_upper(pfd, name, True)
                finally:
                    os.close(pfd)
            else:
                self.copy_up(parent)
                assert self.upper is not None
                pfd = self.upper.dir_fd(parent.path())  # borrowed: nothing here moves dirs
                if below:
                    self._make_whiteout(pfd, name, "file" if in_upper else None)
                elif in_upper:
                    os.unlink(name, dir_fd=pfd)
        except BaseException:
            _let_go(gone)
            raise
        self._changed(parent, name)
        self._after_unlink(node, parent, name, gone)

    def _hiding(self, node: Node, st: os.stat_result) -> None:
        """NODE's name is about to go (unlinked or replaced): if it is a name of a hard-linked
        lower object, link counts must from now on count the names the union shows."""
        if not node.is_dir and not node.upper and st.st_nlink > 1 and not self._links_hidden:
            self._links_hidden = True
            self._nlinks.clear()

    def _whiteouts_refuse(self, node: Node, lower_below: bool, replaced: bool) -> bool:
        """Whether directory NODE (its merged view empty) cannot be removed or replaced because
        of whiteouts left in its upper directory (kernel overlayfs' rule for "pure upper"
        directories, see `whiteouts_refuse_removal`)."""
        if self.upper is None or not node.upper or node.lowers:
            return False
        lst = self.upper.listing(node.path())
        holds = bool(lst.hidden) or any(e.kind is Kind.WHITEOUT for e in lst.entries.values())
        if not whiteouts_refuse_removal(True, False, holds, lower_below, replaced):
            return False  # decided without reading the origin mark
        fd = self._opath(node)
        try:
            copied_up = any(_has_xattr(fd, n) for n in ORIGIN_XATTRS)
        finally:
            os.close(fd)
        return whiteouts_refuse_removal(True, copied_up, holds, lower_below, replaced)

    def _after_unlink(self, node: Node, parent: Node, name: bytes,
                      gone: int | os.stat_result | None = None) -> None:
        """NODE lost the name PARENT/NAME; GONE: what `_keep_gone` kept of its object."""
        if node.is_dir or not node.drop_name(parent, name):
            node.unlinked = True
            if gone is not None and node.gone is None:
                node.gone, gone = gone, None
        _let_go(gone)

    def _keep_gone(self, node: Node, st: os.stat_result) -> int | os.stat_result | None:
        """Upper NODE (its lstat ST) is about to be removed or replaced while the kernel holds
        it: what its attributes will still be read from, as kernel overlayfs reads them from
        the removed upper inode (an fstat of an open directory after its rmdir: st_nlink 0,
        and on ext4 st_size 0). A directory is kept open (O_PATH) until the kernel forgets it;
        a non-directory keeps ST (nothing of it changes but the link count, which `nlink`
        makes 0), unless handles of it are open (then they are fstat'ed). An unlinked node
        without handles gets none (`open` refuses it), so the kernel's forget, or the
        unmount, is where a kept fd is closed."""
        if self.inodes.nodes.get(node.ino) is not node or node.handles:
            return None
        if node.is_dir:
            try:
                return self._opath(node)
            except OSError:
                pass
        return st

    def unlink(self, parent_ino: int, name: bytes) -> None:
        self._remove(parent_ino, name, want_dir=False)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        self._remove(parent_ino, name, want_dir=True)

    # --- rename ------------------------------------------------------------------------
    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        self._moves_dirs = False
        try:
            self._rename(old_parent_ino, old_name, new_parent_ino, new_name, flags)
        finally:
            if self._moves_dirs:
                # what was cached by path, before or during the rename, may name the wrong
                # directory now
                self._dirs_moved()

    def _rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                new_name: bytes, flags: int) -> None:
        code = check_name(new_name)
        if code:
            raise _err(code)
        self._need_upper()
        op = self.node(old_parent_ino)
        np = self.node(new_parent_ino)
        if self.links:
            self.settle_links()  # names of hard links are exact before any of them moves
        sres, sentries, spaths = self._resolve(op, old_name)
        if sres.kind is Kind.MISSING:
            raise _err(errno.ENOENT)
        dres, dentries, dpaths = self._resolve(np, new_name)
        exists = dres.kind is not Kind.MISSING
        # (a whiteout may be a directory, see `DEAD_XATTRS`)
        self._moves_dirs = Kind.DIR in (sres.kind, dres.kind) or any(
            b == 0 and e.kind is Kind.WHITEOUT for b, e in dentries)
        if flags & sl.RENAME_NOREPLACE and exists:
            raise _err(errno.EEXIST)
        if flags & sl.RENAME_EXCHANGE and not exists:
            raise _err(errno.ENOENT)
        snode, _ = self._node_for(op, old_name, sres, spaths, register=False)
        dnode = (self._node_for(np, new_name, dres, dpaths, register=False)[0] if exists
                 else None)
        if op is np and old_name == new_name:
            return
        if dnode is snode:
            return
        if flags & sl.RENAME_EXCHANGE:
            assert dnode is not None
            self._exchange(op, old_name, snode, sentries, np, new_name, dnode, dentries)
            return
        s_dir = sres.kind is Kind.DIR
        if dnode is not None:
            if s_dir and not dnode.is_dir:
                raise _err(errno.ENOTDIR)
            if not s_dir and dnode.is_dir:
                raise _err(errno.EISDIR)
            if dnode.is_dir and (self.merged(dnode) or self._whiteouts_refuse(
                    dnode, lower_exists(dentries), replaced=True)):
                raise _err(errno.ENOTEMPTY)
            dst = self._stat(dnode)
            self._hiding(dnode, dst)
            self.keep_reachable(dnode, dst)
        self.copy_up(snode)
        redirected = s_dir and bool(snode.lowers)
        if redirected:
            self._set_redirect(op, old_name, snode)
        src_below = lower_exists(sentries)
        assert self.upper is not None
        spfd = self._upper_dir(op)
        gone: int | os.stat_result | None = None
        try:
            if dnode is not None and dnode.upper:
                gone = self._keep_gone(dnode, dst)
            dpfd = self._upper_dir(np)
            try:
                due = self.upper.entry(np.path(), new_name)
                dst_below = due.hides_below or lower_exists(dentries)
                if s_dir and dst_below and not redirected:
                    # the moved directory must hide what lies below its new name
                    fd = os.open(old_name, O_PATH_NOFOLLOW, dir_fd=spfd)
                    try:
                        self._set_opaque(sl.fd_path(fd))
                    finally:
                        os.close(fd)
                if due.kind is Kind.WHITEOUT and s_dir:
                    # a directory cannot replace a non-directory: swap, then drop the whiteout
                    sl.renameat2(spfd, old_name, dpfd, new_name, sl.RENAME_EXCHANGE)
                    if src_below:
                        src_below = False
                    else:
                        os.unlink(old_name, dir_fd=spfd)
                elif due.kind is Kind.DIR:
                    # the upper directory at the new name holds only whiteouts (the merged view
                    # is empty). Swap the two in one step, so a crash never uncovers what those
                    # whiteouts hide; the old one, marked first as dead under the old name (it
                    # reads as a whiteout there), is then disposed of.
                    fd = os.open(new_name, O_PATH_NOFOLLOW, dir_fd=dpfd)
                    try:
                        os.setxattr(sl.fd_path(fd), DEAD_XATTRS[0] if self.trusted_xattrs
                                    else DEAD_XATTRS[1], b"/" + join(op.path(), old_name))
                    finally:
                        os.close(fd)
                    sl.renameat2(spfd, old_name, dpfd, new_name, sl.RENAME_EXCHANGE)
                    if src_below:
                        self._make_whiteout(spfd, old_name, "dir")
                        src_below = False
                    else:
                        self._remove_upper(spfd, old_name, True)
                elif src_below and self.chardev_whiteouts:
                    sl.renameat2(spfd, old_name, dpfd, new_name, sl.RENAME_WHITEOUT)
                    src_below = False
                else:
                    sl.renameat2(spfd, old_name, dpfd, new_name)
                if src_below:
                    self._make_whiteout(spfd, old_name, None)
                if due.hides_below:
                    self._drop_wh(dpfd, new_name)
            finally:
                os.close(dpfd)
        except BaseException:
            _let_go(gone)
            raise
        finally:
            os.close(spfd)
        if s_dir:
            self._redirect_maps.pop(0, None)  # moved directories below it have new paths
        if dnode is not None:
            self._after_unlink(dnode, np, new_name, gone)
        snode.move_name(op, old_name, np, new_name)
        self._changed(op, old_name)
        self._changed(np, new_name)

    def _set_redirect(self, parent: Node, name: bytes, node: Node) -> None:
        """Mark the upper copy of a directory about to move with where its lower content lives
        (overlayfs' redirect_dir format: an absolute path from the branch roots)."""
        assert self.upper is not None
        origin = self._redirect_value(node)
        pfd = self.upper.open_dir(parent.path())
        try:
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            key = REDIRECT_XATTRS[0] if self.trusted_xattrs else REDIRECT_XATTRS[1]
            os.setxattr(sl.fd_path(fd), key, origin)
        finally:
            os.close(fd)

    def _redirect_value(self, node: Node) -> bytes:
        """Where the branches below the upper show NODE's directory: its path, in which an
        ancestor (or the node itself) that was moved before contributes its own redirect
        (the rule of overlayfs' ovl_get_redirect, so either can read the other's)."""
        assert self.upper is not None
        parts: list[bytes] = []
        n: Node | None = node
        while n is not None and n.parent is not None:
            r = self.upper.dir_info(n.path()).redirect
            v = r.rstrip(b"\0") if r else b""
            if v.startswith(b"/"):
                if v.strip(b"/"):
                    parts.append(v.strip(b"/"))
                break
            parts.append(v or n.name)
            n = n.parent
        return b"/" + b"/".join(reversed(parts))

    def _exchange(self, op: Node, on: bytes, a: Node, aentries: list[tuple[int, BranchEntry]],
                  np: Node, nn: bytes, b: Node, bentries: list[tuple[int, BranchEntry]]
                  ) -> None:
        """RENAME_EXCHANGE: A (at OP/ON) and B (at NP/NN) swap names. A directory that lands
        on a name with lower content must not merge with it: a moved directory with lower
        content of its own carries a redirect to it, any other becomes opaque."""
        assert self.upper is not None
        self.copy_up(a)
        self.copy_up(b)
        a_hides = self.upper.entry(op.path(), on).hides_below
        b_hides = self.upper.entry(np.path(), nn).hides_below
        for node, pnode, name, other_below in (
                (a, op, on, b_hides or lower_exists(bentries)),
                (b, np, nn, a_hides or lower_exists(aentries))):
            if not node.is_dir:
                continue
            if node.lowers:
                self._set_redirect(pnode, name, node)
            elif other_below:
                fd = self._opath(node)
                try:
                    self._set_opaque(sl.fd_path(fd))
                finally:
                    os.close(fd)
        apfd = self._upper_dir(op)
        try:
            bpfd = self._upper_dir(np)
            try:
                sl.renameat2(apfd, on, bpfd, nn, sl.RENAME_EXCHANGE)
                if a_hides:
                    self._drop_wh(apfd, on)
                if b_hides:
                    self._drop_wh(bpfd, nn)
            finally:
                os.close(bpfd)
        finally:
            os.close(apfd)
        if a.is_dir or b.is_dir:
            self._redirect_maps.pop(0, None)  # a redirect was set, directories moved
        a.move_name(op, on, np, nn)
        b.move_name(np, nn, op, on)
        self._changed(op, on)
        self._changed(np, nn)

    # --- setattr -----------------------------------------------------------------------
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None,
                fh: int | None = None) -> tuple[Node, os.stat_result]:
        node = self.node(ino)
        if (mode is None and uid is None and gid is None and size is None and atime_ns is None
                and mtime_ns is None):
            return node, self._stat(node)  # e.g. a ctime-only update from the kernel
        handle = self.handles.get(fh) if fh is not None else None
        if handle is None and node.unlinked and node.handles:
            handle = self.handles[next(iter(node.handles))]
        if node.unlinked and not node.upper and (handle is None or not handle.writable):
            # a removed lower file (its name was whited out or replaced): the lower object
            # itself must never change
            if size is None and mode is None and uid is None and gid is None:
                # e.g. the kernel flushing the times it kept: no name shows them any more
                return node, self._stat(node)
            if not self.per_inode_io:
                raise _err(errno.ENOENT)
            handle = self.inode_handle(ino, write=True)
        if node.unlinked:
            if handle is None:
                raise _err(errno.ENOENT)
            # the object has no name any more: work on the open fd only
            fd = handle.fd
            if size is not None:
                os.ftruncate(fd, size)
            if mode is not None:
                os.fchmod(fd, stat.S_IMODE(mode))
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime_ns is not None or mtime_ns is not None:
                st = os.fstat(fd)
                os.utime(fd, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                                 st.st_mtime_ns if mtime_ns is None else mtime_ns))
            return node, os.fstat(fd)
        self.copy_up(node)
        branch, rel = self.where(node)
        if not rel:
            return node, self._setattr_root(branch, mode, uid, gid, atime_ns, mtime_ns)
        pparent, name = split(rel)
        pfd = branch.open_dir(pparent)
        try:
            if size is not None:
                if handle is not None and handle.writable and handle.gen == node.gen:
                    os.ftruncate(handle.fd, size)
                else:
                    fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
            if uid is not None or gid is not None:
                os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid,
                         dir_fd=pfd, follow_symlinks=False)
            if mode is not None:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _err(errno.EOPNOTSUPP)
                os.chmod(name, stat.S_IMODE(mode), dir_fd=pfd)
            if atime_ns is not None or mtime_ns is not None:
                if atime_ns is None or mtime_ns is None:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                    mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
                os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            return node, os.stat(name, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def _setattr_root(self, branch: Branch, mode: int | None, uid: int | None,
                      gid: int | None, atime_ns: int | None, mtime_ns: int | None
                      ) -> os.stat_result:
        """setattr of the mount's root: the branch root itself, reached through its fd."""
        path = sl.fd_path(branch.fd)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            os.chmod(path, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            st = os.fstat(branch.fd)
            os.utime(path, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                               st.st_mtime_ns if mtime_ns is None else mtime_ns))
        return os.fstat(branch.fd)

    # --- files -------------------------------------------------------------------------
    def _open_flags(self, flags: int) -> int:
        f = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)
        if self.config.writeback:
            # the kernel caches writes and may read back through a write-only open;
            # it also handles O_APPEND itself
            if f & os.O_ACCMODE == os.O_WRONLY:
                f = (f & ~os.O_ACCMODE) | os.O_RDWR
            f &= ~os.O_APPEND
        return f | os.O_NOFOLLOW | os.O_CLOEXEC

    def _add_handle(self, fd: int, node: Node, flags: int) -> int:
        fh = next(self._fh)
        acc = flags & os.O_ACCMODE
        self.handles[fh] = Handle(fd, node, flags, node.gen, acc != os.O_RDONLY)
        if node.handles is None:
            node.handles = set()
        node.handles.add(fh)
        return fh

    def _open_fd(self, node: Node, flags: int) -> int:
        branch, rel = self.where(node)
        parent, name = split(rel)
        return os.open(name, self._open_flags(flags), dir_fd=branch.dir_fd(parent))

    def open(self, ino: int, flags: int) -> int:
        node = self.node(ino)
        if node.is_dir:
            raise _err(errno.EISDIR)
        if node.unlinked:
            # reopened through /proc/PID/fd: no name leads to the object any more, but an
            # open handle of it does
            if not node.handles:
                raise _err(errno.ENOENT)
            old = self.handles[next(iter(node.handles))]
            if flags & os.O_ACCMODE != os.O_RDONLY and not node.upper:
                raise _err(errno.ENOENT)  # a lower object with no name cannot be copied up
            fd = os.open(sl.fd_path(old.fd), self._open_flags(flags) & ~os.O_NOFOLLOW)
            return self._add_handle(fd, node, flags)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self.copy_up(node)
        return self._add_handle(self._open_fd(node, flags), node, flags)

    def _handle(self, fh: int) -> Handle:
        try:
            h = self.handles[fh]
        except KeyError:
            raise _err(errno.EBADF) from None
        if h.gen != h.node.gen and not h.node.unlinked:
            # the object was copied up after this open: follow it
            fd = self._open_fd(h.node, h.flags & ~os.O_TRUNC)
            os.close(h.fd)
            h.fd, h.gen = fd, h.node.gen
        return h

    # --- per-inode I/O (no open requests: the kernel sends the inode, not a handle) -----
    def inode_handle(self, ino: int, write: bool) -> Handle:
        """The handle reads and writes of inode INO go through when the kernel does not open
        files (see ops' `noopen`): opened on first use (a write copies up first), reopened
        read-write when a write follows reads, and kept for the most recently used inodes and
        for removed ones (nothing else reaches them), closed when the kernel forgets the inode."""
        node = self.node(ino)
        if node.is_dir:
            raise _err(errno.EISDIR)
        fh = node.implicit
        h = self.handles.get(fh) if fh else None
        if h is not None and (h.writable or not write):
            if ino in self._implicit:  # (a removed file's handle is kept out of the LRU)
                self._implicit.move_to_end(ino)
            return self._handle(fh)
        flags = os.O_RDWR if write else os.O_RDONLY
        if node.unlinked and (h is None or write):
            if node.upper:
                if h is None:
                    raise _err(errno.ENOENT)  # no name leads to it and no fd was kept
                fd = os.open(sl.fd_path(h.fd), flags | os.O_CLOEXEC)  # reopen through it
            elif write:
                # a lower file removed while the kernel had it open for writing (its writes
                # were still in the page cache): give it a private copy no name leads to
                fd = self._anonymous_copy(node)
            else:
                fd = self._open_fd(node, flags)  # the lower object is still where it was
        else:
            if write and not node.upper:
                self.copy_up(node)
            fd = self._open_fd(node, flags)
        if h is not None:
            self._drop_implicit(node)
        node.implicit = self._add_handle(fd, node, flags)
        self._implicit[ino] = node.implicit
        while len(self._implicit) > IMPLICIT_MAX:
            old_ino, _ = self._implicit.popitem(last=False)
            old = self.inodes.nodes.get(old_ino)
            if old is not None and not old.unlinked:
                self._drop_implicit(old)
            # a removed file's handle is its only way in: it stays open, out of the LRU, until
            # the kernel forgets the inode
        return self.handles[node.implicit]

    def keep_reachable(self, node: Node, st: os.stat_result) -> None:
        """A name of regular file NODE in the upper branch is about to go while the kernel may
        still have it open (per-inode I/O has no open handles to tell): keep an fd to it."""
        if (self.per_inode_io and stat.S_ISREG(st.st_mode) and node.upper and node.nlookup > 0
                and self.inodes.nodes.get(node.ino) is node):
            self.inode_handle(node.ino, write=True)

    def _anonymous_copy(self, node: Node) -> int:
        """A read-write fd of a copy of lower NODE's data, in the work dir and unlinked."""
        src = self._open_fd(node, os.O_RDONLY)
        try:
            tmp = self._tmpname()
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=self.work_fd)
            try:
                os.unlink(tmp, dir_fd=self.work_fd)
                st = os.fstat(src)
                copyup.copy_data(src, fd, st.st_size)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(src)

    def _drop_implicit(self, node: Node) -> None:
        fh, node.implicit = node.implicit, 0
        self._implicit.pop(node.ino, None)
        if fh:
            self.release(fh)

    def read_inode(self, ino: int, off: int, size: int) -> bytes:
        return os.pread(self.inode_handle(ino, False).fd, size, off)

    def write_inode(self, ino: int, off: int, buf: bytes | memoryview) -> int:
        return os.pwrite(self.inode_handle(ino, True).fd, buf, off)

    def fsync_inode(self, ino: int, datasync: bool) -> None:
        node = self.node(ino)
        if not node.upper:
            return  # nothing was written through the union
        _sync(self.inode_handle(ino, False).fd, datasync)

    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._handle(fh).fd, size, off)

    def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        return os.pwrite(self._handle(fh).fd, buf, off)

    def fsync(self, fh: int, datasync: bool) -> None:
        _sync(self._handle(fh).fd, datasync)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        os.close(h.fd)
        node = h.node
        if node.handles is not None:
            node.handles.discard(fh)
            if not node.handles:
                node.handles = None
                if node.nlookup <= 0 and node.ino != ROOT_INO:
                    self.inodes.nodes.pop(node.ino, None)

    # --- directories -------------------------------------------------------------------
    def opendir(self, ino: int) -> list[MergedEntry]:
        return list(self.readdir(ino).entries)

    def readdir(self, ino: int) -> OffsetListing:
        """The directory's merged listing as readdir serves it (empty once it was removed)."""
        node = self.node(ino)
        if not node.is_dir:
            raise _err(errno.ENOTDIR)
        if node.unlinked:
            return OffsetListing([], [])
        listing = self.listing(node)
        if not listing.prefetched:
            # readdirplus looks every entry up next: stat lower entries one directory at a time
            listing.prefetched = True
            by_branch: dict[int, list[bytes]] = {}
            for e in listing.entries:
                by_branch.setdefault(e.branch, []).append(e.name)
            for branch, rel in self.layers(node):
                names = by_branch.get(branch.index)
                if names and not branch.writable:
                    branch.prefetch_stats(rel, names)
        return listing

    def fsyncdir(self, ino: int) -> None:
        node = self.node(ino)
        if not node.upper:
            return
        assert self.upper is not None
        fd = self.upper.open_dir(node.path(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- xattrs ------------------------------------------------------------------------
    def _opath(self, node: Node) -> int:
        branch, rel = self.where(node)
        if not rel:
            return sl.openat2(branch.fd, b".", os.O_PATH)
        parent, name = split(rel)
        pfd = branch.open_dir(parent)
        try:
            return os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
        finally:
            os.close(pfd)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        fd = self._opath(self.node(ino))
        try:
            return os.getxattr(sl.fd_path(fd), name)
        finally:
            os.close(fd)

    def listxattr(self, ino: int) -> list[bytes]:
        fd = self._opath(self.node(ino))
        try:
            names = os.listxattr(sl.fd_path(fd))
        finally:
            os.close(fd)
        return [b for b in map(os.fsencode, names) if not is_private_xattr(b)]

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        if is_private_xattr(name):
            raise _err(errno.EPERM)
        node = self.node(ino)
        self.copy_up(node)
        fd = self._opath(node)
        try:
            os.setxattr(sl.fd_path(fd), name, value, flags)
        finally:
            os.close(fd)

    def removexattr(self, ino: int, name: bytes) -> None:
        if is_private_xattr(name):
            raise _err(errno.ENODATA)
        node = self.node(ino)
        # fail before copying up if there is nothing to remove
        fd = self._opath(node)
        try:
            os.getxattr(sl.fd_path(fd), name)
        finally:
            os.close(fd)
        self.copy_up(node)
        fd = self._opath(node)
        try:
            os.removexattr(sl.fd_path(fd), name)
        finally:
            os.close(fd)

    # --- file system ------------------------------------------------------------------
    def statfs(self) -> os.statvfs_result:
        top = self.upper if self.upper is not None else self.branches[0]
        fd = sl.openat2(top.fd, b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)
