"""The lower cache: what mounts learnt about each lower layer, kept for the next mount.

Lower branches are immutable while mounted, so `Branch` keeps what it read from them (each
directory's classified listing, its opaque flag and redirect) for the rest of the mount. This
module keeps the same knowledge across mounts, one file per layer, in a cache directory
(`-o lowercache=DIR`, by default /var/cache/unionfs/layers for root and
$XDG_CACHE_HOME/unionfs/layers otherwise): the next mount of any stack holding that layer reads
a directory's listing and flags from the file instead of opening, listing and reading the
extended attributes of the layer's directory. In a deep stack a cold lookup otherwise reads one
directory per layer from disk.

A cached directory is used only after one lstat of the layer's directory shows the inode
number, mtime and ctime it had when it was learnt (adding, removing or renaming an entry changes
the mtime; an opaque marker file too; an extended attribute the ctime). What does not match is
dropped and learnt again, so a layer changed between mounts costs a re-read, never a wrong
answer. The identity is taken before the directory is read, so a change racing the read makes
the record stale rather than wrong. A helper process may make those lstats at mount, ahead of
the lookups (`lowercheck`: `take_ahead`, `check_ahead`); a record it has not reached yet is
checked here, at first use. Not cached (always read live): directories whose files may
carry xattr whiteouts (`opaque=x`): a file's xattr does not change its directory.

Attributes are never cached (a file changed in place changes no directory), but where the
server may open objects by file handle (CAP_DAC_READ_SEARCH: root, not a user namespace's), a
directory's record also keeps the handle of each non-directory the mount stat'ed there
(`stat_by_handle`, `learn_handle`). The next mount stats such a name by opening its handle
(O_PATH) and fstat'ing it: the attributes are read live from the inode, but the directory block
that maps the name to it is not read (in a deep stack the names of one directory are scattered
over as many layer directories, each a block of its own). A handle is used only while its
directory's record is current: an unchanged directory maps each name to the same inode, and a
handle names that inode (a removed one is ESTALE, then the name is stat'ed as before).
Directories are always stat'ed by name: opening a directory's handle reconnects it to the tree,
which costs more than the lookup it saves.

Files: `<sha256 of the layer's realpath, st_dev, st_ino>.layer`, marshal of (MAGIC, VERSION,
(realpath, st_dev, st_ino), dirs) followed by its CRC-32 (`seal`), with dirs: rel -> the
marshal of one record (st_ino, mtime_ns, ctime_ns, listing or None, (opaque, redirect) or None,
{name: file handle} or None); a listing is ({name: Kind value}, hidden names, opaque marker).
Each record is its own marshal so that a mount decodes only the directories it uses: decoding
and checking a whole file at the first lookup took 4.6 ms for a rootfs layer (785 directories,
400 KB) and 50 ms for a layer of 100,000 files, and a mount pays it before its first answer.
The checksum (C, about 1 ms per 4 MB) stands for checking each record's shape: only `save`
writes these files. Written at unmount and whenever the server sheds its caches
(`Union.shrink`), merged over what other mounts wrote meanwhile, through a temporary file
renamed into place. A file that is not ours (owner, permissions), of another version, for
another layer, damaged (checksum) or unreadable is ignored, and so is a record that does not
unpack. Only the owner of the cache directory reads it (created 0700): the files are trusted
input (a planted handle could only show another object's attributes: contents are always
opened by name). A mount that reads a file marks it used (its mtime, at most once a day);
files no mount used for 30 days (layers deleted since, most likely) are removed at unmount
(`prune`).

`lowerindex=auto` keeps a whole stack's lower index (`layerindex`) in the same directory,
`<sha256 of every layer's realpath, st_dev, st_ino>.index`: a mount that finds none (or a stale
one) works with the lower cache and builds the index at unmount, once the kernel let go; the
next mount uses it, checked as `lowerindex_check=` says.
"""

from __future__ import annotations

import marshal
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from stat import S_ISDIR

from . import sys_linux as sl
from .atomicfile import make_private_dir, write_atomically
from .branch import split
from .core.readdir import Listing
from .core.resolve import BranchEntry, Kind
from .log import Logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

log = Logger(__name__)

MAGIC = b"unionfs-lowercache"
VERSION = 3
UNUSED_DAYS = 30  # a layer's file no mount read for this long is removed (`prune`)
TOUCH_AFTER = 86400  # a file read by a mount gets a new mtime when its own is older than this

# (st_ino, mtime_ns, ctime_ns)
Identity = tuple[int, int, int]
_Enc = tuple[dict[bytes, int], tuple[bytes, ...], bool]
_Handles = dict[bytes, bytes]  # name -> file handle (`sys_linux.name_to_handle_at`)
_Dir = tuple[int, int, int, "_Enc | None", "tuple[bool, bytes | None] | None", "_Handles | None"]
# learnt in this mount: the listing kept as the branch's own object (shared with its cache, no
# copy) until it is written
_Learnt = tuple[int, int, int, "Listing | _Enc | None", "tuple[bool, bytes | None] | None",
                _Handles]

# what a helper found of a record (`lowercheck`); 0: not checked yet
CURRENT = 1
STALE = 2

_KINDS = {k.value: k for k in Kind}
_ENTRY = {k.value: BranchEntry(k) for k in Kind}


def _nothing() -> None:
    pass


def default_dir(uid_map: str = "/proc/self/uid_map") -> str | None:
    """The cache directory when `lowercache=` is not given (None: no place to keep it): the
    system's for the real root, the user's otherwise (root of a user namespace included, as
    under rootless podman: its HOME is the user's)."""
    env = os.environ.get("UNIONFS_LOWER_CACHE")
    if env is not None:
        return env or None
    if os.geteuid() == 0 and _initial_user_namespace(uid_map):
        return "/var/cache/unionfs/layers"
    base = os.environ.get("XDG_CACHE_HOME") or (
        os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else None)
    return os.path.join(base, "unionfs", "layers") if base else None


def _initial_user_namespace(uid_map: str) -> bool:
    try:
        with open(uid_map) as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True  # no user namespaces at all


def layer_key(path: str, root_fd: int) -> tuple[str, int, int]:
    """What names a layer's cache files: its realpath, st_dev and st_ino."""
    st = os.fstat(root_fd)
    return (os.path.realpath(path), st.st_dev, st.st_ino)


def sha256_hex(data: bytes) -> str:
    """SHA-256 of DATA in hex, from CPython's own implementation where there is one: hashlib
    loads OpenSSL's libcrypto, about 5 MB read and 20 ms of a server's start with a cold page
    cache (every mount with the lower cache names its files)."""
    for module in ("_sha256", "_sha2"):  # (3.11; renamed in 3.12)
        try:
            sha256 = __import__(module).sha256
        except (ImportError, AttributeError):
            continue
        return str(sha256(data).hexdigest())
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _file_for(cache_dir: str, key: object, suffix: str) -> str:
    digest = sha256_hex(repr(key).encode())[:40]
    return os.path.join(cache_dir, digest + suffix)


def identity(st: os.stat_result) -> Identity:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _encode(lst: Listing) -> _Enc:
    return ({n: e.kind.value for n, e in lst.entries.items()}, tuple(lst.hidden),
            lst.opaque_marker)


def _decode(enc: _Enc) -> Listing:
    entries, hidden, marker = enc
    return Listing({n: _ENTRY[k] for n, k in entries.items()}, frozenset(hidden), marker)


def _unpack(blob: bytes) -> _Dir | None:
    """The record packed in BLOB (checked with its file's checksum: only `save` writes them),
    None if it is not one."""
    try:
        d = marshal.loads(blob)
    except (EOFError, ValueError, TypeError):
        return None
    return d if type(d) is tuple and len(d) == 6 else None


def _pack(d: _Dir) -> bytes:
    return marshal.dumps(d)


def seal(payload: bytes) -> bytes:
    """PAYLOAD with its checksum (CRC-32) after it, as a cache file holds it."""
    return payload + zlib.crc32(payload).to_bytes(4, "little")


def unseal(data: bytes) -> memoryview | None:
    """The payload of sealed DATA, None if its checksum does not match."""
    view = memoryview(data)
    if len(view) < 4 or zlib.crc32(view[:-4]) != int.from_bytes(view[-4:], "little"):
        return None
    return view[:-4]


class Stack:
    """The layers' caches of one mount. The first load of one layer's file comes with every
    layer's (at mount: the root directory merges them all), so it asks the kernel to read all
    of them at once (POSIX_FADV_WILLNEED): the disk then serves them in one batch instead of
    one file after another (64 files cold: 12-13 ms, with the advice 7-8)."""

    def __init__(self) -> None:
        self.caches: list[LayerCache] = []
        self._advised = False

    def advise(self) -> None:
        if self._advised:
            return
        self._advised = True
        for cache in self.caches:
            try:
                fd = os.open(cache.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue  # (none yet; a file that is not ours is refused when read)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


class LayerCache:
    """One lower layer's cached directories, for `Branch.known`: what it answers was checked
    against the layer in this mount; what the branch reads is handed back (`learn_*`)."""

    def __init__(self, cache_dir: str, layer_path: str, root_fd: int,
                 dir_fd: Callable[[bytes], int], stack: Stack | None = None) -> None:
        # the layer's O_PATH fd of a directory (`Branch.dir_fd`: opened beneath the root, never
        # through a symlink): a directory is checked by name from its parent's
        self._dir_fd = dir_fd
        self._root_fd = root_fd
        self.key = layer_key(layer_path, root_fd)
        self.cache_dir = cache_dir
        self.path = _file_for(cache_dir, self.key, ".layer")
        # the file's records, packed (`_pack`), read on first use
        self._loaded: dict[bytes, bytes] | None = None
        self._current: dict[bytes, _Dir] = {}  # loaded records found current in this mount
        self._learnt: dict[bytes, _Learnt] = {}  # new this mount (to be written)
        # loaded records found stale or unreadable, packed (removed unless rewritten meanwhile)
        self._stale: dict[bytes, bytes] = {}
        self.hits = 0  # directories answered from the file (tests and stats)
        # a helper's checks of the records loaded at mount (`take_ahead`, `lowercheck`), by
        # position in _ahead_keys: used while _loaded is still the dict they were made for
        self._ahead: memoryview | None = None
        self._ahead_keys: tuple[bytes, ...] = ()
        self._ahead_of: dict[bytes, bytes] | None = None
        self._ahead_pos: dict[bytes, int] | None = None
        self._ahead_done: Callable[[], None] = _nothing
        self.checked_ahead = 0  # records found current or stale by the helper (tests, stats)
        self.handle_stats = 0  # objects stat'ed through a kept file handle (tests and stats)
        # opening by handle: None = not tried yet, else (fd of the layer's root that is not
        # O_PATH, mount id of the layer's root) or False where the server may not
        self._opener: tuple[int, int] | bool | None = None
        self._stack = stack
        if stack is not None:
            stack.caches.append(self)

    # --- reading (LayerKnowledge) ---------------------------------------------------------
    def _record(self, rel: bytes) -> _Dir | None:
        """The loaded record of directory REL if it is current (checked once per mount)."""
        d = self._current.get(rel)
        if d is not None:
            return d
        if self._loaded is None:
            if self._stack is not None:
                self._stack.advise()
            self._loaded = _read(self.path, self.key, touch=True) or {}
        blob = self._loaded.get(rel)
        if blob is None:
            return None
        d = _unpack(blob)
        if d is not None:
            said = self._said_ahead(rel) if self._ahead is not None else 0
            if said == CURRENT or (said == 0 and self._check(rel, d)):
                self._current[rel] = d
                return d
        del self._loaded[rel]
        self._stale[rel] = blob
        return None

    def _check(self, rel: bytes, d: _Dir) -> bool:
        """Whether directory REL is as its record D says (one lstat; see the module's doc)."""
        # (the lstat and `identity` inline: a deep stack checks every layer's directory here)
        parent, _, name = rel.rpartition(b"/")
        try:
            st = os.stat(name, dir_fd=self._dir_fd(parent) if parent else self._root_fd,
                         follow_symlinks=False) if name else os.fstat(self._root_fd)
        except OSError:
            return False
        return (st.st_ino == d[0] and st.st_mtime_ns == d[1] and st.st_ctime_ns == d[2]
                and S_ISDIR(st.st_mode))

    # --- checked ahead (`lowercheck`) -----------------------------------------------------
    def ahead_work(self) -> tuple[bytes, ...]:
        """The loaded records a helper may check ahead of their use (their order is the
        file's: the order mounts first learnt them)."""
        return tuple(self._loaded) if self._loaded else ()

    def check_ahead(self, rel: bytes) -> int:
        """(In the helper) CURRENT or STALE: what one lstat says of loaded record REL."""
        blob = self._loaded.get(rel) if self._loaded is not None else None
        d = _unpack(blob) if blob is not None else None
        return CURRENT if d is not None and self._check(rel, d) else STALE

    def take_ahead(self, results: memoryview, keys: tuple[bytes, ...],
                   done: Callable[[], None]) -> None:
        """Use RESULTS (a helper's `check_ahead` of KEYS, by position, 0 while not yet made)
        for the records loaded now; DONE is called when a result is read."""
        self._ahead, self._ahead_keys, self._ahead_of = results, keys, self._loaded
        self._ahead_pos = None
        self._ahead_done = done

    def _said_ahead(self, rel: bytes) -> int:
        """What the helper found of record REL: CURRENT, STALE or 0 (not checked yet, or not
        the file it checked: `save` dropped it since)."""
        if self._loaded is not self._ahead_of:
            return 0
        pos = self._ahead_pos
        if pos is None:
            keys = self._ahead_keys
            pos = self._ahead_pos = {k: i for i, k in enumerate(keys)}
        i = pos.get(rel)
        said = self._ahead[i] if i is not None and self._ahead is not None else 0
        if said:
            self.checked_ahead += 1
            self._ahead_done()
        return said

    def listing(self, rel: bytes) -> Listing | None:
        d = self._current.get(rel) or self._record(rel)
        if d is None or d[3] is None:
            return None
        self.hits += 1
        return _decode(d[3])

    def names(self, rel: bytes) -> tuple[Mapping[bytes, object], Iterable[bytes]] | None:
        d = self._current.get(rel) or self._record(rel)  # (a deep stack asks every layer)
        if d is None or d[3] is None:
            return None
        self.hits += 1
        enc = d[3]
        return enc[0], enc[1]

    def dir_info(self, rel: bytes) -> tuple[bool, bytes | None] | None:
        d = self._current.get(rel) or self._record(rel)
        if d is None or d[4] is None:
            return None
        self.hits += 1
        return d[4]

    def stat(self, rel: bytes) -> os.stat_result | None:
        return None  # attributes are always read live

    # --- file handles ----------------------------------------------------------------------
    def _handles_of(self, rel: bytes) -> _Handles | None:
        """The handles kept for directory REL if its record is current in this mount."""
        d = self._learnt.get(rel)
        if d is not None:
            return d[5]
        loaded = self._record(rel)
        return loaded[5] if loaded is not None else None

    def _open_handles(self) -> tuple[int, int] | None:
        if self._opener is None:
            self._opener = False
            fd = -1
            try:
                # may this server open by handle here? Try with the layer's root
                handle, mount_id = sl.name_to_handle_at(self._root_fd, b"", sl.AT_EMPTY_PATH)
                fd = sl.openat2(self._root_fd, b".", os.O_RDONLY | os.O_DIRECTORY)
                os.close(sl.open_by_handle_at(fd, handle, os.O_PATH))
                self._opener, fd = (fd, mount_id), -1
            except OSError as e:
                log.debug("%s: no file handles (%s)", self.key[0], e.strerror)
            finally:
                if fd >= 0:
                    os.close(fd)
        return self._opener if isinstance(self._opener, tuple) else None

    def stat_by_handle(self, rel: bytes) -> os.stat_result | None:
        """The lstat of non-directory REL, read through the file handle kept for it (the
        inode alone, not the directory that names it); None without one."""
        if self._opener is False:
            return None  # (no handle was kept: nothing to load or check for it)
        parent, name = split(rel)
        handles = self._handles_of(parent)
        handle = handles.get(name) if handles else None
        if handle is None:
            return None
        opener = self._open_handles()
        if opener is None:
            return None
        try:
            fd = sl.open_by_handle_at(opener[0], handle, os.O_PATH)
        except OSError:
            return None  # (ESTALE: the name is stat'ed, its new handle learnt)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.handle_stats += 1
        return st

    def learn_handle(self, rel: bytes, dir_fd: int, name: bytes) -> None:
        """Keep the handle of non-directory REL (NAME in the directory open as DIR_FD) when its
        directory's record is current."""
        if self._opener is False:
            return
        parent = split(rel)[0]
        d: _Learnt | _Dir | None = self._learnt.get(parent)
        if d is None:
            d = self._current.get(parent)
            if d is None:
                return  # no record vouched for in this mount to keep it with
        opener = self._open_handles()
        if opener is None:
            return
        try:
            handle, mount_id = sl.name_to_handle_at(dir_fd, name)
        except OSError:
            return
        if mount_id != opener[1]:
            return  # something mounted over it: not the layer's own
        if parent not in self._learnt:
            self._learnt[parent] = (*d[:5], dict(d[5] or {}))
        self._learnt[parent][5][name] = handle

    def close(self) -> None:
        """Close the fd opened for file handles (after `save`)."""
        if isinstance(self._opener, tuple):
            os.close(self._opener[0])
        self._opener = None

    # --- learning --------------------------------------------------------------------------
    def learn_listing(self, rel: bytes, st: os.stat_result, lst: Listing) -> None:
        self._learn(rel, st, lst, None)

    def learn_dir_info(self, rel: bytes, st: os.stat_result,
                       info: tuple[bool, bytes | None]) -> None:
        self._learn(rel, st, None, info)

    def _learn(self, rel: bytes, st: os.stat_result, lst: Listing | _Enc | None,
               info: tuple[bool, bytes | None] | None) -> None:
        ident = identity(st)
        old: _Learnt | _Dir | None = self._learnt.get(rel)
        if old is None:
            old = self._current.get(rel)
        if old is None and self._loaded is not None and rel in self._loaded:
            old = _unpack(self._loaded[rel])
        handles: _Handles = {}
        if old is not None and old[:3] == ident:
            lst = lst if lst is not None else old[3]
            info = info if info is not None else old[4]
            handles = dict(old[5] or {})
        self._learnt[rel] = (*ident, lst, info, handles)

    @property
    def dirty(self) -> bool:
        return bool(self._learnt or self._stale)

    # --- writing ---------------------------------------------------------------------------
    def save(self) -> bool:
        """Write what this mount learnt over the file as it is now, then forget it (the file
        is read again on demand). Whether there was anything to write."""
        if not self.dirty:
            self._drop()
            return False
        try:
            make_private_dir(self.cache_dir)
            dirs = _read(self.path, self.key) or {}
            for rel, blob in self._stale.items():
                if dirs.get(rel) == blob:  # (not rewritten by another mount meanwhile)
                    del dirs[rel]
            for rel, (ino, mtime, ctime, lst, info, handles) in self._learnt.items():
                enc = _encode(lst) if isinstance(lst, Listing) else lst
                was = _unpack(dirs[rel]) if rel in dirs else None
                if was is not None and was[:3] == (ino, mtime, ctime) and was[5]:
                    handles = {**was[5], **handles}  # what another mount learnt meanwhile
                dirs[rel] = _pack((ino, mtime, ctime, enc, info, handles or None))
            write_atomically(self.path, seal(marshal.dumps((MAGIC, VERSION, self.key, dirs))),
                             0o600, durable=False)  # (a cache: a lost file is read again)
        except OSError as e:
            log.debug("lower cache %s not written: %s", self.path, e)
        self._drop()
        return True

    def _drop(self) -> None:
        self._loaded = None
        self._ahead = self._ahead_of = self._ahead_pos = None  # (made for the dict dropped)
        self._current = {}
        self._learnt = {}
        self._stale = {}


def _open_trusted(path: str, touch: bool) -> int | None:
    """An fd of the file at PATH if it is a regular file of ours that nobody else may write
    (the cache's files are trusted input), else None. TOUCH: a mount uses it, its mtime says
    so (at most daily; see `prune`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            log.debug("%s ignored: not ours", path)
        else:
            if touch and st.st_mtime < time.time() - TOUCH_AFTER:
                os.utime(fd)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _read(path: str, key: tuple[str, int, int], touch: bool = False
          ) -> dict[bytes, bytes] | None:
    """The records of the file at PATH, or None if there is none we can trust and use."""
    fd = _open_trusted(path, touch)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            payload = unseal(f.read())
        if payload is None:
            log.debug("lower cache %s ignored: damaged", path)
            return None
        data = marshal.loads(payload)
    except (OSError, EOFError, ValueError, TypeError):
        log.debug("lower cache %s ignored: unreadable", path)
        return None
    if not (isinstance(data, tuple) and len(data) == 4 and data[0] == MAGIC
            and data[1] == VERSION and data[2] == key and _packed_records(data[3])):
        log.debug("lower cache %s ignored: not for this layer or version", path)
        return None
    dirs: dict[bytes, bytes] = data[3]
    return dirs


def _packed_records(value: Any) -> bool:
    """Whether VALUE maps names to packed records (bytes to bytes; each record is checked when
    it is unpacked, `_unpack`)."""
    return (type(value) is dict and set(map(type, value)) <= {bytes}
            and set(map(type, value.values())) <= {bytes})


# --- lowerindex=auto ---------------------------------------------------------------------------

def index_path(cache_dir: str, lowers: Sequence[tuple[str, int]]) -> str:
    """Where `lowerindex=auto` keeps the index of the stack LOWERS ((path, root fd) top-first):
    named after every layer's realpath, st_dev and st_ino, in order."""
    return _file_for(cache_dir, [layer_key(path, fd) for path, fd in lowers], ".index")


def trusted_file(path: str) -> bool:
    """Whether the file at PATH exists, is ours and writable by nobody else (then marked used,
    at most daily, see `prune`)."""
    fd = _open_trusted(path, touch=True)
    if fd is None:
        return False
    os.close(fd)
    return True


def describe(path: str) -> list[str]:
    """The layers a cache file is about (top-first for an index); [] if it is not readable."""
    try:
        with open(path, "rb") as f:
            data = marshal.loads(f.read())
        if path.endswith(".layer") and data[0] == MAGIC:
            return [str(data[2][0])]
        if path.endswith(".index"):
            return [str(ident[0]) for ident in data[2]]
    except (OSError, EOFError, ValueError, TypeError, IndexError):
        pass
    return []


def prune(cache_dir: str, now: float | None = None, days: float = UNUSED_DAYS) -> int:
    """Remove the files of layers no mount used for DAYS (a layer deleted since, most likely)
    and temporary files a killed writer left; the number removed."""
    now = time.time() if now is None else now
    removed = 0
    try:
        with os.scandir(cache_dir) as it:
            for e in it:
                if e.name.endswith((".layer", ".index")):
                    limit = now - days * 86400
                elif e.name.endswith(".tmp"):
                    limit = now - min(3600, days * 86400)
                else:
                    continue
                try:
                    if e.is_file(follow_symlinks=False) and e.stat(
                            follow_symlinks=False).st_mtime < limit:
                        os.unlink(e.path)
                        removed += 1
                except OSError:
                    pass
    except OSError:
        pass
    return removed
